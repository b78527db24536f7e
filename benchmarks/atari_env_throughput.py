r"""Raw environment throughput of ppo_atari.py's two env paths: random actions, no network.

This is the ceiling for training SPS: the rollout phase can only be slower. Each path is built by
ppo_atari.make_vector_env (the very preprocessing training uses) and stepped with uniform random
actions; one warm-up second is not counted. Prints one JSON line per path and writes
`<out>/results.json`.

    nice -n 15 python benchmarks/atari_env_throughput.py --num-envs 8 --seconds 20 \
        --out benchmarks/results/atari_env_throughput
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo_atari as pa  # noqa: E402


def measure(backend: str, env_id: str, num_envs: int, seconds: float) -> dict:
    envs = pa.make_vector_env(env_id, num_envs, backend)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    n = envs.single_action_space.n

    def run(duration: float) -> int:
        steps, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            envs.step(rng.integers(0, n, num_envs))
            steps += num_envs
        return steps

    run(1.0)  # warm-up: caches, first resets
    start = time.perf_counter()
    steps = run(seconds)
    elapsed = time.perf_counter() - start
    envs.close()
    return {"backend": backend, "env_id": env_id, "num_envs": num_envs, "steps": steps,
            "seconds": round(elapsed, 2), "sps": round(steps / elapsed, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backends", nargs="+", default=["ale_vector", "gymnasium"])
    parser.add_argument("--out", default="benchmarks/results/atari_env_throughput")
    args = parser.parse_args()
    results = []
    for backend in args.backends:
        results.append(measure(backend, args.env_id, args.num_envs, args.seconds))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
