"""Test setup shared by all test files: import the scripts from the repo root, run offline and headless."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("WANDB_MODE", "offline")  # --track must work without a network
os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for --capture-video
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: no oversubscription on 2 cores
