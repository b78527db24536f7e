"""Where ppo_continuous.py's time goes: seconds per iteration in collect_rollout, compute_gae and update_policy.

Each given copy of the script (e.g. the committed one and an older one from `git show`) is imported in a
fresh process and its own three ALGORITHM functions are timed at the default settings, one torch thread.
The copies run alternately (A B A B) so that a change in the machine's speed hits them alike. The first
iteration is not counted (allocations, caches). Also printed: a checksum of the weights after the last
update, equal for two copies that compute the same numbers.

    git show HEAD~3:ppo_continuous.py > /tmp/old/ppo_continuous.py
    python benchmarks/profile_phases.py --scripts /tmp/old/ppo_continuous.py ppo_continuous.py --repeat 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import importlib.util, json, sys, time
import numpy as np, torch
spec = importlib.util.spec_from_file_location("ppo_under_test", sys.argv[1])
ppo = sys.modules["ppo_under_test"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(ppo)
env_id, iterations = sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(1)
args = ppo.Args(env_id=env_id)
envs = ppo.make_vector_env(env_id, args.num_envs)
obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
agent = ppo.Agent(obs_dim, action_dim)
optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
obs_normalizer, reward_scaler = ppo.ObservationNormalizer((obs_dim,)), ppo.RewardScaler(args.num_envs, args.gamma)
next_obs = obs_normalizer(envs.reset(seed=1)[0])
seconds = {"rollout": 0.0, "gae": 0.0, "update": 0.0}
for iteration in range(iterations + 1):
    t0 = time.perf_counter()
    rollout, next_obs = ppo.collect_rollout(envs, agent, obs_normalizer, reward_scaler, next_obs, args.num_steps)
    t1 = time.perf_counter()
    advantages, returns = ppo.compute_gae(
        rollout.rewards, rollout.values, rollout.next_values, rollout.terminations, rollout.episode_ends,
        args.gamma, args.gae_lambda,
    )
    t2 = time.perf_counter()
    ppo.update_policy(agent, optimizer, rollout, advantages, returns, args)
    t3 = time.perf_counter()
    if iteration > 0:
        for key, value in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
            seconds[key] += value / iterations
checksum = sum(float(p.double().sum()) for p in agent.parameters())
print(json.dumps({**seconds, "sps": args.batch_size / sum(seconds.values()), "checksum": checksum}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", required=True, help="copies of ppo_continuous.py to compare")
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per run (after one warm-up)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each copy, alternating")
    parser.add_argument("--out", help="a JSON file for all runs")
    options = parser.parse_args()

    runs: dict[str, list[dict]] = {script: [] for script in options.scripts}
    for repeat in range(1, options.repeat + 1):
        for script in options.scripts:
            command = [sys.executable, "-W", "ignore", "-c", CHILD, str(Path(script).resolve())]
            child = subprocess.run([*command, options.env_id, str(options.iterations)], capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{script} failed:\n{child.stderr[-2000:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            runs[script].append(result)
            phases = "  ".join(f"{key} {result[key]:.3f} s" for key in ("rollout", "gae", "update"))
            print(f"run {repeat} {script}: {phases}  ({result['sps']:.0f} SPS)  checksum {result['checksum']:.10f}")
    print("median seconds per iteration of", options.env_id)
    for script, results in runs.items():
        medians = {key: statistics.median(r[key] for r in results) for key in ("rollout", "gae", "update", "sps")}
        print(f"  {script}: " + "  ".join(f"{key} {value:.3f}" for key, value in medians.items()))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps({"env_id": options.env_id, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
