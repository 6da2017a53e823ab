"""Every third-party package the code imports is declared in pyproject's [project] dependencies.

A package that only arrives through another one (scipy through scikit-image, say) can vanish
when that one changes its own requirements; importing it is a promise to declare it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

import napari_semicl

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

PACKAGE = pathlib.Path(napari_semicl.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"

#: Import names whose distribution is named otherwise.
DISTRIBUTION_OF = {
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "yaml": "PyYAML",
    "PIL": "Pillow",
    "cv2": "opencv-python",
    "PyQt5": "PyQt5",
    "qtpy": "QtPy",
    "imageio": "imageio",
    "zarr": "zarr",
}


def _normalise(name: str) -> str:
    """PEP 503 name: case and the separators ``-_.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _guarded_by_import_error(node: ast.AST, parents: dict) -> bool:
    """Whether ``node`` lies in a ``try`` whose handlers catch ImportError (an optional import)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if any(isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"} for n in names):
                    return True
    return False


def imported_top_level_names(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """Top-level names of the absolute imports in every module (functions' lazy imports included),
    with the modules importing each; imports guarded by ``except ImportError`` are left out."""
    found: dict[str, set[str]] = {}
    for module in sorted(package.rglob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if _guarded_by_import_error(node, parents):
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(module.relative_to(package.parent)))
    return found


def third_party(names: dict[str, set[str]]) -> dict[str, set[str]]:
    own = PACKAGE.name
    return {n: mods for n, mods in names.items()
            if n != own and n != "__future__" and n not in sys.stdlib_module_names}


def declared_distributions() -> set[str]:
    with open(PYPROJECT, "rb") as fh:
        project = tomllib.load(fh)["project"]
    return {_normalise(re.split(r"[\s<>=!~;\[(]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def test_the_scan_sees_imports():
    names = third_party(imported_top_level_names())
    assert {"torch", "numpy", "skimage", "qtpy"} <= set(names)  # module-level and lazy ones
    assert "napari_semicl" not in names and "json" not in names


def test_optional_imports_are_not_counted(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\nimport numpy as np\n"
        "def f():\n    from skimage.filters import gaussian\n"
        "try:\n    import openslide\nexcept ImportError:\n    openslide = None\n"
    )
    assert set(third_party(imported_top_level_names(pkg))) == {"numpy", "skimage"}


def test_every_imported_package_is_declared():
    declared = declared_distributions()
    missing = {}
    for name, modules in sorted(third_party(imported_top_level_names()).items()):
        dist = DISTRIBUTION_OF.get(name, name)
        if _normalise(dist) not in declared:
            missing[dist] = sorted(modules)
    assert not missing, (
        "imported but not declared in pyproject.toml [project] dependencies: "
        + "; ".join(f"{dist} (imported by {', '.join(mods)})" for dist, mods in missing.items())
        + ". Declare them with a lower bound, or stop importing them."
    )


def test_the_installed_versions_satisfy_the_declared_bounds():
    """The lower bounds are real: what is installed here meets them (a typo'd bound fails)."""
    packaging_version = pytest.importorskip("packaging.version")
    packaging_requirements = pytest.importorskip("packaging.requirements")
    with open(PYPROJECT, "rb") as fh:
        specs = tomllib.load(fh)["project"]["dependencies"]
    for spec in specs:
        req = packaging_requirements.Requirement(spec)
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert req.specifier.contains(packaging_version.Version(installed), prereleases=True), (
            f"{req.name} {installed} is installed but pyproject asks for {req.specifier}"
        )
