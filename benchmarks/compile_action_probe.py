"""Does torch.compile pay for the rollout's per-step action of ppo_continuous.py? (It does not, so --compile leaves it.)

The rollout calls Agent.get_action once per env step at batch 1 (num_envs=1 at the defaults), so a call costs
its fixed overhead, not its arithmetic. Three ways, each in a fresh process, in rounds (A B C A B C ...):
- eager: the script's get_action;
- compiled mean: torch.compile of the actor's MLP, the Gaussian noise added eagerly as in the script;
- compiled action: torch.compile of get_action as a whole (inductor's fallback_random, so that the noise
  comes from torch's own generator and the same seed gives the same actions).
Each process steps Hopper-v4 for --steps steps as the rollout does (action, clip, env step) and times the
action calls apart from the rest; the compile is timed apart. A checksum of the actions shows that the three
ways draw the same actions for the same seed.

    python benchmarks/compile_action_probe.py --out benchmarks/results/compile_action_probe/<date>
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_reference import machine, stack  # noqa: E402

WAYS = ("eager", "compiled mean", "compiled action")

CHILD = """
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import ppo_continuous as ppo
way, env_id, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(1)
envs = ppo.make_vector_env(env_id, 1)
agent = ppo.Agent(envs.single_observation_space.shape[0], envs.single_action_space.shape[0])
low, high = envs.single_action_space.low, envs.single_action_space.high
get_action, compile_seconds = agent.get_action, 0.0
if way != "eager":
    start = time.perf_counter()
    if way == "compiled mean":
        mean_fn = torch.compile(agent.actor_mean, dynamic=False)
        def get_action(obs):
            mean = mean_fn(obs)
            return mean + agent.actor_logstd.exp() * torch.randn_like(mean)
    else:
        import torch._inductor.config
        torch._inductor.config.fallback_random = True  # torch's generator: the eager way's noise
        get_action = torch.compile(agent.get_action, dynamic=False)
    with torch.no_grad():
        get_action(torch.zeros(1, envs.single_observation_space.shape[0]))
    compile_seconds = time.perf_counter() - start
obs = envs.reset(seed=1)[0].astype(np.float32)
torch.manual_seed(2)
action_seconds, checksum, start = 0.0, 0.0, time.perf_counter()
with torch.no_grad():
    for step in range(steps):
        t0 = time.perf_counter()
        action = get_action(torch.as_tensor(obs))
        action_seconds += time.perf_counter() - t0
        checksum += float(action.sum()) if step < 256 else 0.0
        obs = envs.step(np.clip(action.numpy(), low, high))[0].astype(np.float32)
total = time.perf_counter() - start
print(json.dumps({"action_us": action_seconds / steps * 1e6, "step_us": total / steps * 1e6,
                  "compile_s": compile_seconds, "checksum": round(checksum, 4)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--steps", type=int, default=4096, help="env steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the three ways (A B C A B C ...)")
    parser.add_argument("--out", type=Path, help="folder for results.json (printed only if omitted)")
    args = parser.parse_args()
    runs = []
    for round_number in range(1, args.rounds + 1):
        for way in WAYS:
            command = [sys.executable, "-c", CHILD, str(REPO), way, args.env_id, str(args.steps)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            run = {"round": round_number, "way": way, **json.loads(result.stdout.strip().splitlines()[-1])}
            print(json.dumps(run), flush=True)
            runs.append(run)
    median = {
        way: {key: statistics.median(r[key] for r in runs if r["way"] == way) for key in ("action_us", "step_us")}
        for way in WAYS
    }
    for way in WAYS:
        print(f"{way:16s} action {median[way]['action_us']:7.1f} us   whole step {median[way]['step_us']:7.1f} us")
    checksums = {r["checksum"] for r in runs}
    print("the same actions in every way:", len(checksums) == 1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {
            "env_id": args.env_id, "steps": args.steps, "rounds": args.rounds, "runs": runs, "median": median,
            "same_actions": len(checksums) == 1, "machine": machine(), "stack": stack(sys.executable),
            "command": "python benchmarks/compile_action_probe.py " + " ".join(sys.argv[1:]),
        }  # fmt: skip
        (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
