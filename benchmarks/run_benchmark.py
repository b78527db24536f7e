r"""Run a training script over envs x seeds; collect returns, evaluation scores, wall time and SPS.

Each run is a separate process of the script itself (exactly what a user runs). After training, the
saved checkpoint is evaluated in a fresh process with `--eval-checkpoint` (frozen normalization
statistics, deterministic actions), so the "evaluation" column measures the saved model, not the
in-memory one. Runs already completed in `<out>` are reused, not trained again. Results go to `<out>/results.csv` (one row per run), `<out>/curves.csv` (every
logged training episode) and `<out>/curves.png`; one JSON line per run is printed.

    python benchmarks/run_benchmark.py --script ppo_continuous.py --env-ids HalfCheetah-v4 Hopper-v4 \
        --seeds 1 2 --total-timesteps 1000000 --parallel 2 --out benchmarks/results/mujoco_1m

With --parallel > 1 each run is limited to one torch thread (OMP_NUM_THREADS=1), so that runs do
not fight over cores; for a speed measurement use --parallel 1 on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def read_episodic_returns(run_dir: Path) -> list[tuple[int, float]]:
    """(global_step, episodic_return) pairs from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "charts/episodic_return" not in accumulator.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in accumulator.Scalars("charts/episodic_return")]


def finished_run(out: Path, exp_name: str, env_id: str, seed: int, total_timesteps: int) -> Path | None:
    """The newest completed run of (env, seed) with this budget in `out`, if any: a benchmark that
    was stopped, or extended with more seeds, does not train again what it already has."""
    for run_dir in sorted((out / "runs").glob(f"{exp_name}__{env_id}__{seed}__*"), reverse=True):
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            batch = summary["global_step"] / max(summary["iterations"], 1)
            if summary["status"] == "completed" and total_timesteps - summary["global_step"] < batch:
                return run_dir
    return None


def run_one(script: str, env_id: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one (env, seed), then evaluate its checkpoint in a fresh process."""
    out = Path(args.out)
    exp_name = f"bench_{Path(script).stem}"
    env = dict(os.environ)
    if args.parallel > 1:
        env["OMP_NUM_THREADS"] = "1"
    log_path = out / "logs" / f"{env_id}__{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(REPO / script), "--env-id", env_id, "--seed", str(seed),
        "--total-timesteps", str(args.total_timesteps), "--runs-dir", str(out / "runs"),
        "--exp-name", exp_name, *args.extra,
    ]  # fmt: skip
    run_dir = finished_run(out, exp_name, env_id, seed, args.total_timesteps)
    if run_dir is None:
        with open(log_path, "w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
        run_dir = finished_run(out, exp_name, env_id, seed, args.total_timesteps)
    summary = json.loads((run_dir / "summary.json").read_text())

    eval_command = [
        sys.executable, str(REPO / script), "--eval-checkpoint", str(run_dir / "checkpoint.pt"),
        "--eval-episodes", str(args.eval_episodes), "--seed", "1000",
    ]  # fmt: skip
    evaluation = subprocess.run(eval_command, capture_output=True, text=True, env=env, check=True)
    eval_line = evaluation.stdout.strip().splitlines()[-1]
    # "<env> (<path>, <steps> steps): return <mean> +- <std> over <n> episodes"
    eval_mean, eval_std = (float(x) for x in eval_line.split("return ")[1].split(" over")[0].split(" +- "))

    curve = read_episodic_returns(run_dir)
    last_100 = [r for _, r in curve[-100:]]
    row = {
        "script": script,
        "env_id": env_id,
        "seed": seed,
        "total_timesteps": summary["global_step"],
        "mean_return_last100": sum(last_100) / len(last_100) if last_100 else float("nan"),
        "eval_return_mean": eval_mean,
        "eval_return_std": eval_std,
        "eval_over_train": eval_mean / (sum(last_100) / len(last_100)) if last_100 else float("nan"),
        "train_wall_time_s": summary["wall_time_s"],
        "sps": summary["sps"],
        "time_env_s": summary.get("time_env_s"),
        "time_inference_s": summary.get("time_inference_s"),
        "time_update_s": summary.get("time_update_s"),
        "run_dir": str(run_dir),
    }
    print(json.dumps(row), flush=True)
    return {"row": row, "curve": curve}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_ids = sorted({r["row"]["env_id"] for r in results})
    fig, axes = plt.subplots(1, len(env_ids), figsize=(6 * len(env_ids), 4), squeeze=False)
    for ax, env_id in zip(axes[0], env_ids, strict=True):
        for result in (r for r in results if r["row"]["env_id"] == env_id):
            steps = [s for s, _ in result["curve"]]
            returns = [r for _, r in result["curve"]]
            window = 20  # moving average over episodes, for readability
            smoothed = [
                sum(returns[max(0, i - window + 1) : i + 1]) / len(returns[max(0, i - window + 1) : i + 1])
                for i in range(len(returns))
            ]
            ax.plot(steps, smoothed, label=f"seed {result['row']['seed']}")
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episodic return (moving average of 20)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="ppo_continuous.py", help="the training script to run")
    parser.add_argument("--env-ids", nargs="+", default=["HalfCheetah-v4", "Hopper-v4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    parser.add_argument("--out", default="benchmarks/results/latest", help="output folder")
    parser.add_argument("extra", nargs="*", help="more flags for the script, after --")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(env_id, seed) for env_id in args.env_ids for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(args.script, *job, args), jobs))

    rows = [r["row"] for r in results]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_id", "seed", "global_step", "episodic_return"])
        for result in results:
            for step, episodic_return in result["curve"]:
                writer.writerow([result["row"]["env_id"], result["row"]["seed"], step, episodic_return])
    plot(results, out / "curves.png")
    print(f"wrote {out / 'results.csv'}, {out / 'curves.csv'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
