r"""A long run end to end: ppo_continuous.py with --compile, the same command without it, and a reference script.

The three run one after the other, each in a fresh process, in the order given by --order (default A B C: ours
with --compile, ours, the reference), --repeat times over. Measured for each: the wall time of the whole process
(imports, compile, training, our final evaluation of one episode), its training SPS (the last `charts/SPS` it
logged; ours counts the compile in it), our compile time (the progress line's `compile Ns`) and the mean return
of the last 100 training episodes, so that the same seed's learning can be compared with and without --compile.
Writes `<out>/results.json` and prints one line per run and the ratios of the wall times.

    python benchmarks/compile_end_to_end.py --env-id Hopper-v4 --total-timesteps 1000000 \
        --reference /tmp/ref/ppo_continuous_action.py --reference-python /work/ref-venv-continuous/bin/python \
        --out benchmarks/results/compile_end_to_end/<date>

For a quick look at the tool itself: `--total-timesteps 8192` (the compile then dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_reference import REPO, logged_scalars, machine, stack  # noqa: E402


def run_once(side: str, command: list[str], workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    compile_times = re.findall(r" compile (\d+)s", result.stdout)
    logged = logged_scalars(workdir, "charts/SPS", "charts/episodic_return")
    last_100 = logged["charts/episodic_return"][-100:]  # the mean return of the last 100 training episodes
    return {
        "side": side, "wall_s": round(wall, 1), "sps": round(logged["charts/SPS"][-1], 1),
        "compile_s": int(compile_times[-1]) if compile_times else None,
        "mean_return": sum(last_100) / len(last_100) if last_100 else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference", help="the reference script (outside this repository); none: ours only")
    parser.add_argument("--reference-python", default=sys.executable, help="the Python that runs the reference")
    parser.add_argument("--order", default="ABC", help="A: ours --compile, B: ours, C: the reference")
    parser.add_argument("--repeat", type=int, default=1, help="times the whole order is run")
    parser.add_argument("--out", help="folder for results.json")
    args = parser.parse_args()
    if not set(args.order) <= set("ABC") or (args.reference is None and "C" in args.order):
        parser.error("--order is made of A, B and C; C needs --reference")

    common = ["--env-id", args.env_id, "--total-timesteps", str(args.total_timesteps), "--seed", str(args.seed)]
    ours = [sys.executable, str(REPO / "ppo_continuous.py"), *common, "--no-cuda", "--eval-episodes", "1"]
    commands = {
        "A": ("ours --compile", [*ours, "--compile"]),
        "B": ("ours", ours),
        "C": ("reference", [args.reference_python, str(Path(args.reference or "").resolve()), *common, "--no-cuda"]),
    }
    before, runs = os.getloadavg(), []
    # Read once: neither changes between runs, and each stack() starts a Python of its own.
    setting = {
        "stack": {"ours": stack(sys.executable), "reference": stack(args.reference_python)},
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.repeat):
            for letter in args.order:
                side, command = commands[letter]
                runs.append(run_once(side, command, Path(scratch) / f"{i}_{letter}"))
                r = runs[-1]
                compiled = f", compile {r['compile_s']}s" if r["compile_s"] is not None else ""
                print(f"{side:>15}: {r['wall_s']:7.1f} s wall, {r['sps']:6.0f} SPS{compiled}, "
                      f"return {r['mean_return']}", flush=True)  # fmt: skip
                write_results(args, runs, setting, before, final=False)  # a comparison stopped half way keeps its runs
    write_results(args, runs, setting, before, final=True)


def write_results(args, runs: list[dict], setting: dict, before, final: bool) -> None:
    """<out>/results.json from the runs so far ("complete": whether all of them ran); at the end, prints the ratios."""
    wall = {}
    for r in runs:
        wall.setdefault(r["side"], []).append(r["wall_s"])
    mean_wall = {side: sum(values) / len(values) for side, values in wall.items()}
    # How many times faster a is than b, wall time against wall time.
    ratios = {f"{a} / {b}": mean_wall[b] / mean_wall[a] for a in mean_wall for b in mean_wall if a < b}
    if final:
        for name, ratio in ratios.items():
            print(f"{name}: {ratio:.2f}x faster (wall time)")
    result = {
        "env_id": args.env_id, "total_timesteps": args.total_timesteps, "seed": args.seed, "order": args.order,
        "reference": Path(args.reference).name if args.reference else None, "runs": runs, "mean_wall_s": mean_wall,
        "speedup": ratios, **setting, "load_average_before": before, "load_average_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "complete": final,
    }  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
