"""Reward-model over-optimization in ppo_llm_toy.py: the picture of Gao, Schulman and Hilton 2022
("Scaling Laws for Reward Model Overoptimization", arXiv:2210.10760, Fig. 1) from the toy's own runs,
and what its reward model learned.

For each seed, the first run is the script's default (beta 0.2, k1 KL estimator): it trains the SFT model
and the reward model; the other configurations reuse those two stages (--sft-checkpoint /
--reward-model-checkpoint), so all configurations of a seed optimize the same proxy from the same start:
beta 0 and 0.05 with k1, and k3 at the default beta. Each run is a separate process of the script itself,
exactly what a user runs, one at a time.

Every PPO iteration of every run is one point, measured on the policy's own rollout (128 responses):
the proxy reward (reward-model score with the missing-EOS penalty), the gold reward of all responses, the
gold reward of the valid responses alone, the validity rate, and sqrt(exact KL to the reference) in
nats per response, the x axis of Gao et al.

    python benchmarks/llm_overoptimization.py --seeds 1 2 3

Writes into --out (default benchmarks/results/llm_overoptimization/): runs.csv (one row per run: SFT and
final evaluation on held-out prompts), curves.csv (every iteration of every run), overoptimization.png,
reward_model.csv and reward_model.png (each seed's reward model scored on texts with a known number of
positive words, inside and beyond the grammar), targets.json (the issue's targets on the default runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_toy_demo import REPO, run_one, write_csv  # noqa: E402

import ppo_llm_toy as toy  # noqa: E402  (only for the reward-model probe: the runs use the command line)

CONFIGURATIONS = [  # (name, extra flags); the first is the script's default run and trains both stages
    ("beta0.2_k1", []),
    ("beta0.05_k1", ["--kl-coef", "0.05"]),
    ("beta0_k1", ["--kl-coef", "0"]),
    ("beta0.2_k3", ["--kl-estimator", "k3"]),
]
CURVE_KEYS = ("score", "gold", "gold_valid", "validity", "kl_exact", "kl")


# THE REWARD MODEL PROBE


def noun_phrase(adjectives: list[str], rng: random.Random) -> list[str]:
    return ["the", *adjectives, rng.choice(toy.NOUNS)]


def probe_texts(rng: random.Random, samples: int = 200) -> list[dict]:
    """Texts with a known number of positive words and no negative ones.

    in_grammar: valid sentences, adjectives and verb drawn from the positive and neutral words;
    all_positive: every adjective and the verb positive, 0..16 adjectives split over the two noun phrases
    (up to 4 is grammatical; beyond, the text grows with its positive words);
    fixed_length: 16 adjectives (22 words, the longest text the context holds), p of them positive and
    the rest neutral, verb neutral: the number of positive words changes, the length does not.
    """
    max_adjectives = toy.Args().block_size - 2 - toy.MIN_SENTENCE_WORDS  # BOS and EOS around the words
    probes = []
    for _ in range(samples * 6):
        adjectives = [rng.choice(toy.POSITIVE_ADJ + toy.NEUTRAL_ADJ) for _ in range(rng.randint(0, 4))]
        split = rng.randint(max(0, len(adjectives) - 2), min(2, len(adjectives)))
        verb = rng.choice(toy.POSITIVE_VERB + toy.NEUTRAL_VERB)
        words = [*noun_phrase(adjectives[:split], rng), verb, *noun_phrase(adjectives[split:], rng), "."]
        probes.append({"family": "in_grammar", "words": words})
    for count in range(max_adjectives + 1):
        for _ in range(samples):
            adjectives = [rng.choice(toy.POSITIVE_ADJ) for _ in range(count)]
            words = [*noun_phrase(adjectives[: (count + 1) // 2], rng), rng.choice(toy.POSITIVE_VERB),
                     *noun_phrase(adjectives[(count + 1) // 2 :], rng), "."]  # fmt: skip
            probes.append({"family": "all_positive", "words": words})
    for positive in range(max_adjectives + 1):
        for _ in range(samples):
            adjectives = [rng.choice(toy.POSITIVE_ADJ) for _ in range(positive)]
            adjectives += [rng.choice(toy.NEUTRAL_ADJ) for _ in range(max_adjectives - positive)]
            rng.shuffle(adjectives)
            half = max_adjectives // 2
            words = [*noun_phrase(adjectives[:half], rng), rng.choice(toy.NEUTRAL_VERB),
                     *noun_phrase(adjectives[half:], rng), "."]  # fmt: skip
            probes.append({"family": "fixed_length", "words": words})
    for probe in probes:
        probe["positive_words"] = sum(word in toy.POSITIVE_WORDS for word in probe["words"])
        probe["valid"] = toy.is_valid(probe["words"])
    return probes


@torch.no_grad()
def probe_reward_model(reward_model_path: Path, probes: list[dict]) -> list[float]:
    """The normalized score (what PPO sees, in units of the SFT samples' std) of every probe text."""
    config = toy.ModelConfig.from_args(toy.Args())
    model, _ = toy.load_checkpoint(str(reward_model_path), "reward_model", toy.ScalarModel(config, head_std=0.0))
    model.eval()
    scores = []
    for start in range(0, len(probes), 512):
        chunk = [probe["words"] for probe in probes[start : start + 512]]
        scores += toy.reward_model_score(model, *toy.sentence_batch(chunk, "cpu")).tolist()
    return scores


def reward_model_rows(probes: list[dict], scores_by_seed: dict[int, list[float]]) -> list[dict]:
    """Mean score per (family, number of positive words, valid) over all texts and seeds."""
    cells: dict[tuple, list[float]] = {}
    for scores in scores_by_seed.values():
        for probe, score in zip(probes, scores, strict=True):
            key = (probe["family"], probe["positive_words"], probe["valid"], len(probe["words"]))
            cells.setdefault(key, []).append(score)
    rows = []
    for (family, positive, valid, length), values in sorted(cells.items()):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        rows.append({"family": family, "positive_words": positive, "valid": valid, "words": length,
                     "mean_score": round(mean, 4), "std_score": round(std, 4), "texts": len(values)})  # fmt: skip
    return rows


# PLOTS


def smoothed_means(rows: list[dict], key: str, window: int) -> list[float]:
    """Mean over seeds at each iteration, then a centered moving average over `window` iterations."""
    iterations = sorted({row["iteration"] for row in rows})
    means = []
    for iteration in iterations:
        values = [row[key] for row in rows if row["iteration"] == iteration and row[key] is not None]
        means.append(sum(values) / len(values) if values else float("nan"))
    half = window // 2
    smoothed = []
    for i in range(len(means)):
        values = [v for v in means[max(0, i - half) : i + half + 1] if not math.isnan(v)]
        smoothed.append(sum(values) / len(values) if values else float("nan"))
    return smoothed


def plot_overoptimization(curves: list[dict], path: Path, window: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score", "proxy reward (reward model, normalized)"), ("gold", "gold reward, all responses"),
              ("gold_valid", "gold reward, valid responses only"), ("validity", "validity rate")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for name, _ in CONFIGURATIONS:
            rows = [row for row in curves if row["config"] == name]
            if not rows:
                continue
            x = [math.sqrt(max(kl, 0.0)) for kl in smoothed_means(rows, "kl_exact", window)]
            ax.plot(x, smoothed_means(rows, key, window), label=name.replace("_", ", "), linewidth=1.3)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("sqrt(KL(policy || reference)), KL in nats per response")
    axes[0, 0].legend(fontsize=8, title="beta, KL estimator", title_fontsize=8)
    fig.suptitle(
        "ppo_llm_toy.py: proxy vs gold reward as the policy moves away from the SFT model\n"
        f"(each PPO iteration's rollout, mean over seeds, moving average over {window} iterations)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_reward_model(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    styles = {"in_grammar": ("valid sentences (6-10 words)", "o-"),
              "all_positive": ("all adjectives and the verb positive (6-22 words)", "s-"),
              "fixed_length": ("22 words: p positive adjectives, the rest neutral", "^-")}  # fmt: skip
    for family, (label, style) in styles.items():
        cells: dict[int, list[tuple[float, int]]] = {}
        for row in rows:
            if row["family"] == family:
                cells.setdefault(row["positive_words"], []).append((row["mean_score"], row["texts"]))
        x = sorted(cells)
        y = [sum(m * n for m, n in cells[k]) / sum(n for _, n in cells[k]) for k in x]
        ax.plot(x, y, style, label=label, markersize=4)
    ax.axvline(5.5, color="gray", linestyle="--", linewidth=1)
    ax.text(5.6, ax.get_ylim()[0], " most positive words\n a valid sentence can hold (5)", fontsize=8, va="bottom")
    ax.set_xticks(range(0, max(row["positive_words"] for row in rows) + 1))
    ax.set_xlabel("number of positive words in the text (no negative words)")
    ax.set_ylabel("reward-model score (normalized on SFT samples)")
    ax.set_title("What the reward model learned: its score against the number of positive words\n"
                 "(gold: that number for a valid sentence, -5 for any invalid text; mean over seeds)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# TARGETS OF THE ISSUE


def targets(summaries: list[dict]) -> dict:
    """The default runs (beta 0.2, k1): SFT validity >= 95 %, final validity >= 90 % and a higher gold
    reward of the valid responses than the SFT model, in every seed (held-out evaluation prompts)."""
    per_seed = {}
    for summary in summaries:
        sft, final = summary["sft"], summary["final"]
        per_seed[summary["seed"]] = {
            "sft_validity": sft["validity"], "final_validity": final["validity"],
            "sft_gold_valid": sft["gold_valid"], "final_gold_valid": final["gold_valid"],
            "sft_validity_ok": sft["validity"] >= 0.95, "final_validity_ok": final["validity"] >= 0.90,
            "gold_valid_rises": final["gold_valid"] is not None and final["gold_valid"] > sft["gold_valid"],
        }  # fmt: skip
    met = all(s["sft_validity_ok"] and s["final_validity_ok"] and s["gold_valid_rises"] for s in per_seed.values())
    return {"all_met": met, "per_seed": per_seed}


def run_row(summary: dict) -> dict:
    row = {"config": summary["config"], "seed": summary["seed"], "kl_coef": summary["kl_coef"]}
    for stage in ("sft", "final"):
        for key in ("proxy", "gold", "gold_valid", "validity", "eos_rate", "response_length", "kl_exact"):
            value = summary[stage][key]
            row[f"{stage}_{key}"] = None if value is None else round(value, 4)
    row.update({"wall_time_s": round(summary["wall_time_s"], 1), "command": summary["command"]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "llm_overoptimization"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    rows, curves, defaults, reward_models = [], [], [], {}
    for seed in args.seeds:
        stages = None
        for name, flags in CONFIGURATIONS:
            summary = run_one(name, flags, seed, out, stages)
            if stages is None:  # the default run trained the SFT model and the reward model
                stages = Path(summary["run_dir"])
                defaults.append(summary)
                reward_models[seed] = stages / "reward_model.pt"
            rows.append(run_row(summary))
            print(json.dumps(rows[-1]), flush=True)
            curves += [{"config": name, "seed": seed, **{k: r[k] for k in ("iteration", *CURVE_KEYS)}}
                       for r in summary["history"]]  # fmt: skip
            write_csv(out / "runs.csv", rows)  # rewritten after every run: partial results
            write_csv(out / "curves.csv", curves)
    plot_overoptimization(curves, out / "overoptimization.png")

    probes = probe_texts(random.Random(0))
    scores = {seed: probe_reward_model(path, probes) for seed, path in reward_models.items()}
    probe_rows = reward_model_rows(probes, scores)
    write_csv(out / "reward_model.csv", probe_rows)
    plot_reward_model(probe_rows, out / "reward_model.png")

    result = targets(defaults)
    (out / "targets.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"wrote {out}/runs.csv, curves.csv, overoptimization.png, reward_model.csv, reward_model.png, targets.json")


if __name__ == "__main__":
    main()
