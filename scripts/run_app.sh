#!/usr/bin/env bash
# Runs the app (README: "run the app"):
#   bash scripts/run_app.sh [args...]
# Installs torch and napari-semicl into the current Python (see scripts/install.sh). Then:
# - with a display ($DISPLAY or $WAYLAND_DISPLAY set, or macOS): opens napari with the sample
#   volume and the plugin's Train and Export docks, opened through napari's Plugins mechanism
#   (viewer.window.add_plugin_dock_widget("napari-semicl", ...), as Plugins > napari-semicl does:
#   python -m napari_semicl.widgets.launch [args...]);
# - without one: the headless loop, `napari-semicl demo --out "${OUT_DIR:-./semicl_out}" [args...]`
#   (sample image, a few revealed slices, train, predict, evaluate); it ends by printing where
#   the mask went.
# Force the headless loop on a desktop with: DISPLAY= WAYLAND_DISPLAY= bash scripts/run_app.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/install.sh
source scripts/install.sh

semicl_install_python

has_display=0
if [[ -n "${DISPLAY:-}" || -n "${WAYLAND_DISPLAY:-}" || "$(uname -s)" == "Darwin" ]]; then
    has_display=1
fi

if [[ $has_display -eq 1 ]]; then
    if ! install_gui_system_packages; then
        semicl_log "warning: some GUI system libraries are missing (see above); napari may not start."
    fi
    semicl_log "opening napari with the napari-semicl docks"
    semicl_run "$SEMICL_PY" -m napari_semicl.widgets.launch "$@"
    exit $?
fi

out_dir="${OUT_DIR:-./semicl_out}"
semicl_log "no display: headless demo into $out_dir"
cli="$(semicl_scripts_dir)/napari-semicl"
[[ -x "$cli" ]] || cli="$(command -v napari-semicl || echo napari-semicl)"
if semicl_dry_run; then
    semicl_run "$cli" demo --out "$out_dir" "$@"
    exit 0
fi

# The demo prints its last line as "mask written to <path>".
exec "$cli" demo --out "$out_dir" "$@"
