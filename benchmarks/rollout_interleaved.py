"""The rollout (or the update) of copies of ppo_continuous.py timed in one process, alternating copy by copy.

profile_phases.py gives each copy its own process; on a machine whose speed drifts by tens of percent within a
minute, two copies a few percent apart then cannot be told apart. Here every copy is imported into the same
process, gets its own env, agent and normalizers (same seed), and the copies take turns: one collect_rollout of
--steps steps each, --rounds times (A B A B ...). A slow spell then hits neighbouring rollouts of both copies,
and the median of the per-round ratios (first copy's time / each other copy's) is what to read.

Each copy keeps its own torch random state, so copies that compute the same numbers produce the same rollouts:
the script checks that, round by round, and says where they part.

--phase update times update_policy instead: each copy collects one rollout of its default length and computes its
advantages once; every round then restores the copy's weights and Adam state to what they were after that rollout
and times one update on it, so that each round is the same update (a copy's optimizer is built here as train()
builds it: Adam, eps 1e-5, fused; a change to that line of train() is not seen). The checksum is the sum of the
weights after the update.

    git show HEAD:ppo_continuous.py > /tmp/a/ppo_continuous.py   # and edit a second copy
    python benchmarks/rollout_interleaved.py --scripts /tmp/a/ppo_continuous.py /tmp/b/ppo_continuous.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch


def load_copy(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", required=True, help="two or more copies of ppo_continuous.py")
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--phase", choices=("rollout", "update"), default="rollout", help="what to time")
    parser.add_argument("--steps", type=int, default=1024, help="env steps per rollout (--phase rollout)")
    parser.add_argument("--rounds", type=int, default=40, help="rollouts (or updates) of each copy, alternating")
    parser.add_argument("--out", help="a JSON file for the timings")
    options = parser.parse_args()
    if len(options.scripts) < 2:
        sys.exit("error: --scripts needs two or more copies to compare")
    if len({Path(path).resolve() for path in options.scripts}) < len(options.scripts):
        sys.exit("error: --scripts names one file twice: give each copy its own file")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    copies = {}
    for index, path in enumerate(options.scripts):
        ppo = load_copy(str(Path(path).resolve()), f"ppo_copy_{index}")
        torch.manual_seed(1)
        args = ppo.Args(env_id=options.env_id)  # the copy's own defaults
        envs = ppo.make_vector_env(options.env_id, args.num_envs)
        obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
        agent = ppo.Agent(obs_dim, action_dim)
        obs_normalizer = ppo.ObservationNormalizer((obs_dim,))
        reward_scaler = ppo.RewardScaler(args.num_envs, args.gamma)
        next_obs = obs_normalizer(envs.reset(seed=1)[0])
        copies[path] = {"ppo": ppo, "envs": envs, "agent": agent, "obs_normalizer": obs_normalizer,
                        "reward_scaler": reward_scaler, "next_obs": next_obs, "rng": torch.get_rng_state()}  # fmt: skip
        if options.phase == "update":
            c = copies[path]
            c["args"] = args
            c["optimizer"] = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
            c["rollout"], _ = ppo.collect_rollout(envs, agent, obs_normalizer, reward_scaler, next_obs, args.num_steps)
            r = c["rollout"]
            c["advantages"], c["returns"] = ppo.compute_gae(
                r.rewards, r.values, r.next_values, r.terminations, r.episode_ends, args.gamma, args.gae_lambda
            )
            ppo.update_policy(agent, c["optimizer"], r, c["advantages"], c["returns"], args)  # Adam's state exists
            c["saved"] = copy.deepcopy((agent.state_dict(), c["optimizer"].state_dict()))
            c["rng"] = torch.get_rng_state()
    steps = options.steps if options.phase == "rollout" else args.num_steps * args.num_envs  # env steps per timed round

    us_per_step = {path: [] for path in copies}
    first_difference = None
    for round_index in range(options.rounds):
        checksums = []
        for path, c in copies.items():
            torch.set_rng_state(c["rng"])
            if options.phase == "rollout":
                start = time.perf_counter()
                rollout, c["next_obs"] = c["ppo"].collect_rollout(
                    c["envs"], c["agent"], c["obs_normalizer"], c["reward_scaler"], c["next_obs"], options.steps
                )
                us_per_step[path].append((time.perf_counter() - start) / steps * 1e6)
                c["rng"] = torch.get_rng_state()
                checksums.append(float(rollout.actions.double().sum() + rollout.rewards.double().sum()))
            else:  # the same update every round: from the saved weights, Adam state and random state
                c["agent"].load_state_dict(c["saved"][0])
                c["optimizer"].load_state_dict(c["saved"][1])
                start = time.perf_counter()
                c["ppo"].update_policy(
                    c["agent"], c["optimizer"], c["rollout"], c["advantages"], c["returns"], c["args"]
                )
                us_per_step[path].append((time.perf_counter() - start) / steps * 1e6)
                checksums.append(float(sum(p.double().sum() for p in c["agent"].parameters())))
        if first_difference is None and len(set(checksums)) > 1:
            first_difference = round_index

    first = options.scripts[0]
    summary = {}
    for path, times in us_per_step.items():
        ratios = [a / b for a, b in zip(us_per_step[first], times, strict=True)]
        summary[path] = {"median_us_per_step": statistics.median(times), "min_us_per_step": min(times),
                         "ratio_to_first_median": statistics.median(ratios),
                         "ratio_to_first_quartiles": statistics.quantiles(ratios, n=4)}  # fmt: skip
        s = summary[path]
        print(f"{path}: median {s['median_us_per_step']:.1f} us/step (min {s['min_us_per_step']:.1f}); "
              f"first / this, per round: median {s['ratio_to_first_median']:.3f}, quartiles "
              + ", ".join(f"{q:.3f}" for q in s["ratio_to_first_quartiles"]))  # fmt: skip
    what = "rollouts" if options.phase == "rollout" else "weights after the update"
    print(
        f"the same {what} in every round"
        if first_difference is None
        else f"{what} differ from round {first_difference}"
    )
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join(["python", *sys.argv]), "env_id": options.env_id, "phase": options.phase,
                  "steps": steps, "rounds": options.rounds, "same_rollouts": first_difference is None,
                  "first_difference_round": first_difference, "us_per_step": us_per_step,
                  "summary": summary}  # fmt: skip
        Path(options.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
