"""The CLI package: help lists only the commands a user can run, every registered command and
benchmark parses, and ``train``'s metrics.json is written atomically (on a slide:
tests/test_atomic_writes.py)."""

from __future__ import annotations

import json

import pytest

from napari_semicl.cli import COMMANDS, CliError, build_parser, main
from napari_semicl.cli.bench import BENCHES

SHOWN = [c.name for c in COMMANDS if not c.hidden]
HIDDEN = [c.name for c in COMMANDS if c.hidden]


def test_registry_has_the_user_commands_and_hides_job():
    assert SHOWN == ["train", "predict", "evaluate", "interpolate", "demo", "bench"]
    assert HIDDEN == ["job"]
    assert issubclass(CliError, Exception)


def test_help_lists_the_user_commands_and_nothing_hidden(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "SUPPRESS" not in text
    # a command's row is indented four spaces (its help wraps further in)
    rows = {line.split()[0] for line in text.splitlines() if line.startswith("    ") and line[4:5].strip()}
    assert rows == set(SHOWN), text
    assert "{" + ",".join(SHOWN) + "}" in text  # the usage line names them, in order
    for name in HIDDEN:
        assert name not in text.replace("napari-semicl", "")


def _parsers(parser):
    """``parser`` and every subparser under it."""
    yield parser
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            for sub in dict.values(action.choices):
                yield from _parsers(sub)


def test_no_help_anywhere_shows_a_suppressed_entry():
    texts = {p.prog: p.format_help() for p in _parsers(build_parser())}
    assert {"napari-semicl train", "napari-semicl bench cohort", "napari-semicl job"} <= set(texts)
    assert not [prog for prog, text in texts.items() if "SUPPRESS" in text]


def test_an_unknown_command_is_told_the_user_commands_only(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["trian"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err
    assert all(f"'{name}'" in err for name in SHOWN) and "'job'" not in err


def test_the_hidden_job_command_still_parses_and_runs_its_function():
    from napari_semicl.cli.job import cmd_job

    args = build_parser().parse_args(["job", "/some/job"])
    assert args.command == "job" and args.job_dir == "/some/job" and args.func is cmd_job


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_has_its_parser_and_function(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command.name, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: napari-semicl {command.name} ")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices[command.name].get_default("func") is command.run


@pytest.mark.parametrize("bench", BENCHES, ids=lambda b: b.name)
def test_every_benchmark_has_its_parser_and_the_results_flags(bench, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", bench.name, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: napari-semicl bench {bench.name} ")
    if bench.results:  # the registry gives these to every benchmark that writes a results JSON
        assert all(flag in text for flag in ("--seed", "--device", "--out")), text


# --------------------------------------------------------------------------- metrics.json
def _disk_full_on_metrics(monkeypatch):
    """Writing a metrics file stops halfway with a full disk."""
    import pathlib

    write_text = pathlib.Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        if "metrics" not in self.name:
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)


def _assert_old_metrics_kept(out, capsys):
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}
    assert sorted(p.name for p in out.iterdir() if "metrics" in p.name) == ["metrics.json"]  # no temporary file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err


def test_train_metrics_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    from napari_semicl.data.reveal import reveal_slices
    from napari_semicl.io import write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, load_sample_volume, sample_data_dir

    image, reference = load_sample_volume()
    painted = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0),
                           metadata=image.metadata)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"old": True}))
    _disk_full_on_metrics(monkeypatch)
    argv = ["-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(painted),
            "--iterations", "2", "--patch-size", "64", "--out", str(out)]
    assert main(argv) == 2
    assert (out / "prediction.nii.gz").is_file()  # it got as far as the metrics
    _assert_old_metrics_kept(out, capsys)
