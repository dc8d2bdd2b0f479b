#!/usr/bin/env bash
# Install Google Research Football (gfootball 2.10.2) for pmat_grf.py, in one step.
#
#   bash scripts/install_grf.sh            # uses `python` on PATH
#   PYTHON=/path/to/python bash scripts/install_grf.sh
#   GRF_SKIP_APT=1 bash scripts/install_grf.sh   # not Debian/Ubuntu: install the equivalent packages yourself
#
# Why the recipe looks the way it does (see README, section GRF):
#   * gfootball is a source distribution that compiles a C++ engine (5-11 min on 2 cores), so it needs
#     a compiler, cmake, SDL2, OpenGL/EGL and Boost.Python headers from Debian/Ubuntu packages.
#   * `--no-build-isolation`: its setup.py imports psutil, which it does not declare as a build
#     dependency, so pip's isolated build environment fails; we install psutil first and build in place.
#   * `gym==0.23.1`: gfootball uses the old gym API (reset() -> obs); gym >= 0.26 changes reset/step.
#   * `six`: imported by gfootball but not declared as a dependency.
# The script is idempotent: when `import gfootball` already works it exits at once.
set -euo pipefail

PYTHON="${PYTHON:-python}"
start=$(date +%s)
say() { echo "[install_grf] $*"; }

if "$PYTHON" -c "import gfootball.env" >/dev/null 2>&1; then
    say "gfootball is already importable with $PYTHON: nothing to do."
    exit 0
fi

# 1. Debian packages: install only the missing ones (apt-get update only when something is missing).
DEB_PACKAGES=(build-essential cmake pkg-config libgl1-mesa-dev libegl-dev libsdl2-dev libsdl2-image-dev
    libsdl2-ttf-dev libsdl2-gfx-dev libboost-python-dev libboost-system-dev libboost-filesystem-dev
    libboost-thread-dev)
missing=()
if [ "${GRF_SKIP_APT:-0}" != "1" ]; then
    for pkg in "${DEB_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then missing+=("$pkg"); fi
    done
fi
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "error: missing system packages (${missing[*]}) and no apt-get on this machine;"
        say "install their equivalents with your package manager, then re-run with GRF_SKIP_APT=1."
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    say "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
elif [ "${GRF_SKIP_APT:-0}" = "1" ]; then
    say "GRF_SKIP_APT=1: not checking the system packages."
else
    say "all Debian packages already installed."
fi

# 2. pip steps, with the pip of the chosen python.
say "pip install setuptools wheel psutil"
"$PYTHON" -m pip install setuptools wheel psutil
say "pip install --no-build-isolation gfootball==2.10.2 gym==0.23.1 (compiles the engine: 5-11 min on 2 cores the first time, pip caches the wheel)"
"$PYTHON" -m pip install --no-build-isolation "gfootball==2.10.2" "gym==0.23.1"
say "pip install six"
"$PYTHON" -m pip install six

# 3. Check that it really works: build a headless environment and take one step.
"$PYTHON" - <<'PY'
import contextlib, io
with contextlib.redirect_stderr(io.StringIO()):  # old gym's "please upgrade to gymnasium" notice: the pin is deliberate
    import gfootball.env as football_env
env = football_env.create_environment(env_name="academy_3_vs_1_with_keeper", representation="simple115v2",
                                      number_of_left_players_agent_controls=3, render=False)
obs = env.reset()
env.step([0, 0, 0])
env.close()
print("[install_grf] gfootball works, obs shape", obs.shape)
PY
say "done in $(( $(date +%s) - start )) s."
