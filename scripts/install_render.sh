#!/usr/bin/env bash
# Install Mesa's EGL from Debian/Ubuntu packages, which MuJoCo's headless renderer uses (MUJOCO_GL=egl) for
# pmat_mamujoco.py --capture-video. Idempotent: installs only the missing packages.
#   bash scripts/install_render.sh
set -euo pipefail
PACKAGES=(libegl1 libegl-mesa0 libgl1 libopengl0)
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then missing+=("$pkg"); fi
done
if ((${#missing[@]} == 0)); then
    echo "[install_render] all packages already installed: ${PACKAGES[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_render] error: missing ${missing[*]} and no apt-get here: install Mesa's EGL with your package manager"
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "[install_render] installing Debian packages: ${missing[*]}"
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
