r"""Raw throughput of a MuJoCo env through each layer of the stack: random actions, no network.

Four ways to step the same env, measured alternately (A B C D A B C D ...) so that a change in the machine's
speed hits all alike: `gym.make(id)` (the default wrapper stack: TimeLimit, OrderEnforcing, the env checker),
`gym.make(id, disable_env_checker=True)`, the bare env (`.unwrapped`: no wrapper at all, so no time limit
either) and ppo_continuous.make_vector_env (what training steps, one env). Every way resets when an episode
ends and steps the same pre-drawn uniform random actions; a warm-up not counted precedes each run. Prints one
JSON line per run, the median steps/s of each way, and writes `<out>/results.json` with the versions of
gymnasium, MuJoCo and numpy. Runs in any venv: ours, or the reference's pins (benchmarks/make_reference_venv.sh),
where a way that cannot be built there (make_vector_env needs gymnasium 1.x) is skipped with its reason.

    nice -n 15 python benchmarks/env_stack_throughput.py --env-id Hopper-v4 --steps 20000 --repeat 3 \
        --out benchmarks/results/env_stack_throughput/ours
    /work/ref-venv-continuous/bin/python benchmarks/env_stack_throughput.py --env-id Hopper-v4 --steps 20000 \
        --repeat 3 --out benchmarks/results/env_stack_throughput/reference_pins
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compare_reference import machine  # noqa: E402


def make_vector_env(env_id: str):
    import ppo_continuous

    return ppo_continuous.make_vector_env(env_id, 1)


WAYS = {
    "make": lambda env_id: gym.make(env_id),
    "make_no_checker": lambda env_id: gym.make(env_id, disable_env_checker=True),
    "unwrapped": lambda env_id: gym.make(env_id).unwrapped,
    "make_vector_env": make_vector_env,
}


def run(env, actions: np.ndarray, steps: int, vector: bool) -> float:
    """Seconds for `steps` steps of env with the given actions (cycled), resetting at every episode end."""
    start = time.perf_counter()
    for i in range(steps):
        if vector:  # the vector env resets itself (SAME_STEP autoreset)
            env.step(actions[i % len(actions)][None])
        else:
            _, _, terminated, truncated, _ = env.step(actions[i % len(actions)])
            if terminated or truncated:
                env.reset()
    return time.perf_counter() - start


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--steps", type=int, default=20000, help="steps of each run")
    parser.add_argument("--warmup", type=int, default=1000, help="steps before each run, not counted")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each way, alternately")
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--out", default="benchmarks/results/env_stack_throughput")
    args = parser.parse_args()

    envs, skipped = {}, {}
    for way in args.ways:
        try:
            envs[way] = WAYS[way](args.env_id)
        except Exception as e:  # e.g. make_vector_env under gymnasium 0.29 (no autoreset modes)
            skipped[way] = f"{type(e).__name__}: {e}"
            print(f"skipped {way}: {skipped[way]}", flush=True)
    space = gym.make(args.env_id).action_space
    actions = np.random.default_rng(0).uniform(space.low, space.high, (4096, *space.shape)).astype(space.dtype)
    for env in envs.values():
        env.reset(seed=0)

    before = os.getloadavg()
    sps = {way: [] for way in envs}
    for i in range(args.repeat):
        for way, env in envs.items():
            vector = way == "make_vector_env"
            run(env, actions, args.warmup, vector)
            seconds = run(env, actions, args.steps, vector)
            sps[way].append(round(args.steps / seconds, 1))
            print(json.dumps({"run": i + 1, "way": way, "steps": args.steps, "sps": sps[way][-1]}), flush=True)
    medians = {way: statistics.median(values) for way, values in sps.items()}
    for way, value in medians.items():
        print(f"median {way:>16}: {value:8.0f} steps/s")

    result = {
        "env_id": args.env_id, "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat,
        "sps": sps, "median_sps": medians, "skipped": skipped, "python": platform.python_version(),
        "versions": {p: version(p) for p in ("gymnasium", "mujoco", "numpy")}, "machine": machine(),
        "load_average_before": before, "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    print("versions: " + ", ".join(f"{p} {v}" for p, v in result["versions"].items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
