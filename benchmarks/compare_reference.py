r"""Speed of one of our scripts against a reference script, side by side on this machine.

The two run alternately (ours, reference, ours, reference, ...: A B A B), same env, same settings, same
number of steps, each in a fresh process, so that a change in the machine's speed during the measurement
hits both alike. A run's speed is the last `charts/SPS` it logged to TensorBoard (both scripts log steps
since the start of training over the seconds since then). Printed: each run's SPS, the median of each
side and their ratio, and the machine (CPU model, AVX-512 / AMX / native bfloat16, load average before
and after). The reference file is never part of this repository: give its path and the Python to run it
with, e.g. CleanRL's `cleanrl/ppo_continuous_action.py` in a scratch venv.

    python benchmarks/compare_reference.py --ours ppo_continuous.py \
        --reference /tmp/ref/ppo_continuous_action.py --reference-python /tmp/ref-venv/bin/python \
        --env-id Hopper-v4 --total-timesteps 20480 --repeat 2 --out benchmarks/results/compare_continuous

Two comparisons, each worth quoting: against the reference on its own pinned stack (what a user who picks it
gets) and with both on our stack (what the script alone buys). Get CleanRL's files from its repository
(vwxyzjn/cleanrl: `cleanrl/ppo_continuous_action.py`; `cleanrl/ppo_atari.py` with `cleanrl_utils/__init__.py`
and `cleanrl_utils/atari_wrappers.py` beside it), build its stack with benchmarks/make_reference_venv.sh, then:

    benchmarks/make_reference_venv.sh /work/ref-venv-continuous continuous     # atari: /work/ref-venv-atari atari
    python benchmarks/compare_reference.py --ours ppo_continuous.py --reference /tmp/ref/ppo_continuous_action.py \
        --reference-python /work/ref-venv-continuous/bin/python --env-id Hopper-v4 --repeat 3 --out <folder>
    python benchmarks/compare_reference.py --ours ppo_continuous.py --reference /tmp/ref1x/ppo_continuous_action.py \
        --env-id Hopper-v4 --repeat 3 --out <folder>    # our stack: this Python runs a copy ported to gymnasium 1.x

CleanRL's scripts as published run on gymnasium 0.29 only (on 1.x, TransformObservation wants an observation
space, and the Atari ids need `gym.register_envs(ale_py)` and renamed wrappers), hence the ported copy. Each
side's versions of torch, gymnasium, MuJoCo, ale-py and numpy are printed and saved with the results.

`--avx2-only` caps both sides' oneDNN, MKL and torch kernels at AVX2: a CPU without AVX-512, AMX or
native bfloat16, emulated on this one (give ppo_atari.py `--ours-flags=--no-bf16` with it, the default it
would have there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# Caps oneDNN, MKL and torch's own kernels at AVX2: a CPU without AVX-512, AMX or native bfloat16, emulated.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def machine() -> dict:
    """The CPU model and the instruction-set features that decide float32 / bfloat16 kernel speed."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        model = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info.update(cpu=model[0] if model else info["cpu"], avx2="avx2" in flags, avx512="avx512f" in flags)
        info.update(avx512_bf16="avx512_bf16" in flags, amx="amx_tile" in flags)
    return info


def stack(python: str) -> dict:
    """The versions of the packages that set a step's speed, in the environment of that Python."""
    packages = ["torch", "gymnasium", "mujoco", "ale-py", "numpy"]
    code = f"import importlib.metadata as m, json\nv = {{}}\nfor p in {packages!r}:\n    try: v[p] = m.version(p)\n"
    code += "    except m.PackageNotFoundError: v[p] = None\nprint(json.dumps(v))"
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def logged_scalars(run_root: Path, *tags: str) -> dict[str, list[float]]:
    """Every value of each tag logged to TensorBoard under run_root (one run folder in it), in the order logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = run_root.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in tags}


def last_sps(run_root: Path) -> float:
    """The last charts/SPS scalar logged under run_root (one run folder in it)."""
    return float(logged_scalars(run_root, "charts/SPS")["charts/SPS"][-1])


def run_once(python: str, script: str, flags: list[str], workdir: Path, env: dict) -> float:
    """One training run in a fresh process, in its own working directory; returns its SPS."""
    workdir.mkdir(parents=True)
    command = [python, str(Path(script).resolve()), *flags]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return last_sps(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", required=True, help="our script, e.g. ppo_continuous.py")
    parser.add_argument("--reference", required=True, help="the reference script (outside this repository)")
    parser.add_argument("--reference-python", default=sys.executable, help="the Python that runs the reference")
    parser.add_argument("--env-id", required=True)
    parser.add_argument("--total-timesteps", type=int, default=20480)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side (at least 2)")
    parser.add_argument("--ours-flags", default="", help="extra flags for our script, e.g. '--bf16'")
    parser.add_argument("--reference-flags", default="", help="extra flags for the reference script")
    parser.add_argument("--cuda", action="store_true", help="let both use the GPU (default: --no-cuda for both)")
    parser.add_argument(
        "--avx2-only", action="store_true",
        help="cap both sides' kernels at AVX2 (a CPU without AVX-512 / native bfloat16, emulated); our "
        "bfloat16 default reads the real CPU flags, so give ppo_atari.py --ours-flags=--no-bf16 with it",
    )  # fmt: skip
    parser.add_argument("--out", help="folder for results.json")
    args = parser.parse_args()
    if args.repeat < 2:
        parser.error("--repeat must be at least 2: one run per side says nothing about noise")

    common = ["--env-id", args.env_id, "--total-timesteps", str(args.total_timesteps), "--seed", "1"]
    common += [] if args.cuda else ["--no-cuda"]
    ours = [*common, "--eval-episodes", "1", *args.ours_flags.split()]
    reference = [*common, *args.reference_flags.split()]
    env = {**os.environ, **(AVX2_ONLY if args.avx2_only else {})}
    before = os.getloadavg()
    runs = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.repeat):
            for side, python, script, flags in (
                ("ours", sys.executable, REPO / args.ours, [*ours, "--runs-dir", "runs"]),
                ("reference", args.reference_python, args.reference, reference),
            ):
                sps = run_once(python, str(script), flags, Path(scratch) / f"{i}_{side}", env)
                runs[side].append(sps)
                print(f"run {i + 1} {side:>9}: {sps:7.0f} SPS", flush=True)
    medians = {side: statistics.median(values) for side, values in runs.items()}
    result = {
        "env_id": args.env_id, "total_timesteps": args.total_timesteps, "ours": args.ours,
        "reference": Path(args.reference).name, "ours_flags": args.ours_flags, "reference_flags": args.reference_flags,
        "kernels": "AVX2 only (emulated)" if args.avx2_only else "native",
        "stack": {"ours": stack(sys.executable), "reference": stack(args.reference_python)},
        "sps": runs, "median_sps": medians, "ratio": medians["ours"] / medians["reference"], "machine": machine(),
        "load_average_before": before, "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    m = result["machine"]
    print(f"median: ours {medians['ours']:.0f} SPS, reference {medians['reference']:.0f} SPS: {result['ratio']:.2f}x")
    after = result["load_average_after"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, AVX-512 {m.get('avx512')}, AMX {m.get('amx')}, "
          f"bf16 {m.get('avx512_bf16')}; kernels {result['kernels']}; "
          f"load average before {before[0]:.2f}, after {after[0]:.2f}")  # fmt: skip
    for side, versions in result["stack"].items():
        print(f"{side} stack: " + ", ".join(f"{p} {v}" for p, v in versions.items() if v))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
