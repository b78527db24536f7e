"""How many torch threads should ppo_atari.py's rollout use beside ale-py's emulator threads?

On the ale_vector path every env steps in a C++ thread of its own, right after each forward pass of the policy,
and torch's idle threads spin on their cores for a while after each parallel op. `Run.rollout_threads` gives torch
only the cores the emulators leave free (at least one) while the rollout runs, and all of them back for the
update. This times `collect_rollout` both ways in one process, rounds taking turns (A B, then B A, ...), the same
envs and weights throughout, and reports the median of the per-round ratios (all threads / the rollout's threads)
with its quartiles: a whole run's SPS swings too much on these machines to resolve a few percent. That both ways
give bitwise the same rollout is a test (tests/test_atari.py). A CPU with AVX2 only, emulated: --float32 with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment.

    python benchmarks/atari_rollout_threads.py --rounds 30 --out benchmarks/results/atari_rollout_threads/<date>
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from compare_reference import machine, stack  # noqa: E402

import ppo_atari as pa  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    parser.add_argument("--num-envs", type=int, default=pa.Args.num_envs)
    parser.add_argument("--num-steps", type=int, default=pa.Args.num_steps)
    parser.add_argument("--rounds", type=int, default=30)
    float32 = "float32 forward passes, as --no-bf16 (the default where the CPU has no native bfloat16)"
    parser.add_argument("--float32", action="store_true", help=float32)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json (default: print only)")
    options = parser.parse_args()
    if options.rounds < 2:
        parser.error("--rounds must be 2 or more: the order of the two ways alternates")

    torch.set_num_threads(pa.cores_per_process())  # what a default run has
    all_threads = torch.get_num_threads()
    envs = pa.make_vector_env(options.env_id, options.num_envs, "ale_vector")
    args = pa.Args(env_id=options.env_id, num_envs=options.num_envs, env_backend="ale_vector")
    args = dataclasses.replace(args, bf16=False) if options.float32 else args
    run = SimpleNamespace(envs=envs, args=args, device=torch.device("cpu"))  # what Run.rollout_threads reads
    with pa.Run.rollout_threads(run):
        rollout_threads = torch.get_num_threads()
    torch.manual_seed(1)
    agent = pa.Agent(int(envs.single_action_space.n), args.channels_last, args.bf16)
    next_obs = torch.as_tensor(envs.reset(seed=1)[0])
    pa.collect_rollout(envs, agent, next_obs, options.num_steps)  # warm-up: first-call allocations

    seconds = {"all": [], "rollout_threads": []}
    for round_index in range(options.rounds):
        for way in ("all", "rollout_threads") if round_index % 2 == 0 else ("rollout_threads", "all"):
            torch.set_num_threads(all_threads)
            start = time.perf_counter()
            with pa.Run.rollout_threads(run) if way == "rollout_threads" else contextlib.nullcontext():
                _, next_obs = pa.collect_rollout(envs, agent, next_obs, options.num_steps)
            seconds[way].append(time.perf_counter() - start)
        ratio = seconds["all"][-1] / seconds["rollout_threads"][-1]
        print(f"round {round_index + 1}: all {all_threads} threads {seconds['all'][-1]:.3f} s, "
              f"{rollout_threads} {seconds['rollout_threads'][-1]:.3f} s, ratio {ratio:.3f}", flush=True)  # fmt: skip
    envs.close()

    ratios = [a / b for a, b in zip(seconds["all"], seconds["rollout_threads"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    result = {
        "env_id": options.env_id, "num_envs": options.num_envs, "num_steps": options.num_steps,
        "rounds": options.rounds, "threads": {"all": all_threads, "rollout_threads": rollout_threads},
        "bf16": args.bf16, "kernels": "AVX2 only" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else "native",
        "seconds_per_rollout": seconds, "ratios": ratios,
        "median_ratio": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]],
        "machine": machine(), "stack": stack(sys.executable), "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "benchmarks/atari_rollout_threads.py", *sys.argv[1:]]),
    }  # fmt: skip
    print(f"median ratio (all {all_threads} threads / {rollout_threads}): {result['median_ratio']:.3f}, "
          f"quartiles {quartiles[0]:.3f} {quartiles[2]:.3f}")  # fmt: skip
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
