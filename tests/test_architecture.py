"""Architecture checks: import-linter contracts, and no unsafe torch.load in the package."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "napari_semicl"


def test_import_linter_contracts():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[testing]')")
    # The CLI reads [tool.importlinter] from pyproject.toml in the working directory.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())",
            "--no-cache",
            "--no-logo",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "import-linter contracts broken (pyproject.toml [tool.importlinter]):\n"
        + result.stdout
        + result.stderr
    )


def _is_torch_load(func: ast.expr, load_aliases: set[str]) -> bool:
    if isinstance(func, ast.Attribute) and func.attr == "load":
        return isinstance(func.value, ast.Name) and func.value.id == "torch"
    return isinstance(func, ast.Name) and func.id in load_aliases


def _weights_only_true(call: ast.Call) -> bool:
    return any(
        kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def _unsafe_torch_loads(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    rel = path.relative_to(REPO_ROOT)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError:
        # Unparsable file: fall back to a line grep.
        return [
            f"{rel}:{n}: {line.strip()}"
            for n, line in enumerate(source.splitlines(), 1)
            if "torch.load(" in line and not re.search(r"weights_only\s*=\s*True", line)
        ]
    # `from torch import load [as x]` makes `x(...)` a torch.load call too.
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "torch"
        for alias in node.names
        if alias.name == "load"
    }
    lines = source.splitlines()
    linenos = sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _is_torch_load(node.func, aliases)
        and not _weights_only_true(node)
    )
    return [f"{rel}:{n}: {lines[n - 1].strip()}" for n in linenos]


def test_torch_load_uses_weights_only():
    offenders = [hit for path in sorted(PACKAGE_DIR.rglob("*.py")) for hit in _unsafe_torch_loads(path)]
    assert not offenders, "torch.load( without weights_only=True:\n" + "\n".join(offenders)


def test_torch_load_checker_catches_offenders(tmp_path, monkeypatch):
    """The checker itself: flags missing/False weights_only, accepts weights_only=True."""
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\n"
        "from torch import load as tl\n"
        "a = torch.load('x.pt')\n"
        "b = torch.load('x.pt', map_location='cpu',\n"
        "               weights_only=False)\n"
        "c = tl('x.pt')\n"
        "d = torch.load('x.pt', weights_only=True)\n"
        "e = torch.load(\n    'x.pt',\n    weights_only=True,\n)\n"
    )
    hits = _unsafe_torch_loads(sample)
    assert [h.split(":")[1] for h in hits] == ["3", "4", "6"], hits
