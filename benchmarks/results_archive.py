"""Results files folded into one archive JSON, and one way to read loose files and archives alike.

docs/results keeps the files the docs' tables cite (issue 25: at most 40). Older runs that a
doc still cites are folded, several into one ``archive_*.json``::

    {"archive": "what these files are", "files": {"prior15/la_inside_k3.json": {...}, ...}}

Each member is keyed by its original path under docs/results and holds that file's parsed JSON
(a text file's text as a string). The report scripts read members and loose files the same way
(:func:`find`), so a new run written as a loose file sits beside the archived ones.

    python benchmarks/results_archive.py list docs/results/archive_prior15.json
    python benchmarks/results_archive.py extract docs/results/archive_prior15.json /tmp/results   # the original files
    python benchmarks/results_archive.py fold docs/results archive_NAME.json "what" PATH...       # loose files -> archive
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path


def is_archive(data) -> bool:
    return isinstance(data, dict) and "archive" in data and isinstance(data.get("files"), dict)


def _read(path: Path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else text


def archives(results: Path) -> dict[Path, dict]:
    """The archives directly in ``results``, by path."""
    out = {}
    for f in sorted(Path(results).glob("archive_*.json")):
        data = _read(f)
        if is_archive(data):
            out[f] = data
    return out


def _matches(name: str, pattern: str) -> bool:
    # glob semantics of Path.glob: '*' does not cross a folder
    return name.count("/") == pattern.count("/") and fnmatch.fnmatchcase(name, pattern)


def find(results: Path, pattern: str) -> list[tuple[str, object]]:
    """``(name, data)`` of every results file matching ``pattern`` (a glob relative to ``results``):
    loose files and archive members, sorted by name; a loose file wins over a member of the
    same name (a re-run replaces the archived run)."""
    results = Path(results)
    found: dict[str, object] = {}
    for data in archives(results).values():
        for name, member in data["files"].items():
            if _matches(name, pattern):
                found[name] = member
    for f in results.glob(pattern):
        if f.is_file() and not f.name.startswith("archive_"):
            found[f.relative_to(results).as_posix()] = _read(f)
    return sorted(found.items())


def load(results: Path, name: str):
    """One results file by its name under ``results`` (loose or archived), or ``None``."""
    hits = [d for n, d in find(results, name) if n == name]
    return hits[0] if hits else None


def entries(path: Path, pattern: str = "*.json") -> list[tuple[str, object]]:
    """The results in ``path``: an archive file's members, or a folder's files (and the members
    of the archives in it) matching ``pattern``."""
    path = Path(path)
    if path.is_file():
        data = _read(path)
        if not is_archive(data):
            return [(path.name, data)]
        return sorted((n, d) for n, d in data["files"].items() if fnmatch.fnmatchcase(Path(n).name, pattern))
    return find(path, pattern)


def fold(results: Path, archive_name: str, description: str, names: list[str]) -> Path:
    """Fold the loose files ``names`` (paths relative to ``results``) into ``results/archive_name``
    (added to it if it exists) and delete them; empty folders left behind are removed."""
    results = Path(results)
    target = results / archive_name
    data = _read(target) if target.exists() else {"archive": description, "files": {}}
    for name in names:
        data["files"][name] = _read(results / name)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(target)
    for name in names:
        f = results / name
        f.unlink()
        parent = f.parent
        while parent != results and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return target


def extract(archive: Path, out: Path) -> list[Path]:
    """Write an archive's members back as files under ``out`` (their original paths)."""
    data = _read(Path(archive))
    written = []
    for name, member in data["files"].items():
        f = Path(out) / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(member if isinstance(member, str) else json.dumps(member, indent=1) + "\n")
        written.append(f)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list")
    p.add_argument("archive", type=Path)
    p = sub.add_parser("extract")
    p.add_argument("archive", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("fold")
    p.add_argument("results", type=Path)
    p.add_argument("archive_name")
    p.add_argument("description")
    p.add_argument("names", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "list":
        for name in _read(args.archive)["files"]:
            print(name)
    elif args.command == "extract":
        for f in extract(args.archive, args.out):
            print(f)
    else:
        print(fold(args.results, args.archive_name, args.description, args.names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
