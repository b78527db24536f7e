r"""The GPU check: every CUDA path of the three scripts and both speed comparisons with --cuda, in under 8 minutes.

On a machine with a CUDA GPU, from the repository's root:

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check/<date> \
        --reference-continuous /tmp/ref/ppo_continuous_action.py --reference-atari /tmp/ref/ppo_atari.py
    python benchmarks/gpu_check.py --dry-run     # prints the commands and runs nothing (no GPU needed)

Steps, each in a fresh process under a time limit, the whole within --budget seconds (a step that no longer
fits is skipped and says so):
- ppo_continuous.py, ppo_atari.py in float32 (--no-bf16) and in bfloat16 (--bf16), ppo_llm_toy.py: a short
  run each with --cuda;
- torchrun of ppo_atari.py, one process per GPU, on NCCL. With 2+ GPUs the ranks' weights must be bitwise
  equal at the end (as tests/test_atari.py checks on gloo). With one GPU ppo_atari.py starts no process group
  (it needs WORLD_SIZE > 1), so the check starts an NCCL group of one before the script's main(): then the
  script's collectives (weight broadcast, gradient all-reduce, shared statistics) all run through NCCL, and
  the check logs the backend and counts the all-reduces;
- benchmarks/compare_reference.py --cuda for each script against the reference (CleanRL's
  ppo_continuous_action.py and ppo_atari.py, never in this repository): give their paths (or set
  REFERENCE_CONTINUOUS, REFERENCE_ATARI) and the Python that runs them (--reference-python or
  REFERENCE_PYTHON; default: this one, i.e. our stack). A comparison without its reference is skipped.

Each training run goes through `--worker`: this file calls the script's main() in-process (the command
line's very path) and then records what the GPU did (peak CUDA memory, and under torchrun the backend, the
all-reduces and the weights), so a run that quietly stayed on the CPU fails. Into --out: one log per step
and summary.json (each step's command, exit code, seconds, passed, detail, results); a table is printed.
Exit 0 when every step that ran passed, 1 otherwise, 2 without a CUDA GPU.

Where the GPU machine's Python lacks this project's packages (gymnasium, MuJoCo, ale-py, tyro), bring their
wheels for that Python. CleanRL's pins have no wheels for Python 3.12 or later (mujoco 2.3.7, ale-py 0.8.1):
there both comparisons are on our stack, against copies of the references ported to gymnasium 1.x.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SELF = "benchmarks/gpu_check.py"


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: int  # seconds at most
    skip: str | None = None  # why it does not run


def plan(scratch: Path, gpus: int, references: dict, reference_python: str, compare_steps: int) -> list[Step]:
    """The steps, in the order they run; commands run from the repository's root."""
    py, runs = sys.executable, str(scratch / "runs")

    def worker(name, script, flags, timeout, launcher=(py,)):
        command = [*launcher, SELF, "--worker", script, str(scratch / name), "--", *flags, "--runs-dir", runs]
        return Step(name, command, timeout)

    atari = ["--cuda", "--total-timesteps", "4096", "--eval-episodes", "1"]  # 4 iterations of Atari, 2 of MuJoCo
    toy = ["--cuda", "--sft-steps", "300", "--sft-corpus-size", "2000", "--rm-num-pairs", "1000",
           "--total-episodes", "1280", "--num-prompts", "16", "--samples-per-prompt", "4", "--eval-prompts", "64",
           "--eval-interval", "10", "--num-sample-texts", "1"]  # fmt: skip
    torchrun = (py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus))  # = torchrun
    per_rank = ["--cuda", "--num-envs", str(8 * gpus), "--total-timesteps", str(2 * 8 * gpus * 128)]
    steps = [
        worker("continuous", "ppo_continuous.py", ["--cuda", "--env-id", "Hopper-v4", *atari[1:]], 120),
        worker("atari_float32", "ppo_atari.py", [*atari, "--no-bf16"], 120),
        worker("atari_bf16", "ppo_atari.py", [*atari, "--bf16"], 120),
        worker("llm_toy", "ppo_llm_toy.py", toy, 150),
        worker("torchrun_nccl", "ppo_atari.py", [*per_rank, "--eval-episodes", "1"], 150, torchrun),
    ]
    for kind, script, env_id in (("continuous", "ppo_continuous.py", "Hopper-v4"),
                                 ("atari", "ppo_atari.py", "BreakoutNoFrameskip-v4")):  # fmt: skip
        name, reference = f"compare_{kind}", references[kind]
        command = [py, "benchmarks/compare_reference.py", "--cuda", "--ours", script, "--reference", str(reference),
                   "--reference-python", reference_python, "--env-id", env_id, "--total-timesteps", str(compare_steps),
                   "--repeat", "2", "--out", str(scratch / name)]  # fmt: skip
        missing = None if reference else f"no reference script: give --reference-{kind} or REFERENCE_{kind.upper()}"
        steps.append(Step(name, command, 240, missing))
    return steps


def check(step: Step, rc: int | None, scratch: Path, gpus: int) -> tuple[bool, str, dict]:
    """Whether a step that ran passed, a one-line detail and its results."""
    if rc is None:
        return False, f"stopped at its time limit ({step.timeout} s)", {}
    if step.name.startswith("compare_"):
        path = scratch / step.name / "results.json"
        if rc != 0 or not path.exists():
            return False, f"exit code {rc}, see the log", {}
        r = json.loads(path.read_text())
        m = r["median_sps"]
        return True, f"ours {m['ours']:.0f} SPS, reference {m['reference']:.0f} SPS: {r['ratio']:.2f}x", r
    reports = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{step.name}_rank*.json"))]
    if rc != 0 or not reports:
        return False, f"exit code {rc}, see the log", {}
    r = reports[0]
    status, memory = r["summary"].get("status"), r["cuda_max_memory_bytes"]
    where = f"{memory / 2**20:.0f} MiB of CUDA memory on {r['gpu']}"
    speed = f"{r['summary']['sps']:.0f} SPS, " if "sps" in r["summary"] else ""
    if status != "completed" or memory == 0:
        return False, f"status {status}, {where}", r
    if step.name != "torchrun_nccl":
        return True, f"{speed}{where}", r
    if len(reports) != gpus or any(x["backend"] != "nccl" or x["all_reduce_calls"] == 0 for x in reports):
        seen = [(x["rank"], x["backend"], x["all_reduce_calls"]) for x in reports]
        return False, f"expected {gpus} ranks on nccl with all-reduces, saw (rank, backend, all-reduces) {seen}", r
    detail = f"nccl, {gpus} process(es), {r['all_reduce_calls']} all-reduces per rank"
    if gpus == 1:
        return True, detail + " (group of one started by the check), " + where, r
    import torch

    weights = [torch.load(scratch / f"{step.name}_rank{x['rank']}.pt") for x in reports]
    unequal = [k for w in weights[1:] for k in weights[0] if not torch.equal(weights[0][k], w[k])]
    if unequal:
        return False, f"weights differ across ranks: {sorted(set(unequal))[:3]}", r
    return True, detail + ", weights bitwise equal across ranks, " + where, r


def run_step(step: Step, log: Path, timeout: float) -> int | None:
    """Runs the step's command from the repository's root; None when it ran past its time limit."""
    with log.open("w") as out:
        out.write(shlex.join(step.command) + "\n")
        out.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(step.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step's own processes: torchrun's ranks, compare's runs
            process.wait()
            return None


def worker(script: str, prefix: str, flags: list[str]) -> None:
    """Under --worker: the script's main() with these flags, then a report of what the GPU did."""
    import torch
    import torch.distributed as dist

    rank, torchrun = int(os.environ.get("RANK", "0")), "TORCHELASTIC_RUN_ID" in os.environ
    if torchrun and int(os.environ["WORLD_SIZE"]) == 1:  # the script starts no group for one process
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    sys.path.insert(0, str(REPO))
    module = importlib.import_module(Path(script).stem)
    seen = {"all_reduce_calls": 0, "backend": None}
    all_reduce, update_policy, train = dist.all_reduce, module.update_policy, module.train

    def counting_all_reduce(*args, **kwargs):
        seen["all_reduce_calls"] += 1
        return all_reduce(*args, **kwargs)

    def spy(agent, *rest, **kwargs):  # the first argument of ppo_atari's update_policy is the agent
        seen["agent"], seen["backend"] = agent, dist.get_backend() if dist.is_initialized() else None
        return update_policy(agent, *rest, **kwargs)

    if torchrun:
        dist.all_reduce, module.update_policy = counting_all_reduce, spy
    module.train = lambda args: seen.setdefault("summary", train(args))
    sys.argv = [script, *flags]
    module.main()  # exits on an error: then no report
    report = {
        "script": script, "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "backend": seen["backend"], "all_reduce_calls": seen["all_reduce_calls"], "summary": seen["summary"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_max_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }  # fmt: skip
    if "agent" in seen:
        torch.save({k: v.cpu() for k, v in seen["agent"].state_dict().items()}, f"{prefix}_rank{rank}.pt")
    Path(f"{prefix}_rank{rank}.json").write_text(json.dumps(report, indent=2, default=str))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # --worker SCRIPT PREFIX -- FLAGS...
        script, prefix, separator, *flags = sys.argv[2:]
        assert separator == "--", "usage: --worker SCRIPT PREFIX -- FLAGS..."
        return worker(script, prefix, flags)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=f"benchmarks/results/gpu_check/{time.strftime('%Y-%m-%d_%H%M')}")
    parser.add_argument("--reference-continuous", default=os.environ.get("REFERENCE_CONTINUOUS"))
    parser.add_argument("--reference-atari", default=os.environ.get("REFERENCE_ATARI"))
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON", sys.executable))
    parser.add_argument("--compare-steps", type=int, default=10240, help="steps of each comparison run")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"error: {SELF} needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run prints its commands",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    gpus = max(1, torch.cuda.device_count())
    references = {"continuous": args.reference_continuous, "atari": args.reference_atari}
    out = (REPO / args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        scratch = Path(tmp)
        steps = plan(scratch, gpus, references, args.reference_python, args.compare_steps)
        if args.dry_run:
            for step in steps:
                print(f"# {step.name}: skipped, {step.skip}" if step.skip else shlex.join(step.command))
            return
        out.mkdir(parents=True, exist_ok=True)
        deadline, results = time.monotonic() + args.budget, []
        for step in steps:
            left = deadline - time.monotonic()
            skip = step.skip or (None if left > 30 else f"no time left in the {args.budget:.0f} s budget")
            entry = {"name": step.name, "command": shlex.join(step.command)}
            if skip:
                entry.update(passed=None, seconds=0.0, detail=f"skipped: {skip}")
            else:
                start, step.timeout = time.monotonic(), int(min(step.timeout, left))
                rc = run_step(step, out / f"{step.name}.log", step.timeout)
                passed, detail, result = check(step, rc, scratch, gpus)
                entry.update(passed=passed, rc=rc, seconds=round(time.monotonic() - start, 1), detail=detail)
                entry["result"] = result
            results.append(entry)
            print(f"{step.name:<20} {_verdict(entry['passed']):<8} {entry['seconds']:7.1f}  {entry['detail']}",
                  flush=True)  # fmt: skip
    ok = all(e["passed"] is not False for e in results)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "passed": ok, "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "reference_python": args.reference_python, "steps": results,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{'step':<20} {'result':<8} {'seconds':>7}  detail")
    for e in results:
        print(f"{e['name']:<20} {_verdict(e['passed']):<8} {e['seconds']:7.1f}  {e['detail']}")
    print(f"{'all passed' if ok else 'FAILED'}; {', '.join(summary['gpus'])}; logs and summary.json in {out}")
    sys.exit(0 if ok else 1)


def _verdict(passed: bool | None) -> str:
    return {True: "passed", False: "FAILED", None: "skipped"}[passed]


if __name__ == "__main__":
    main()
