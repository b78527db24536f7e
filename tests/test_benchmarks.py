"""The benchmark tools that cannot be measured here still work here: benchmarks/gpu_check.py refuses without a
GPU and its commands only use flags the scripts have; make_reference_venv.sh and env_stack_throughput.py
start; compile_action_probe.py times what it says; rollout_interleaved.py tells copies that compute the same
from one that does not; atari_rollout_threads.py times both thread settings in turn; the docstrings shown by
--help keep their commands copyable. No timing: these check behaviour only."""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the refusal is tested on a GPU machine too


def run(*command, env=NO_GPU):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


def test_gpu_check_refuses_without_cuda_in_one_line():
    result = run(sys.executable, "benchmarks/gpu_check.py")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "needs a CUDA GPU" in lines[0], result.stderr


def test_gpu_check_dry_run_skips_a_comparison_without_its_reference():
    result = run(sys.executable, "benchmarks/gpu_check.py", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 7
    assert [line for line in lines if line.startswith("#")] == [
        "# compare_continuous: skipped, no reference script: give --reference-continuous or REFERENCE_CONTINUOUS",
        "# compare_atari: skipped, no reference script: give --reference-atari or REFERENCE_ATARI",
    ]


def test_gpu_check_commands_use_only_flags_the_scripts_have():
    env = {**NO_GPU, "REFERENCE_CONTINUOUS": "/ref/a.py", "REFERENCE_ATARI": "/ref/b.py", "COLUMNS": "200"}
    result = run(sys.executable, "benchmarks/gpu_check.py", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert len(commands) == 7 and not any(c[0].startswith("#") for c in commands)
    wanted = {}  # help command -> flags it must list
    for c in commands:
        if "--worker" in c:  # SELF --worker SCRIPT PREFIX -- FLAGS
            i = c.index("--worker")
            wanted.setdefault((sys.executable, c[i + 1], "--help"), set()).update(c[c.index("--") + 1 :])
            if "torch.distributed.run" in c:
                launcher = c[c.index("torch.distributed.run") + 1 : c.index(gpu_check.SELF)]
                wanted.setdefault((sys.executable, "-m", "torch.distributed.run", "--help"), set()).update(launcher)
        else:
            i = c.index("benchmarks/compare_reference.py")
            wanted.setdefault((sys.executable, c[i], "--help"), set()).update(c[i + 1 :])
    assert {w[-2] for w in wanted} == {"ppo_continuous.py", "ppo_atari.py", "ppo_llm_toy.py",
                                       "benchmarks/compare_reference.py", "torch.distributed.run"}  # fmt: skip
    helps = {w: subprocess.Popen(w, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env) for w in wanted}
    for command, process in helps.items():
        text = process.communicate(timeout=120)[0]
        assert process.returncode == 0, command
        for flag in (f for f in wanted[command] if f.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} not in {' '.join(command)}"


def test_gpu_check_worker_reports_a_run_and_a_cpu_run_fails_the_check(tmp_path):
    flags = ["--no-cuda", "--env-id", "Hopper-v4", "--total-timesteps", "64", "--num-steps", "32",
             "--num-minibatches", "2", "--update-epochs", "1", "--eval-episodes", "1", "--runs-dir", str(tmp_path)]  # fmt: skip
    worker = [sys.executable, "benchmarks/gpu_check.py", "--worker", "ppo_continuous.py", str(tmp_path / "c")]
    result = run(*worker, "--", *flags)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "c_rank0.json").read_text())
    assert report["summary"]["status"] == "completed" and report["summary"]["global_step"] == 64
    assert report["cuda_max_memory_bytes"] == 0 and report["backend"] is None
    passed, detail, _ = gpu_check.check(gpu_check.Step("c", [], 60), 0, tmp_path, gpus=1)
    assert not passed and "0 MiB of CUDA memory" in detail  # it stayed on the CPU
    assert gpu_check.check(gpu_check.Step("c", [], 60), None, tmp_path, gpus=1)[:2] == (
        False, "stopped at its time limit (60 s)",
    )  # fmt: skip


def test_make_reference_venv_is_valid_bash_and_refuses_a_folder_inside_the_repository():
    script = "benchmarks/make_reference_venv.sh"
    assert run("bash", "-n", script).returncode == 0
    if shutil.which("shellcheck"):
        checked = run("shellcheck", script)
        assert checked.returncode == 0, checked.stdout
    inside = run("bash", script, "benchmarks/venv", "continuous")
    assert inside.returncode == 2 and inside.stderr.startswith("error: ") and "inside the repository" in inside.stderr
    assert not (REPO / "benchmarks/venv").exists()
    wrong = run("bash", script, "/tmp/never-made", "pong")
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: ")


@pytest.mark.filterwarnings("ignore")
def test_env_stack_throughput_measures_each_way_and_names_the_versions(tmp_path):
    result = run(sys.executable, "benchmarks/env_stack_throughput.py", "--steps", "50", "--warmup", "5",
                 "--repeat", "2", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["sps"]) == {"make", "make_no_checker", "unwrapped", "make_vector_env"}, saved["skipped"]
    assert all(len(v) == 2 and min(v) > 0 for v in saved["sps"].values())
    assert set(saved["versions"]) == {"gymnasium", "mujoco", "numpy"} and all(saved["versions"].values())


def test_compile_end_to_end_needs_a_reference_for_its_third_run():
    result = run(sys.executable, "benchmarks/compile_end_to_end.py", "--order", "ABC")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--order is made of A, B and C; C needs --reference")


@pytest.mark.filterwarnings("ignore")
def test_compile_action_probe_times_the_action_apart_from_the_step():
    import compile_action_probe

    result = run(sys.executable, "-c", compile_action_probe.CHILD, str(REPO), "eager", "Hopper-v4", "64")
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(measured) == {"action_us", "step_us", "compile_s", "checksum"}
    assert 0 < measured["action_us"] < measured["step_us"] and measured["compile_s"] == 0.0
    again = json.loads(run(sys.executable, "-c", compile_action_probe.CHILD, str(REPO), "eager", "Hopper-v4", "64")
                       .stdout.strip().splitlines()[-1])  # fmt: skip
    assert again["checksum"] == measured["checksum"] != 0.0  # the same seed draws the same actions


def interleave_an_identical_and_a_changed_copy(tmp_path, sample: str, changed: str, *flags: str):
    """rollout_interleaved.py on ppo_continuous.py against an identical copy, then against a copy with `sample`
    replaced by `changed`, 3 rounds each on InvertedPendulum-v4; checks what both phases report alike and returns
    each run's (copies, result, saved record), identical copy first, and the identical copy's path."""
    same, other = tmp_path / "same.py", tmp_path / "other.py"
    script = (REPO / "ppo_continuous.py").read_text()
    assert script.count(sample) == 1
    same.write_text(script)
    other.write_text(script.replace(sample, changed))
    runs = []
    for copies, expect_same in (
        ((REPO / "ppo_continuous.py", same), True),
        ((REPO / "ppo_continuous.py", other), False),
    ):
        out = tmp_path / f"{expect_same}.json"
        result = run(sys.executable, "benchmarks/rollout_interleaved.py", "--scripts", *map(str, copies),
                     "--env-id", "InvertedPendulum-v4", "--rounds", "3", "--out", str(out), *flags)  # fmt: skip
        assert result.returncode == 0, result.stderr
        saved = json.loads(out.read_text())
        assert saved["same_rollouts"] is expect_same  # the same rollouts (or weights after the update) every round
        assert saved["first_difference_round"] == (None if expect_same else 0)
        assert all(len(times) == 3 and min(times) > 0 for times in saved["us_per_step"].values())
        runs.append((copies, result, saved))
    return runs, same


def test_rollout_interleaved_tells_copies_that_compute_the_same_from_one_that_does_not(tmp_path):
    sample = "return mean + self.actor_logstd.exp() * torch.randn_like(mean)"
    narrower = sample.replace("exp()", "exp() * 0.5")  # a narrower policy
    runs, same = interleave_an_identical_and_a_changed_copy(tmp_path, sample, narrower, "--steps", "32")
    for copies, _, saved in runs:
        assert saved["summary"][str(copies[0])]["ratio_to_first_median"] == 1.0
    result = run(sys.executable, "benchmarks/rollout_interleaved.py", "--scripts", str(same))
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith(
        "needs two or more copies to compare"
    )
    result = run(sys.executable, "benchmarks/rollout_interleaved.py", "--scripts", str(same), str(same))
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith("give each copy its own file")


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmark_docstrings_keep_the_line_continuations_of_their_commands(path):
    """A command written over several lines with a trailing backslash in a module docstring must keep its
    backslashes in --help (and pydoc): in a plain string a backslash-newline joins the lines into one with
    a run of spaces inside, a command that can no longer be copied as shown. So such docstrings are raw."""
    source = path.read_text()
    module = ast.parse(source)
    if "\\\n" in ast.get_source_segment(source, module.body[0]):
        assert "\\\n" in ast.get_docstring(module, clean=False), f'{path.name}: make it r"""..."""'


def test_rollout_interleaved_update_phase_repeats_one_update_and_tells_a_changed_loss(tmp_path):
    term = "args.vf_coef * value_loss"  # doubled: a heavier value loss, other weights after an update
    runs, _ = interleave_an_identical_and_a_changed_copy(tmp_path, term, "2.0 * " + term, "--phase", "update")
    for _, result, saved in runs:
        assert saved["phase"] == "update" and saved["steps"] == 2048  # the copy's default rollout, updated on
        assert "weights after the update" in result.stdout


def test_atari_rollout_threads_times_both_ways_in_turn_with_the_scripts_own_thread_rule(tmp_path):
    result = run(sys.executable, "benchmarks/atari_rollout_threads.py", "--num-envs", "2", "--num-steps", "8",
                 "--rounds", "2", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "results.json").read_text())
    threads = saved["threads"]
    assert threads["rollout_threads"] == max(1, threads["all"] - 2)  # the cores 2 emulator threads leave free
    assert all(len(times) == 2 and min(times) > 0 for times in saved["seconds_per_rollout"].values())
    assert saved["ratios"] == [a / b for a, b in zip(*saved["seconds_per_rollout"].values(), strict=True)]
    assert saved["command"].endswith("--rounds 2 --out " + str(tmp_path))
    result = run(sys.executable, "benchmarks/atari_rollout_threads.py", "--rounds", "1")
    message = result.stderr.strip().splitlines()[-1]  # one line, from argparse
    assert result.returncode == 2 and message.endswith(
        "--rounds must be 2 or more: the order of the two ways alternates"
    )
