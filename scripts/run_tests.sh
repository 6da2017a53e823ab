#!/usr/bin/env bash
# Runs the whole test suite (README: "run the tests"):
#   bash scripts/run_tests.sh [pytest args...]
# Installs torch and napari-semicl[testing] into the current Python (see scripts/install.sh),
# installs Xvfb/Mesa/Qt system libraries when missing, then runs pytest under Xvfb (GUI tests
# need OpenGL; QT_QPA_PLATFORM=offscreen has none) and the import-linter contracts.
# Exit status: pytest's when it fails, else lint-imports'.
# SEMICL_QT_API=pyqt6 runs the tests on PyQt6 (installed beside PyQt5 when missing; QT_API and
# PYTEST_QT_API set to pyqt6); unset or pyqt5, PyQt5 as always. CI leaves it unset.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/install.sh
source scripts/install.sh

start=$SECONDS
semicl_install_python
case "${SEMICL_QT_API:-pyqt5}" in
    pyqt5) export QT_API=pyqt5 PYTEST_QT_API=pyqt5 ;;
    pyqt6)
        semicl_install_pyqt6 || exit 1
        export QT_API=pyqt6 PYTEST_QT_API=pyqt6
        ;;
    *) semicl_log "error: SEMICL_QT_API must be pyqt5 or pyqt6, got '$SEMICL_QT_API'"; exit 2 ;;
esac
semicl_log "Qt binding: $QT_API"
if ! install_gui_system_packages; then
    semicl_log "error: the GUI tests need Xvfb, Mesa and Qt's xcb libraries (see above); not skipping them."
    exit 1
fi
semicl_log "setup done in $((SECONDS - start)) s"

if semicl_dry_run; then
    semicl_log "dry-run: would run pytest -ra $* under xvfb-run, then lint-imports"
    exit 0
fi

scripts_dir="$(semicl_scripts_dir)"
lint_imports="$scripts_dir/lint-imports"
[[ -x "$lint_imports" ]] || lint_imports="$(command -v lint-imports || true)"

pytest_cmd=("$SEMICL_PY" -m pytest -ra "$@")
pytest_rc=0
if [[ "$(uname -s)" == "Darwin" ]]; then
    "${pytest_cmd[@]}" || pytest_rc=$?
else
    # Xvfb with GLX through Mesa's software renderer; xvfb-run returns the command's status.
    export QT_QPA_PLATFORM=xcb
    unset WAYLAND_DISPLAY
    xvfb-run -a -s "-screen 0 1600x1000x24 +extension GLX" "${pytest_cmd[@]}" || pytest_rc=$?
fi

lint_rc=0
if [[ -z "$lint_imports" ]]; then
    semicl_log "error: lint-imports not found (import-linter is in the [testing] extra)"
    lint_rc=1
else
    semicl_log "import-linter contracts:"
    "$lint_imports" --no-cache --no-logo || lint_rc=$?
fi

semicl_log "pytest exit $pytest_rc, lint-imports exit $lint_rc, total $((SECONDS - start)) s"
if [[ $pytest_rc -ne 0 ]]; then exit "$pytest_rc"; fi
exit "$lint_rc"
