"""No import cycles in the package, and the Train dock's run model stays Qt-free.

The import graph comes from grimp (installed with import-linter); it holds every import
statement, also those inside functions and under ``TYPE_CHECKING``: a cycle there is still
two modules that cannot be understood one without the other.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_cycles(package: str) -> list[list[str]]:
    """The import cycles among ``package``'s modules: each as the modules of one strongly
    connected component of the import graph (Tarjan), sorted; empty when there is none."""
    graph = grimp.build_graph(package, cache_dir=None)
    modules = graph.modules
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    # iterative Tarjan: (module, iterator over what it imports)
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, imported = work[-1]
            for other in imported:
                if other not in modules:
                    continue
                if other not in index:
                    index[other] = low[other] = len(index)
                    stack.append(other)
                    on_stack.add(other)
                    work.append((other, iter(sorted(graph.find_modules_directly_imported_by(other)))))
                    break
                if other in on_stack:
                    low[module] = min(low[module], index[other])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                        cycles.append(sorted(component))
    return sorted(cycles)


def _describe(package: str, cycle: list[str]) -> str:
    graph = grimp.build_graph(package, cache_dir=None)
    a = cycle[0]
    b = next(m for m in cycle[1:] if m in graph.find_modules_directly_imported_by(a)) if len(cycle) > 1 else a
    there = graph.find_shortest_chain(importer=a, imported=b) or (a, b)
    back = graph.find_shortest_chain(importer=b, imported=a) or (b, a)
    return " -> ".join(there) + " -> " + " -> ".join(back[1:])


def test_the_package_has_no_import_cycle():
    cycles = import_cycles("napari_semicl")
    assert not cycles, "import cycles (give each part the callables it needs instead):\n" + "\n".join(
        _describe("napari_semicl", c) for c in cycles
    )


def test_a_cycle_is_found(tmp_path, monkeypatch):
    """The finder sees a real cycle, also one through a function-level import, and only it."""
    pkg = tmp_path / "cyclepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text(textwrap.dedent("""
        def later():
            from .sub import c
            return c
    """))
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "free.py").write_text("from . import a\n")  # imports into the cycle, is not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclepkg") == [["cyclepkg.a", "cyclepkg.b", "cyclepkg.sub.c"]]
    assert _describe("cyclepkg", import_cycles("cyclepkg")[0]).count("->") == 3
    (pkg / "sub" / "c.py").write_text("VALUE = 1\n")
    assert import_cycles("cyclepkg") == []


def test_the_train_run_model_imports_no_qt():
    """napari's split: the Train dock's model (widgets/train/model.py) runs without Qt or napari."""
    code = (
        "import sys, napari_semicl.widgets.train.model as m; m.TrainRun(); "
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'qtpy', 'PyQt5', 'PyQt6', 'PySide2', "
        "'PySide6', 'napari', 'superqt', 'magicgui'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
