r"""Training speed of ppo_atari.py: SPS and its time breakdown for several configurations.

Each configuration is one short training run of the script itself, in its own process (exactly what
a user runs), at the default hyperparameters (8 envs x 128 steps, 4 epochs x 4 minibatches) unless
the configuration says otherwise; the figures come from the run's summary.json (SPS over the whole
run, seconds in env / inference / update). The "rollout SPS" column is steps / (env + inference
seconds), to compare with the raw env throughput of benchmarks/atari_env_throughput.py.
Results: `<out>/results.json` and a Markdown table `<out>/results.md`.

    nice -n 15 python benchmarks/atari_sps.py --total-timesteps 20480 \
        --out benchmarks/results/atari_sps

`--script` runs another version of the file (e.g. `git show <commit>:ppo_atari.py > /tmp/old.py`), and
`--repeat N` runs the configurations N times, alternating with `--script` when `--compare` names a second
file, so that two versions are measured A B A B on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "ppo_atari.py")

CONFIGS = {
    "ale_vector (default)": [],
    "ale_vector --bf16": ["--bf16"],
    "ale_vector --no-channels-last": ["--no-channels-last"],
    "gymnasium": ["--env-backend", "gymnasium"],
    "gymnasium --bf16": ["--env-backend", "gymnasium", "--bf16"],
    "torchrun 1 process": ["torchrun", "1"],
    "torchrun 2 processes": ["torchrun", "2"],
}


def run(name: str, flags: list[str], args: argparse.Namespace, script: str, tag: str) -> dict:
    runs_dir = Path(args.out) / "runs" / f"{tag}{name.replace(' ', '_').replace('-', '')}"
    common = ["--total-timesteps", str(args.total_timesteps), "--runs-dir", str(runs_dir),
              "--eval-episodes", "1", "--env-id", args.env_id]  # fmt: skip
    if flags[:1] == ["torchrun"]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", flags[1], script]  # fmt: skip
        command = [*launcher, *common]
    else:
        command = [sys.executable, script, *common, *flags]
    log = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    if log.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{log.stdout[-2000:]}\n{log.stderr[-2000:]}")
    (summary_path,) = runs_dir.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    steps = summary["global_step"]
    rollout_s = summary["time_env_s"] + summary["time_inference_s"]
    return {
        "script": script,
        "config": name,
        "command": " ".join(["python" if c == sys.executable else c for c in command]),
        "steps": steps,
        "sps": round(summary["sps"], 1),
        "rollout_sps": round(steps / max(rollout_s, 1e-9), 1),
        "env_s": round(summary["time_env_s"], 1),
        "inference_s": round(summary["time_inference_s"], 1),
        "update_s": round(summary["time_update_s"], 1),
        "update_s_per_iteration": round(summary["time_update_s"] / summary["iterations"], 3),
        "wall_s": round(summary["wall_time_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    parser.add_argument("--total-timesteps", type=int, default=20480)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/atari_sps")
    parser.add_argument("--script", default=SCRIPT, help="the version of ppo_atari.py to measure")
    parser.add_argument("--compare", default=None, help="a second version, run alternately with --script")
    parser.add_argument("--repeat", type=int, default=1, help="how many times each configuration runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scripts = [args.script] + ([args.compare] if args.compare else [])
    results = []
    for repeat in range(args.repeat):
        for name in args.configs:
            for index, script in enumerate(scripts):  # A B A B: both versions under the same load
                results.append(run(name, CONFIGS[name], args, script, f"{repeat}_{'AB'[index]}_"))
                print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    header = "| script | configuration | SPS | rollout SPS | env s | inference s | update s | update s / iteration |"
    lines = [header, "|" + "---|" * 8]
    for r in results:
        lines.append(
            f"| {Path(r['script']).name} | {r['config']} | {r['sps']:.0f} | {r['rollout_sps']:.0f} | {r['env_s']} | "
            f"{r['inference_s']} | {r['update_s']} | {r['update_s_per_iteration']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
