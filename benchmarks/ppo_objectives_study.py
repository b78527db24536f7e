"""What each idea of PPO buys, measured with ppo_continuous.py's own runs: the grid of docs/what_ppo_buys.md.

  a. the PPO paper's Table 1 at our scale (arXiv:1707.06347): no clipping or penalty (L^CPI), clip 0.2
     (L^CLIP), adaptive KL penalty d_targ 0.01 and fixed KL penalty beta 1 (L^KLPEN), on HalfCheetah-v4,
     Hopper-v4 and Walker2d-v4, seeds 1 and 2, 1M steps each;
  b. the trust region in practice: the largest ratio and the exact KL of every update of the runs of (a)
     (Engstrom et al. 2020, arXiv:2005.12729, figure 2);
  c. data reuse: 1, 10 and 30 epochs per rollout, with and without clipping, on HalfCheetah-v4;
  d. GAE's lambda: 0, 0.95 and 1 on Hopper-v4;
  e. the code-level details: Engstrom et al.'s "PPO-M" (no reward scaling, no orthogonal init, no learning
     rate annealing, no value clipping) with and without clipping, on Hopper-v4 and Walker2d-v4.
44 runs in all (the 10-epoch, lambda 0.95 and full-detail cells are runs of (a)).

Each run is a process of ppo_continuous.py, exactly what a user runs. A run that finished all its steps
appends one line to `<out>/results.jsonl` (its settings, command, final figures and per-update
statistics); the grid skips every run already there, so a stopped study goes on where it stopped. A run
cut short is started again from nothing, never counted. The report (tables in `<out>/tables.md`, printed
too, and the figures `<out>/*.png`) is made from results.jsonl alone, from whatever runs are done; the same
tables are written into the marked blocks of docs/what_ppo_buys.md (a test checks that they are current).

    python benchmarks/ppo_objectives_study.py --parallel 2 --out benchmarks/results/ppo_objectives
    python benchmarks/ppo_objectives_study.py --report-only --out benchmarks/results/ppo_objectives
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 1_000_000  # 488 rollouts of 2,048 steps: 999,424 steps
ENVS = ("HalfCheetah-v4", "Hopper-v4", "Walker2d-v4")
SEEDS = (1, 2)
EPSILON = 0.2  # the clip range of every run, and the trust region the ratios are measured against

# Settings: name -> the flags that differ from ppo_continuous.py's defaults.
PPO_M = ["--no-norm-reward", "--no-ortho-init", "--no-anneal-lr", "--no-clip-vloss"]
SETTINGS = {
    "none": ["--policy-objective", "none"],
    "clip": [],
    "kl_adaptive": ["--policy-objective", "kl-penalty", "--adaptive-kl", "--kl-target", "0.01"],
    "kl_fixed": ["--policy-objective", "kl-penalty", "--kl-coef", "1"],
    "clip_epochs1": ["--update-epochs", "1"],
    "clip_epochs30": ["--update-epochs", "30"],
    "none_epochs1": ["--policy-objective", "none", "--update-epochs", "1"],
    "none_epochs30": ["--policy-objective", "none", "--update-epochs", "30"],
    "clip_lambda0": ["--gae-lambda", "0"],
    "clip_lambda1": ["--gae-lambda", "1"],
    "ppo_m_clip": PPO_M,
    "ppo_m_none": [*PPO_M, "--policy-objective", "none"],
}
TABLE1 = ("none", "clip", "kl_adaptive", "kl_fixed")
TABLE1_LABELS = {
    "none": "no clipping or penalty", "clip": "clipping, eps = 0.2",
    "kl_adaptive": "adaptive KL, d_targ = 0.01", "kl_fixed": "fixed KL, beta = 1",
}  # fmt: skip
# The PPO paper's Table 1: normalized score averaged over 7 MuJoCo tasks and 3 seeds.
PAPER_TABLE1 = {"none": -0.39, "clip": 0.82, "kl_adaptive": 0.74, "kl_fixed": 0.71}
# Engstrom et al. 2020, about 1M steps (Walker2d, Hopper): PPO, PPO-M, PPO without clipping ("PPO-NoClip").
ENGSTROM = {
    "Walker2d-v4": {"clip": 3292, "ppo_m_clip": 2735, "none": 2867},
    "Hopper-v4": {"clip": 2513, "ppo_m_clip": 2142, "none": 2371},
}
PER_UPDATE = {  # TensorBoard tag -> the record's per-update series
    "losses/ratio_max": "ratio_max", "losses/ratio_min": "ratio_min", "losses/clipfrac": "clipfrac",
    "losses/exact_kl": "exact_kl", "losses/approx_kl": "approx_kl", "losses/entropy": "entropy",
    "losses/explained_variance": "explained_variance", "charts/beta": "beta",
}  # fmt: skip


def grid() -> list[tuple[str, str, int]]:
    """(setting, env, seed) of every run, in the order they are run: all five parts with seed 1 (Table 1
    first), then all with seed 2, so that a study cut short has one seed of everything."""
    runs = []
    for seed in SEEDS:
        runs += [(s, env, seed) for env in ENVS for s in TABLE1]
        runs += [
            (s, "HalfCheetah-v4", seed) for s in ("clip_epochs1", "none_epochs1", "clip_epochs30", "none_epochs30")
        ]
        runs += [(s, "Hopper-v4", seed) for s in ("clip_lambda0", "clip_lambda1")]
        runs += [(s, env, seed) for env in ("Hopper-v4", "Walker2d-v4") for s in ("ppo_m_clip", "ppo_m_none")]
    return runs


def run_key(setting: str, env_id: str, seed: int) -> str:
    return f"{env_id}__{setting}__{seed}"


def read_records(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def runs_to_do(out: Path) -> list[tuple[str, str, int]]:
    """The runs of the grid that results.jsonl does not hold yet, in the grid's order."""
    done = {r["key"] for r in read_records(out)}
    return [run for run in grid() if run_key(*run) not in done]


def work_through(out: Path, args: argparse.Namespace, lock: threading.Lock) -> None:
    """Run the grid's runs that are neither done nor claimed, one after the other. A claim is a file holding the
    pid of the study that runs it, so a second study started later (one more core) shares the grid with this
    one; the claim of a study that was stopped (its pid is gone) is taken over."""
    while True:
        with lock:  # threads of this process take turns at choosing
            run = next((run for run in runs_to_do(out) if claim(out / "claims" / run_key(*run))), None)
        if run is None:
            return
        try:
            run_one(*run, args, lock)
        finally:
            (out / "claims" / run_key(*run)).unlink(missing_ok=True)


def claim(path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        holder = int(path.read_text())
        os.kill(holder, 0)  # raises if no such process
        return False  # a study that is alive runs it
    except (FileNotFoundError, ValueError, ProcessLookupError):
        path.write_text(str(os.getpid()))
        return True


def code_version(script: Path) -> str:
    """The commit the script was run from, with '+changes' if the file differs from it."""
    git = ["git", "-C", str(script.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", script.name]).returncode != 0
    return (commit or "unknown") + ("+changes" if dirty else "")


def per_iteration_series(run_dir: Path) -> dict:
    """From the run's TensorBoard events: each per-update statistic, and the mean episodic return of the
    episodes that finished in each iteration (None where none did), all indexed by iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars("losses/clipfrac")]
    series: dict = {"step": steps}
    for tag, name in PER_UPDATE.items():
        if tag in tags:
            series[name] = [round(e.value, 6) for e in events.Scalars(tag)]
    returns_by_step: dict[int, list[float]] = {}
    for e in events.Scalars("charts/episodic_return"):
        returns_by_step.setdefault(e.step, []).append(e.value)
    series["return"] = [round(statistics.fmean(returns_by_step[s]), 2) if s in returns_by_step else None for s in steps]
    return series


def run_one(setting: str, env_id: str, seed: int, args: argparse.Namespace, lock: threading.Lock) -> None:
    out, key = Path(args.out), run_key(setting, env_id, seed)
    runs_dir = out / "runs" / key
    shutil.rmtree(runs_dir, ignore_errors=True)  # what a run cut short left behind is not counted
    command = [
        sys.executable, str(args.script), "--env-id", env_id, "--seed", str(seed), "--total-timesteps", str(STEPS),
        "--runs-dir", str(runs_dir), "--exp-name", "study", *SETTINGS[setting],
    ]  # fmt: skip
    log_path = out / "logs" / f"{key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summaries = list(runs_dir.glob("*/summary.json"))
    summary = json.loads(summaries[0].read_text()) if summaries else {}
    finished = summary.get("status") == "completed" and summary.get("global_step") == STEPS // 2048 * 2048
    diverged = summary.get("status") == "diverged"  # a result too: the objective failed; counted as it stopped
    if not (finished or diverged):
        print(
            f"{key}: cut short (exit {code.returncode}, {summary.get('status')}), not counted; {log_path}", flush=True
        )
        return
    record = {
        "key": key, "setting": setting, "env_id": env_id, "seed": seed, "flags": SETTINGS[setting],
        "command": " ".join(["python", "ppo_continuous.py", *command[2:]]), "code": code_version(args.script),
        "started": started, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "status": summary["status"], "global_step": summary["global_step"],
        "mean_return_last100": summary["mean_return"], "eval_return_mean": summary.get("eval_return_mean"),
        "eval_return_std": summary.get("eval_return_std"), "wall_time_s": round(summary["wall_time_s"], 1),
        "sps": round(summary["sps"], 1), "per_iteration": per_iteration_series(summaries[0].parent),
    }  # fmt: skip
    with lock, open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{key}: {record['status']} at step {record['global_step']:,}, {record['mean_return_last100']:.1f} "
          f"(last 100 training episodes), {record['wall_time_s'] / 60:.1f} min", flush=True)  # fmt: skip


def random_policy_scores(out: Path) -> dict[str, float]:
    """The mean return of 100 episodes of uniformly random actions per env (the 0 of the normalized score),
    computed once and kept in <out>/random_policy.json."""
    path = out / "random_policy.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    missing = [env_id for env_id in ENVS if env_id not in scores]
    if missing:
        import gymnasium as gym

        for env_id in missing:
            env = gym.make(env_id)
            env.action_space.seed(0)
            returns = []
            for episode in range(100):
                env.reset(seed=episode)
                done, total = False, 0.0
                while not done:
                    _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                    total, done = total + float(reward), terminated or truncated
                returns.append(total)
            env.close()
            scores[env_id] = round(statistics.fmean(returns), 2)
        path.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


# THE REPORT


def by_cell(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        cells.setdefault((r["setting"], r["env_id"]), []).append(r)
    return cells


def cell_text(runs: list[dict], field: str = "mean_return_last100") -> str:
    """'mean (seed values)' of a cell, e.g. '2301 (2250, 2352)'; '-' when no run of it is done; a value of a
    run that diverged (its loss became NaN, so it stopped early) is marked with '*'."""
    if not runs:
        return "-"
    known = [r[field] for r in runs if r[field] is not None]
    values = ", ".join(
        "n/a" if r[field] is None else f"{r[field]:.0f}" + "*" * (r["status"] == "diverged") for r in runs
    )
    return f"{statistics.fmean(known):.0f} ({values})" if known else f"n/a ({values})"


def seeds_counted(cells, env_id: str) -> int:
    """How many seeds of env_id every Table 1 setting has done (the first n seeds count for each)."""
    return min(len(cells.get((s, env_id), [])) for s in TABLE1)


def normalized_scores(cells, random_scores) -> dict[str, list[float]]:
    """The paper's normalization per env: random policy 0, the best setting of Table 1 (mean over seeds) 1.
    An env counts once every Table 1 setting has a run; each setting then counts the same seeds, so the 1 is
    the best of all four."""
    scores: dict[str, list[float]] = {s: [] for s in TABLE1}
    for env_id in ENVS:
        n = seeds_counted(cells, env_id)
        if n == 0:
            continue
        best = max(statistics.fmean(r["mean_return_last100"] for r in cells[(s, env_id)][:n]) for s in TABLE1)
        zero = random_scores[env_id]
        for s in TABLE1:
            scores[s] += [(r["mean_return_last100"] - zero) / (best - zero) for r in cells[(s, env_id)][:n]]
    return scores


def median(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def trust_region_row(runs: list[dict]) -> list[str]:
    """Over all updates of the cell's runs: median and largest max ratio, the share of updates whose max
    ratio left 1 + eps, median fraction of ratios outside [1 - eps, 1 + eps], median and largest exact KL."""
    ratio_max = [v for r in runs for v in r["per_iteration"]["ratio_max"]]
    kl = [v for r in runs for v in r["per_iteration"]["exact_kl"]]
    clipfrac = [v for r in runs for v in r["per_iteration"]["clipfrac"]]
    outside = sum(v > 1 + EPSILON for v in ratio_max) / len(ratio_max)
    return [
        f"{median(ratio_max):.2f}", f"{max(ratio_max):.3g}", f"{100 * outside:.0f} %",
        f"{100 * median(clipfrac):.1f} %",
        f"{median(kl):.4f}", f"{max(kl):.3g}",
    ]  # fmt: skip


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(out: Path, records: list[dict], random_scores: dict[str, float]) -> str:
    """The five tables as Markdown (also written to <out>/tables.md); the figures as <out>/*.png."""
    blocks = page_blocks(records, random_scores)
    parts = [f"# The objectives study: {len(records)} of {len(grid())} runs done\n", blocks["status"] + "\n"]
    titles = {
        "a": "a. Table 1 of the PPO paper at our scale", "b": "b. The trust region in practice (the runs of a)",
        "c": "c. Data reuse: epochs per rollout, HalfCheetah-v4", "d": "d. GAE's lambda, Hopper-v4 (clipping)",
        "e": "e. The code-level details (Engstrom et al.'s PPO-M)",
    }  # fmt: skip
    parts += [f"## {title}\n\n{blocks[part]}" for part, title in titles.items()]
    text = "\n".join(parts)
    (out / "tables.md").write_text(text)
    plot(out, by_cell(records))
    return text


def page_blocks(records: list[dict], random_scores: dict[str, float]) -> dict[str, str]:
    """The generated parts of the study's page (docs/what_ppo_buys.md), each between `<!-- study:NAME -->` and
    `<!-- /study:NAME -->`: the status line and the five tables."""
    cells = by_cell(records)
    seed_1 = sum(run_key(*run) in {r["key"] for r in records} for run in grid() if run[2] == 1)
    status = (
        f"{len(records)} of the {len(grid())} runs are done ({seed_1} of the 22 with seed 1). Score: the mean "
        "return of the last 100 training episodes at 999,424 steps (the paper's measure). A cell gives the mean over "
        "the seeds done and, in brackets, each seed (1, then 2); '*' marks a run whose loss became NaN, scored by "
        "its last 100 episodes before it stopped."
    )
    tables = (table_1(cells, random_scores), trust_region_table(cells), data_reuse_table(cells), gae_table(cells),
              code_level_table(cells))  # fmt: skip
    return {
        "status": status,
        **{part: table.split("\n\n", 1)[1].strip() for part, table in zip("abcde", tables, strict=True)},
    }


def update_page(page: Path, blocks: dict[str, str]) -> str:
    """The page's text with each generated block replaced by its current version."""
    text = page.read_text()
    for name, block in blocks.items():
        start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
        before, found, rest = text.partition(start)
        if not found:
            raise SystemExit(f"error: {page} has no {start} marker")
        text = before + start + "\n" + block + "\n" + end + rest.partition(end)[2]
    return text


def table_1(cells, random_scores) -> str:
    normalized = normalized_scores(cells, random_scores)
    rows = []
    for s in TABLE1:
        ours = f"{statistics.fmean(normalized[s]):.2f}" if normalized[s] else "-"
        rows.append(
            [TABLE1_LABELS[s], ours, f"{PAPER_TABLE1[s]:.2f}", *(cell_text(cells.get((s, e), [])) for e in ENVS)]
        )
    counted = [f"{e} ({seeds_counted(cells, e)} of {len(SEEDS)} seeds)" for e in ENVS if seeds_counted(cells, e)]
    zeros = ", ".join(f"{e} {random_scores[e]:.1f}" for e in ENVS)
    header = ["objective", "normalized (ours)", "normalized (paper)", *ENVS]
    return (
        "## a. Table 1 of the PPO paper at our scale\n\n" + markdown_table(header, rows) + "\n\n"
        f"Normalized as in the paper: per env the random policy is 0 ({zeros}; 100 episodes of uniform random "
        "actions) and the best of the four settings (mean over seeds) is 1; averaged over envs and seeds. Envs "
        f"counted: {', '.join(counted) or 'none yet'}. The paper's figures "
        "are over 7 tasks and 3 seeds.\n"
    )


def trust_region_table(cells) -> str:
    rows = [[TABLE1_LABELS[s], e, *trust_region_row(cells[(s, e)])] for s in TABLE1 for e in ENVS if cells.get((s, e))]
    header = ["objective", "env", "median max ratio", "largest max ratio", "updates with max ratio > 1.2",
              "median share of ratios outside [0.8, 1.2]", "median exact KL", "largest exact KL"]  # fmt: skip
    return (
        "## b. The trust region in practice (every update of the runs of a)\n\n" + markdown_table(header, rows) + "\n\n"
        "max ratio: the largest pi_new / pi_old of any sample in any minibatch of the update; exact KL: "
        "KL(pi_old || pi_new) over the rollout's observations after the update.\n"
    )


def data_reuse_table(cells) -> str:
    rows = []
    for name, one, thirty in (("clip", "clip_epochs1", "clip_epochs30"), ("none", "none_epochs1", "none_epochs30")):
        runs = [cells.get((s, "HalfCheetah-v4"), []) for s in (one, name, thirty)]
        kls = [f"{median(v for r in c for v in r['per_iteration']['exact_kl']):.4f}" if c else "-" for c in runs]
        ratios = [f"{median(v for r in c for v in r['per_iteration']['ratio_max']):.2f}" if c else "-" for c in runs]
        rows.append([TABLE1_LABELS[name], *(cell_text(c) for c in runs), " / ".join(kls), " / ".join(ratios)])
    header = ["objective", "1 epoch", "10 epochs", "30 epochs", "median exact KL (1 / 10 / 30)",
              "median max ratio (1 / 10 / 30)"]  # fmt: skip
    return "## c. Data reuse: epochs per rollout, HalfCheetah-v4\n\n" + markdown_table(header, rows) + "\n"


def gae_table(cells) -> str:
    rows = []
    for lam, s in (("0", "clip_lambda0"), ("0.95", "clip"), ("1", "clip_lambda1")):
        runs = cells.get((s, "Hopper-v4"), [])
        explained = median(v for r in runs for v in r["per_iteration"]["explained_variance"][-50:])
        rows.append([lam, cell_text(runs), cell_text(runs, "eval_return_mean"), f"{explained:.3f}" if runs else "-"])
    header = ["lambda", "training score", "saved model (10 deterministic episodes)",
              "explained variance (median of the last 50 updates)"]  # fmt: skip
    return "## d. GAE's lambda, Hopper-v4 (clipping)\n\n" + markdown_table(header, rows) + "\n"


def code_level_table(cells) -> str:
    variants = (
        ("clip", "PPO"),
        ("ppo_m_clip", "PPO-M"),
        ("none", "PPO, no clipping"),
        ("ppo_m_none", "PPO-M, no clipping"),
    )
    rows = [[e, label, cell_text(cells.get((s, e), [])), str(ENGSTROM[e].get(s, "-"))]
            for e in ("Hopper-v4", "Walker2d-v4") for s, label in variants]  # fmt: skip
    header = ["env", "variant", "ours", "Engstrom et al. (about 1M steps)"]
    return (
        "## e. The code-level details (Engstrom et al.'s PPO-M)\n\n" + markdown_table(header, rows) + "\n\n"
        f"PPO-M here: `{' '.join(PPO_M)}`; observation normalization kept, as in Engstrom et al.\n"
    )


LABELS = {
    "none": "no clipping", "clip": "clip 0.2", "kl_adaptive": "adaptive KL 0.01", "kl_fixed": "fixed KL beta 1",
    "clip_epochs1": "clip, 1 epoch", "clip_epochs30": "clip, 30 epochs", "none_epochs1": "no clipping, 1 epoch",
    "none_epochs30": "no clipping, 30 epochs", "clip_lambda0": "lambda 0", "clip_lambda1": "lambda 1",
    "ppo_m_clip": "PPO-M, clip", "ppo_m_none": "PPO-M, no clipping",
}  # fmt: skip
COLORS = {s: f"C{i}" for i, s in enumerate(LABELS)}
Y_LABELS = {
    "return": "episodic return (moving average, 10 updates)", "ratio_max": "largest ratio in the update",
    "exact_kl": "KL(pi_old || pi_new) after the update", "explained_variance": "explained variance of the critic",
}  # fmt: skip


NOTES = {  # what the default-named runs are in each figure
    "epochs.png": " (clip 0.2, no clipping: 10 epochs)", "gae_lambda.png": " (clip 0.2: lambda 0.95)",
    "ppo_m.png": " (clip 0.2, no clipping: all the details)",
}  # fmt: skip


def plot(out: Path, cells) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, window=10):
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        return [i for i, _ in points], [statistics.fmean(v for _, v in points[max(0, k - window + 1) : k + 1])
                                        for k in range(len(points))]  # fmt: skip

    def curves(ax, settings, env_id, field="return", log=False, note=""):
        for s in settings:
            for r in cells.get((s, env_id), []):
                series, steps = r["per_iteration"][field], r["per_iteration"]["step"]
                style = {
                    "color": COLORS[s],
                    "ls": "-" if r["seed"] == 1 else "--",
                    "label": f"{LABELS[s]}, seed {r['seed']}",
                }
                if field == "return":
                    index, values = smooth(series)
                    ax.plot([steps[i] for i in index], values, alpha=0.9, **style)
                else:
                    ax.plot(steps, series, alpha=0.6, lw=0.8, **style)
        ax.set_title(f"{env_id}{note}")
        ax.set_xlabel("environment steps")
        ax.set_ylabel(Y_LABELS[field])
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)

    cheetah, hopper = "HalfCheetah-v4", "Hopper-v4"
    figures = {  # file -> panels of (settings, env, statistic, log scale)
        "table1_curves.png": [(TABLE1, e, "return", False) for e in ENVS],
        "trust_region.png": [(("clip", "none"), e, "ratio_max", True) for e in ENVS]
        + [(TABLE1, e, "exact_kl", True) for e in ENVS],
        "epochs.png": [(("clip_epochs1", "clip", "clip_epochs30"), cheetah, "return", False),
                       (("clip_epochs1", "clip", "clip_epochs30"), cheetah, "exact_kl", True),
                       (("none_epochs1", "none", "none_epochs30"), cheetah, "return", False),
                       (("none_epochs1", "none", "none_epochs30"), cheetah, "exact_kl", True)],
        "gae_lambda.png": [(("clip_lambda0", "clip", "clip_lambda1"), hopper, f, False)
                           for f in ("return", "explained_variance")],
        "ppo_m.png": [(("clip", "ppo_m_clip", "none", "ppo_m_none"), e, "return", False)
                      for e in (hopper, "Walker2d-v4")],
    }  # fmt: skip
    for name, panels in figures.items():
        columns = 3 if len(panels) % 3 == 0 else 2
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
        for ax, (settings, env_id, field, log) in zip(axes.flat, panels, strict=False):
            curves(ax, settings, env_id, field, log, NOTES.get(name, ""))
            if field == "ratio_max":
                ax.axhline(1 + EPSILON, color="k", ls="--", lw=1)
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ppo_objectives", help="the study's folder")
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time (one core each)")
    parser.add_argument("--script", type=Path, default=REPO / "ppo_continuous.py", help="the training script")
    parser.add_argument("--report-only", action="store_true", help="only the tables and figures of the runs done")
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "what_ppo_buys.md", help="the page to update")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random_scores = random_policy_scores(out)
    if not args.report_only:
        todo = runs_to_do(out)
        print(f"{len(grid()) - len(todo)} runs done, {len(todo)} to run, {args.parallel} at a time", flush=True)
        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for future in [pool.submit(work_through, out, args, lock) for _ in range(args.parallel)]:
                future.result()
    print(report(out, read_records(out), random_scores))
    args.page.write_text(update_page(args.page, page_blocks(read_records(out), random_scores)))
    print(f"updated the tables of {args.page}")


if __name__ == "__main__":
    main()
