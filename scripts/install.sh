#!/usr/bin/env bash
# Installs napari-semicl and its dependencies into the CURRENT Python interpreter
# (no virtualenv is created: activate your own napari env first if you use one).
#
# Usage:
#   bash scripts/install.sh          # steps 1-2: torch, then `pip install -e ".[testing]"`, then
#                                    # `pyenv rehash` where pyenv is (else the CLI's full path)
#   bash scripts/install.sh --gui    # also the system packages for Xvfb/OpenGL/Qt (apt-get)
#   source scripts/install.sh        # only defines the functions (used by run_app.sh, run_tests.sh)
#
# Environment:
#   PYTHON           interpreter to install into (default: python3)
#   TORCH_INDEX_URL  pip index for the CPU torch build, for machines where PyPI's torch is the
#                    CUDA build, (the CPU wheel index documented on pytorch.org)
#   SEMICL_DRY_RUN=1 print the pip/apt-get commands instead of running them
#   SEMICL_VERBOSE=1 show pip's full output for the package install
#   SEMICL_QT_API=pyqt6  (run_tests.sh) also install PyQt6 (the [pyqt6] extra) and run the GUI
#                    tests on it; PyQt5 stays installed and stays the default binding
#
# Torch policy: an importable torch is always kept. Otherwise, with a working `nvidia-smi`,
# `pip install torch`; without one, `pip install torch==2.13.0` (the CPU build), and the
# install is refused if pip would pick a CUDA build (multi-GB download on a machine that
# cannot use it). Every later pip call is constrained to the installed torch version.

SEMICL_TORCH_CPU_VERSION="${SEMICL_TORCH_CPU_VERSION:-2.13.0}"
SEMICL_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
SEMICL_STAMP="$SEMICL_REPO_ROOT/.install-stamp"

# Debian/Ubuntu packages that PyQt5 5.15's xcb platform plugin, vispy's OpenGL and Xvfb need.
# Each entry: "<check>|<apt package>", where <check> is a shared-library soname (looked up in the
# ldconfig cache), "cmd:<program>" or "dri:swrast" (Mesa's software GL driver).
SEMICL_GUI_REQUIREMENTS=(
    "cmd:Xvfb|xvfb"
    "cmd:xvfb-run|xvfb"
    "cmd:xauth|xauth"
    "dri:swrast|libgl1-mesa-dri"
    "libGL.so.1|libgl1"
    "libGLX_mesa.so.0|libglx-mesa0"
    "libEGL.so.1|libegl1"
    "libglib-2.0.so.0|libglib2.0-0"
    "libgthread-2.0.so.0|libglib2.0-0"
    "libdbus-1.so.3|libdbus-1-3"
    "libfontconfig.so.1|libfontconfig1"
    "libfreetype.so.6|libfreetype6"
    "libX11.so.6|libx11-6"
    "libX11-xcb.so.1|libx11-xcb1"
    "libxcb.so.1|libxcb1"
    "libxcb-glx.so.0|libxcb-glx0"
    "libxcb-icccm.so.4|libxcb-icccm4"
    "libxcb-image.so.0|libxcb-image0"
    "libxcb-keysyms.so.1|libxcb-keysyms1"
    "libxcb-randr.so.0|libxcb-randr0"
    "libxcb-render.so.0|libxcb-render0"
    "libxcb-render-util.so.0|libxcb-render-util0"
    "libxcb-shape.so.0|libxcb-shape0"
    "libxcb-shm.so.0|libxcb-shm0"
    "libxcb-sync.so.1|libxcb-sync1"
    "libxcb-util.so.1|libxcb-util1"
    "libxcb-xfixes.so.0|libxcb-xfixes0"
    "libxcb-xinerama.so.0|libxcb-xinerama0"
    "libxcb-xkb.so.1|libxcb-xkb1"
    "libxkbcommon.so.0|libxkbcommon0"
    "libxkbcommon-x11.so.0|libxkbcommon-x11-0"
)

semicl_log() { printf '[semicl] %s\n' "$*" >&2; }

semicl_dry_run() { [[ "${SEMICL_DRY_RUN:-0}" != "0" && -n "${SEMICL_DRY_RUN:-}" ]]; }

# Runs a command, or only prints it under SEMICL_DRY_RUN=1.
semicl_run() {
    if semicl_dry_run; then
        printf '[semicl] dry-run:' >&2
        printf ' %q' "$@" >&2
        printf '\n' >&2
        return 0
    fi
    "$@"
}

# Resolves $PYTHON (default python3) to an absolute interpreter path in SEMICL_PY.
semicl_pick_python() {
    if [[ -n "${SEMICL_PY:-}" ]]; then return 0; fi
    local candidate="${PYTHON:-python3}"
    if ! command -v "$candidate" >/dev/null 2>&1; then
        semicl_log "error: no Python interpreter '$candidate' (set PYTHON=/path/to/python)"
        return 1
    fi
    SEMICL_PY="$("$candidate" -c 'import sys; print(sys.executable)')" || {
        semicl_log "error: '$candidate' does not run"
        return 1
    }
    "$SEMICL_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        semicl_log "error: $SEMICL_PY is older than Python 3.10"
        return 1
    }
    export SEMICL_PY
}

# Directory holding the interpreter's console scripts (napari-semicl, lint-imports, ...).
semicl_scripts_dir() {
    "$SEMICL_PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'
}

semicl_pip() {
    local extra=()
    if [[ -n "${CI:-}" || ! -t 2 ]]; then extra+=(--progress-bar off); fi
    PIP_NO_INPUT=1 semicl_run "$SEMICL_PY" -m pip install ${extra[@]+"${extra[@]}"} "$@"
}

# Prints the version of the importable torch, or nothing.
semicl_torch_version() {
    "$SEMICL_PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true
}

semicl_has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# Step 1: torch.
semicl_install_torch() {
    semicl_pick_python || return 1
    local version
    version="$(semicl_torch_version)"
    if [[ -n "$version" ]]; then
        semicl_log "torch $version already importable: keeping it"
        SEMICL_TORCH_VERSION="$version"
        return 0
    fi

    if semicl_has_nvidia_gpu; then
        semicl_log "torch missing, NVIDIA GPU found: pip install torch (CUDA build)"
        semicl_pip torch || return 1
    else
        local spec="torch==$SEMICL_TORCH_CPU_VERSION"
        local index_args=()
        if [[ -n "${TORCH_INDEX_URL:-}" ]]; then index_args=(--index-url "$TORCH_INDEX_URL"); fi
        semicl_log "torch missing, no NVIDIA GPU: pip install $spec (CPU build)${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
        semicl_check_torch_is_cpu_build "$spec" ${index_args[@]+"${index_args[@]}"} || return 1
        semicl_pip "$spec" ${index_args[@]+"${index_args[@]}"} || return 1
    fi

    if semicl_dry_run; then
        SEMICL_TORCH_VERSION=""
        return 0
    fi
    version="$(semicl_torch_version)"
    if [[ -z "$version" ]]; then
        semicl_log "error: torch was installed but does not import:"
        "$SEMICL_PY" -c 'import torch' >&2 || true
        return 1
    fi
    semicl_log "torch $version installed"
    SEMICL_TORCH_VERSION="$version"
}

# Asks pip which torch wheel it would pick (metadata only, no download of the wheel) and
# refuses a CUDA build: a "+cu" local version or nvidia-* requirements.
semicl_check_torch_is_cpu_build() {
    local spec="$1"
    shift
    local report
    if ! report="$(PIP_NO_INPUT=1 "$SEMICL_PY" -m pip install --dry-run --no-deps --ignore-installed \
        --only-binary=:all: --quiet --report - "$spec" "$@" 2>/dev/null)"; then
        semicl_log "error: pip cannot resolve $spec here (pip >= 22.2 is needed for the check)."
        semicl_log "       Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu or install a CPU torch first."
        return 1
    fi
    local verdict
    verdict="$(printf '%s' "$report" | "$SEMICL_PY" -c '
import json, sys
report = json.load(sys.stdin)
items = [i for i in report.get("install", []) if i.get("metadata", {}).get("name", "").lower() == "torch"]
if not items:
    print("unknown"); sys.exit()
meta = items[0]["metadata"]
version = meta.get("version", "")
cuda = "+cu" in version or any(r.lower().startswith("nvidia-") for r in meta.get("requires_dist", []) or [])
print(("cuda " if cuda else "cpu ") + version + " " + items[0].get("download_info", {}).get("url", ""))
')"
    case "$verdict" in
        cpu*)
            semicl_log "pip would install: ${verdict#cpu }"
            return 0
            ;;
        *)
            semicl_log "error: pip would install a CUDA torch build (${verdict}) on a machine without an NVIDIA GPU."
            semicl_log "       Refusing the multi-GB download. Point pip at a CPU build, e.g."
            semicl_log "       TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh"
            return 1
            ;;
    esac
}

# Prints the sha256 of pyproject.toml plus the interpreter: the stamp's content.
semicl_stamp_value() {
    "$SEMICL_PY" - "$SEMICL_REPO_ROOT/pyproject.toml" <<'PY'
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(f"{digest} {sys.executable}")
PY
}

# True when napari-semicl is an editable install of THIS checkout in SEMICL_PY.
semicl_is_editable_here() {
    "$SEMICL_PY" - "$SEMICL_REPO_ROOT" <<'PY'
import json, os, sys
from importlib import metadata
from urllib.parse import unquote, urlparse
# Not the repo's own napari_semicl.egg-info (the cwd is on sys.path for `python -`).
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(sys.argv[1])]
try:
    dist = metadata.distribution("napari-semicl")
    info = json.loads(dist.read_text("direct_url.json") or "{}")
except Exception:
    sys.exit(1)
if not info.get("dir_info", {}).get("editable"):
    sys.exit(1)
url = urlparse(info.get("url", ""))
path = os.path.realpath(unquote(url.path))
sys.exit(0 if url.scheme == "file" and path == os.path.realpath(sys.argv[1]) else 1)
PY
}

# Step 2: pip install -e ".[testing]" (skipped when the stamp says nothing changed).
semicl_install_package() {
    semicl_pick_python || return 1
    local want
    want="$(semicl_stamp_value)" || return 1
    # The stamp holds one "<sha256 of pyproject.toml> <interpreter>" line per interpreter.
    if [[ -f "$SEMICL_STAMP" ]] && grep -qxF -- "$want" "$SEMICL_STAMP" && semicl_is_editable_here; then
        semicl_log "napari-semicl: editable install up to date (pyproject.toml unchanged)"
        return 0
    fi
    # Pin torch to what step 1 left, so the resolver can never swap in another (CUDA) build.
    local torch_version="${SEMICL_TORCH_VERSION:-$(semicl_torch_version)}"
    if [[ -z "$torch_version" ]] && semicl_dry_run && ! semicl_has_nvidia_gpu; then
        torch_version="$SEMICL_TORCH_CPU_VERSION"
    fi
    local constraints
    constraints="$(mktemp "${TMPDIR:-/tmp}/semicl-constraints.XXXXXX")"
    if [[ -n "$torch_version" ]]; then
        printf 'torch==%s\n' "$torch_version" >"$constraints"
    fi
    semicl_log "pip install -e \".[testing]\"${torch_version:+ (torch pinned to $torch_version)}"
    local rc=0
    local quiet=(--quiet)
    if [[ -n "${SEMICL_VERBOSE:-}" ]]; then quiet=(); fi
    (cd "$SEMICL_REPO_ROOT" && semicl_pip ${quiet[@]+"${quiet[@]}"} -e ".[testing]" -c "$constraints") || rc=$?
    rm -f "$constraints"
    if [[ $rc -ne 0 ]]; then
        semicl_log "error: pip install -e \".[testing]\" failed (exit $rc)"
        return "$rc"
    fi
    if ! semicl_dry_run; then
        local others=""
        if [[ -f "$SEMICL_STAMP" ]]; then
            others="$(awk -v exe="$SEMICL_PY" '{ i = index($0, " "); if (substr($0, i + 1) != exe) print }' "$SEMICL_STAMP")"
        fi
        printf '%s\n' ${others:+"$others"} "$want" >"$SEMICL_STAMP.tmp.$$"
        mv -f "$SEMICL_STAMP.tmp.$$" "$SEMICL_STAMP"
    fi
}

# After step 2: make the `napari-semicl` script reachable. pyenv only puts a new console script
# on the PATH once its shims are rebuilt (`pyenv rehash`); run that when pyenv is here. If the
# command is still not found, print its full path (and `python -m napari_semicl`, which always
# works). Never fails the install.
semicl_make_cli_reachable() {
    semicl_pick_python || return 1
    if command -v pyenv >/dev/null 2>&1; then
        semicl_run pyenv rehash || semicl_log "warning: pyenv rehash failed"
        hash -r 2>/dev/null || true
    fi
    if semicl_dry_run; then return 0; fi
    local script
    script="$(semicl_scripts_dir)/napari-semicl"
    if command -v napari-semicl >/dev/null 2>&1; then return 0; fi
    if [[ -x "$script" ]]; then
        semicl_log "napari-semicl is not on your PATH; run it as $script"
    else
        semicl_log "napari-semicl script not found in $(semicl_scripts_dir)"
    fi
    semicl_log "or as: $SEMICL_PY -m napari_semicl"
    return 0
}

# Steps 1-2.
semicl_install_python() {
    semicl_install_torch && semicl_install_package && semicl_make_cli_reachable
}

# Optional: PyQt6 beside PyQt5 (the [pyqt6] extra), for SEMICL_QT_API=pyqt6. Its xcb platform
# plugin (Qt >= 6.5) also needs libxcb-cursor, added to the GUI system packages here.
semicl_install_pyqt6() {
    semicl_pick_python || return 1
    SEMICL_GUI_REQUIREMENTS+=("libxcb-cursor.so.0|libxcb-cursor0")
    if "$SEMICL_PY" -c 'import PyQt6.QtWidgets' >/dev/null 2>&1; then
        semicl_log "PyQt6 present"
        return 0
    fi
    semicl_log "pip install \"PyQt6>=6.5\" (the [pyqt6] extra; PyQt5 stays the default binding)"
    semicl_pip --quiet "PyQt6>=6.5" || { semicl_log "error: pip install PyQt6 failed"; return 1; }
}

# Prints the apt packages whose library/program is missing (one per line, unique).
semicl_missing_gui_packages() {
    local ldcache="" ldconfig_bin
    ldconfig_bin="$(command -v ldconfig || true)"
    [[ -z "$ldconfig_bin" && -x /sbin/ldconfig ]] && ldconfig_bin=/sbin/ldconfig
    [[ -n "$ldconfig_bin" ]] && ldcache="$("$ldconfig_bin" -p 2>/dev/null || true)"
    local entry check pkg missing=()
    for entry in "${SEMICL_GUI_REQUIREMENTS[@]}"; do
        check="${entry%%|*}"
        pkg="${entry#*|}"
        case "$check" in
            cmd:*)
                command -v "${check#cmd:}" >/dev/null 2>&1 && continue
                ;;
            dri:*)
                compgen -G "/usr/lib/*/dri/${check#dri:}_dri.so" >/dev/null \
                    || compgen -G "/usr/lib*/dri/${check#dri:}_dri.so" >/dev/null \
                    && continue
                ;;
            *)
                grep -qF -- $'\t'"$check " <<<"$ldcache" && continue
                ;;
        esac
        missing+=("$pkg")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then printf '%s\n' "${missing[@]}" | awk '!seen[$0]++'; fi
}

# Step 3: Xvfb, Mesa and the X/xcb libraries Qt needs, via apt-get, only when missing.
# Returns non-zero when something is missing and cannot be installed here.
semicl_apt() {
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then return 127; fi
        # No password prompt in CI or without a terminal: fail instead of hanging.
        if [[ -n "${CI:-}" || ! -t 0 ]]; then sudo=(sudo -n); else sudo=(sudo); fi
    fi
    semicl_run ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get "$@"
}

install_gui_system_packages() {
    if [[ "$(uname -s)" == "Darwin" ]]; then return 0; fi
    local missing
    missing="$(semicl_missing_gui_packages)"
    if [[ -z "$missing" ]]; then
        semicl_log "GUI system packages present (Xvfb, Mesa, Qt xcb libraries)"
        return 0
    fi
    local pkgs
    mapfile -t pkgs <<<"$missing"
    semicl_log "missing GUI system packages: ${pkgs[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        semicl_log "error: no apt-get here; install the equivalents of: ${pkgs[*]}"
        return 1
    fi
    if [[ "$(id -u)" -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
        semicl_log "error: not root and no sudo; ask an administrator to run:"
        semicl_log "       apt-get update && apt-get install -y --no-install-recommends ${pkgs[*]}"
        return 1
    fi
    local lock=(-o DPkg::Lock::Timeout=300)
    if [[ -z "${SEMICL_APT_UPDATED:-}" ]]; then
        semicl_apt "${lock[@]}" update -q || {
            semicl_log "error: apt-get update failed (as root, or with sudo without a password?)"
            return 1
        }
        SEMICL_APT_UPDATED=1
    fi
    semicl_apt "${lock[@]}" install -y -q --no-install-recommends "${pkgs[@]}" || {
        semicl_log "error: apt-get install failed; run as root: apt-get install -y ${pkgs[*]}"
        return 1
    }
    if ! semicl_dry_run; then
        missing="$(semicl_missing_gui_packages)"
        if [[ -n "$missing" ]]; then
            semicl_log "error: still missing after apt-get install: $(echo $missing)"
            return 1
        fi
    fi
    if semicl_dry_run; then return 0; fi
    semicl_log "GUI system packages installed"
}

# Executed (not sourced): run the steps.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    start=$SECONDS
    semicl_install_python
    if [[ "${1:-}" == "--gui" ]]; then install_gui_system_packages; fi
    semicl_log "install done in $((SECONDS - start)) s"
fi
