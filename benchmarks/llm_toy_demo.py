"""The reward-hacking demonstration of ppo_llm_toy.py, and gae vs grpo vs rloo at equal samples.

For each seed, one run of the script with its defaults trains the SFT model and the reward model
(and PPO with the default beta and gae); every other configuration reuses those two stages through
--sft-checkpoint / --reward-model-checkpoint, so all configurations of a seed optimize the same
proxy from the same start and sample the same number of responses. Each run is a separate process
of the script itself, exactly what a user runs, one at a time.

    python benchmarks/llm_toy_demo.py --seeds 1 2 3 --out benchmarks/results/llm_toy

Writes <out>/results.csv (one row per run), <out>/curves.csv (every PPO iteration of every run),
<out>/curves.png (proxy reward, gold reward, validity and KL over training, mean over seeds) and
<out>/samples.json (texts after PPO); prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "ppo_llm_toy.py"
DEFAULT_BETA = 0.2  # ppo_llm_toy.Args.kl_coef (not imported: the script is run as a user runs it)


def configurations(small_betas: list[float]) -> list[tuple[str, list[str]]]:
    """(name, extra flags); the first one is the script's default run and trains all stages."""
    return [
        (f"gae_beta{DEFAULT_BETA}", []),
        ("gae_beta0", ["--kl-coef", "0"]),
        *[(f"gae_beta{beta}", ["--kl-coef", str(beta)]) for beta in small_betas],
        (f"grpo_beta{DEFAULT_BETA}", ["--advantage-estimator", "grpo"]),
        (f"rloo_beta{DEFAULT_BETA}", ["--advantage-estimator", "rloo"]),
    ]


def run_one(name: str, flags: list[str], seed: int, out: Path, stages: Path | None) -> dict:
    """Run the script once; return its summary.json (plus the configuration name)."""
    runs_dir = out / "runs"
    exp_name = f"demo_{name}"
    command = [sys.executable, str(SCRIPT), "--seed", str(seed), "--exp-name", exp_name,
               "--runs-dir", str(runs_dir), *flags]  # fmt: skip
    if stages is not None:
        command += ["--sft-checkpoint", str(stages / "sft.pt"),
                    "--reward-model-checkpoint", str(stages / "reward_model.pt")]  # fmt: skip
    log_path = out / "logs" / f"{name}__{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    wall = time.time() - start
    run_dir = max(runs_dir.glob(f"{exp_name}__{seed}__*"), key=lambda p: p.stat().st_mtime)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update({"config": name, "command": " ".join(command[1:]), "process_wall_s": wall})
    return summary


def result_row(summary: dict) -> dict:
    sft, final = summary["sft"], summary["final"]
    row = {"config": summary["config"], "seed": summary["seed"],
           "estimator": summary["advantage_estimator"], "kl_coef": summary["kl_coef"]}  # fmt: skip
    for key in ("proxy", "gold", "validity"):
        row[f"sft_{key}"] = round(sft[key], 4)
    for key in ("proxy", "gold", "validity", "eos_rate", "response_length", "distinct_2",
                "kl_k1", "kl_k3", "kl_exact"):  # fmt: skip
        row[f"final_{key}"] = round(final[key], 4)
    row.update({
        "episodes": summary["episodes"],
        "wall_time_s": round(summary["wall_time_s"], 1),
        "ppo_time_s": round(summary["ppo_time_s"], 1),
        "sampling_tokens_per_s": round(summary["sampling_tokens_per_s"]),
        "update_tokens_per_s": round(summary["update_tokens_per_s"]),
    })  # fmt: skip
    return row


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score", "proxy reward (RM score)"), ("gold", "gold reward"),
              ("validity", "validity rate"), ("kl", "KL to reference (k1, nats/response)")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    configs = list(dict.fromkeys(row["config"] for row in curves))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for config in configs:
            rows = [r for r in curves if r["config"] == config]
            episodes = sorted({r["episode"] for r in rows})
            means = [
                sum(r[key] for r in rows if r["episode"] == e) / sum(1 for r in rows if r["episode"] == e)
                for e in episodes
            ]
            ax.plot(episodes, means, label=config, linewidth=1.2)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("responses sampled")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("ppo_llm_toy.py: per-iteration rollout statistics, mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--small-betas", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "llm_toy"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    rows, curves, samples = [], [], {}
    for seed in args.seeds:
        stages = None
        for name, flags in configurations(args.small_betas):
            summary = run_one(name, flags, seed, out, stages)
            if stages is None:  # the default run trained the SFT model and the reward model
                stages = Path(summary["run_dir"])
            row = result_row(summary)
            rows.append(row)
            print(json.dumps(row), flush=True)
            for record in summary["history"]:
                curves.append({"config": name, "seed": seed, **record})
            samples[f"{name}__seed{seed}"] = {
                "command": summary["command"],
                "before": summary["samples_before"],
                "after": summary["samples_after"],
            }
            write_csv(out / "results.csv", rows)  # rewritten after every run: partial results
    write_csv(out / "curves.csv", curves)
    (out / "samples.json").write_text(json.dumps(samples, indent=2))
    plot(curves, out / "curves.png")
    print(f"wrote {out / 'results.csv'}, {out / 'curves.csv'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
