r"""Learning curves of several ppo_atari.py runs side by side (e.g. float32 vs bfloat16, same seed).

Reads `charts/episodic_return` (full-game, unclipped score) from each run's TensorBoard events,
also of runs still in progress, or from the `curves.csv` that run_benchmark.py wrote for a run, and
writes `<out>/curves.csv`, `<out>/curves.png` (moving average of 50 games) and `<out>/table.md`: the
mean score of the games that ended in each window of steps.

    python benchmarks/atari_compare_curves.py --out benchmarks/results/atari_breakout_2m \
        --runs fp32=benchmarks/results/atari_breakout_2m/runs/<run> \
               bf16=benchmarks/results/atari_breakout_2m_bf16/runs/<run>
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from run_benchmark import read_episodic_returns  # the script's own folder is on sys.path


def read_curve(path: Path) -> list[tuple[int, float]]:
    """(step, score) of each finished game: from a run folder, or from run_benchmark.py's curves.csv (one run)."""
    if path.is_dir():
        return read_episodic_returns(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    runs = {(row["env_id"], row["seed"]) for row in rows}
    if len(runs) > 1:  # the curves of several runs would mix into one
        raise SystemExit(f"error: {path} holds {len(runs)} runs ({sorted(runs)}); give a run folder instead")
    return [(int(row["global_step"]), float(row["episodic_return"])) for row in rows]


def window_means(curve, window: int, last_step: int) -> list[float | None]:
    means = []
    for start in range(0, last_step, window):
        scores = [r for s, r in curve if start < s <= start + window]
        means.append(sum(scores) / len(scores) if scores else None)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="label=run_dir or label=curves.csv ...")
    parser.add_argument("--window", type=int, default=250_000, help="steps per table row")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    curves = {}
    for item in args.runs:
        label, run_dir = item.split("=", 1)
        curves[label] = read_curve(Path(run_dir))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "global_step", "episodic_return"])
        for label, curve in curves.items():
            writer.writerows([label, step, value] for step, value in curve)

    last_step = max((curve[-1][0] for curve in curves.values() if curve), default=0)
    table = {label: window_means(curve, args.window, last_step) for label, curve in curves.items()}
    lines = ["| steps | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for i in range(len(next(iter(table.values())))):
        cells = [f"{t[i]:.1f}" if t[i] is not None else "" for t in table.values()]
        lines.append(f"| {i * args.window:,}-{(i + 1) * args.window:,} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        returns = [r for _, r in curve]
        smoothed = [
            sum(returns[max(0, i - 49) : i + 1]) / len(returns[max(0, i - 49) : i + 1]) for i in range(len(returns))
        ]
        ax.plot([s for s, _ in curve], smoothed, label=f"{label} ({len(curve)} games)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("full-game score (moving average of 50)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'table.md'}")


if __name__ == "__main__":
    main()
