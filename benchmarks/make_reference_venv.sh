#!/usr/bin/env bash
# A venv, outside this repository, with the stack CleanRL's PPO scripts run on as their users install them,
# for `benchmarks/compare_reference.py --reference-python <venv>/bin/python` (and env_stack_throughput.py).
#
#   benchmarks/make_reference_venv.sh /work/ref-venv-continuous continuous   # ppo_continuous_action.py
#   benchmarks/make_reference_venv.sh /work/ref-venv-atari atari             # ppo_atari.py
#
# Pins (each can be changed by the environment variable named): gymnasium 0.29.1 (CleanRL's pin), MUJOCO=2.3.7
# and NUMPY=1.26.4 (the stack issue 20's figures were measured on; CleanRL's lock file requirements-mujoco.txt
# has mujoco 2.3.3 and numpy 1.24.4), ale-py 0.8.1, shimmy 1.1.0 and opencv-python 4.7.0.72 (CleanRL's
# requirements-atari.txt). TORCH=torch==2.13.0: the torch of our own venv, so both sides of a comparison run the
# same kernels (CleanRL pins 2.4.1; PyPI's Linux build of it is the multi-GB CUDA one). tyro and tensorboard are
# left to pip: neither changes how fast a step runs.
#
# Atari ROMs: ale-py 0.8.1 ships without them, and `pip install "autorom[accept-rom-license]"` fetches them from a
# GitHub gist while it installs (fails offline). The source archive of AutoROM.accept-rom-license on PyPI holds
# the same ROMs as Roms.tar.gz, so they are taken from there and copied in with ale-py's own `ale-import-roms`.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || ! ${2:-continuous} =~ ^(continuous|atari)$ ]]; then
    echo "usage: $0 <venv-dir> [continuous|atari]" >&2
    exit 2
fi
venv=$(realpath -m "$1")
kind=${2:-continuous}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ $venv/ == "$repo"/* ]]; then
    echo "error: $venv is inside the repository $repo; give a folder outside it" >&2
    exit 2
fi

${PYTHON:-python3} -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" "${TORCH:-torch==2.13.0}"  # first, so that nothing below pulls another torch
"${pip[@]}" gymnasium==0.29.1 "numpy==${NUMPY:-1.26.4}" tyro tensorboard
if [[ $kind == continuous ]]; then
    "${pip[@]}" "mujoco==${MUJOCO:-2.3.7}" "imageio>=2.14.1"  # gymnasium[mujoco] 0.29.1's requirements
    check='import gymnasium as gym; e = gym.make("Hopper-v4"); e.reset(seed=0); e.step(e.action_space.sample())'
else
    "${pip[@]}" ale-py==0.8.1 shimmy==1.1.0 opencv-python==4.7.0.72
    roms=$(mktemp -d)
    trap 'rm -rf "$roms"' EXIT
    "$venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: -d "$roms" \
        AutoROM.accept-rom-license==0.6.1
    tar -xzf "$roms"/*.tar.gz -C "$roms"
    tar -xzf "$roms"/AutoROM.accept-rom-license-*/Roms.tar.gz -C "$roms"
    "$venv/bin/ale-import-roms" "$roms/ROM" >/dev/null
    check='import gymnasium as gym; e = gym.make("BreakoutNoFrameskip-v4"); e.reset(seed=0); e.step(0)'
fi
"$venv/bin/python" -c "$check"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|gymnasium|mujoco|numpy|ale-py|shimmy|opencv-python|tyro|tensorboard) '
echo "ready: $venv/bin/python ($kind)"
