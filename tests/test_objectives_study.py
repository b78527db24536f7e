"""Tests of benchmarks/ppo_objectives_study.py: the grid is the issue's, every setting is a valid command
line, a finished run is recorded once and skipped afterwards, a run cut short is never counted, and the
normalized score is the paper's."""

import argparse
import json
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import ppo_objectives_study as study  # noqa: E402

import ppo_continuous as pc  # noqa: E402


def test_the_grid_is_the_44_runs_of_the_study():
    runs = study.grid()
    assert len(runs) == len(set(runs)) == 44
    table1 = [r for r in runs if r[0] in study.TABLE1]
    assert len(table1) == 24 and {r[1] for r in table1} == set(study.ENVS)
    epochs = [r for r in runs if "epochs" in r[0]]
    assert len(epochs) == 8 and {r[1] for r in epochs} == {"HalfCheetah-v4"}
    assert len([r for r in runs if "lambda" in r[0]]) == 4
    assert len([r for r in runs if r[0].startswith("ppo_m")]) == 8
    assert {seed for _, _, seed in runs} == {1, 2}
    assert runs[:12] == [r for r in table1 if r[2] == 1]  # Table 1's first seed runs first
    assert [seed for _, _, seed in runs] == [1] * 22 + [2] * 22  # then every part with seed 1, then seed 2


@pytest.mark.parametrize("setting", list(study.SETTINGS))
def test_every_setting_is_a_valid_command_line(setting):
    args = pc.parse_args(["--env-id", "Hopper-v4", *study.SETTINGS[setting]])
    pc.validate_args(args)
    no_clip = setting.startswith("none") or setting.endswith("_none")
    expected = "none" if no_clip else "kl-penalty" if setting.startswith("kl") else "clip"
    assert args.policy_objective == expected
    if setting.startswith("ppo_m"):
        assert not (args.norm_reward or args.ortho_init or args.anneal_lr or args.clip_vloss) and args.norm_obs


def study_args(tmp_path, script=None):
    return argparse.Namespace(out=str(tmp_path), script=Path(script or REPO / "ppo_continuous.py"), parallel=1)


def test_a_finished_run_is_recorded_once_and_then_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "STEPS", 4096)  # 2 iterations of 2,048 steps
    study.run_one("kl_adaptive", "Hopper-v4", 1, study_args(tmp_path), threading.Lock())
    (record,) = study.read_records(tmp_path)
    assert record["key"] == "Hopper-v4__kl_adaptive__1" and record["status"] == "completed"
    assert record["global_step"] == 4096 and record["eval_return_mean"] is not None
    series = record["per_iteration"]
    assert series["step"] == [2048, 4096] and len(series["ratio_max"]) == len(series["exact_kl"]) == 2
    assert series["beta"][0] == 1.0 and len(series["return"]) == 2
    assert "--adaptive-kl" in record["command"] and record["code"]
    todo = study.runs_to_do(tmp_path)
    assert len(todo) == 43 and ("kl_adaptive", "Hopper-v4", 1) not in todo


def test_a_run_cut_short_is_not_counted_and_is_redone_from_nothing(tmp_path):
    fake = tmp_path / "interrupted_script.py"  # writes what a run stopped by Ctrl-C leaves, exits 130
    fake.write_text(
        "import json, sys, pathlib\n"
        "runs = pathlib.Path(sys.argv[sys.argv.index('--runs-dir') + 1]) / 'study__x'\n"
        "runs.mkdir(parents=True)\n"
        "(runs / 'summary.json').write_text(json.dumps({'status': 'interrupted', 'global_step': 2048}))\n"
        "sys.exit(130)\n"
    )
    args = study_args(tmp_path / "out", fake)
    (tmp_path / "out").mkdir()
    study.run_one("clip", "Hopper-v4", 1, args, threading.Lock())
    assert study.read_records(tmp_path / "out") == []
    assert ("clip", "Hopper-v4", 1) in study.runs_to_do(tmp_path / "out")
    stale = tmp_path / "out" / "runs" / "Hopper-v4__clip__1" / "study__x"
    assert stale.exists()
    # Run again: the stale folder is removed first (the fake's mkdir would fail on it), still nothing counted.
    study.run_one("clip", "Hopper-v4", 1, args, threading.Lock())
    log = (tmp_path / "out" / "logs" / "Hopper-v4__clip__1.log").read_text()
    assert "FileExistsError" not in log and study.read_records(tmp_path / "out") == []


def fake_record(setting, env_id, seed, score):
    steps = [2048 * (i + 1) for i in range(3)]
    per_iteration = {"step": steps, "ratio_max": [1.1, 1.3, 1.25], "exact_kl": [0.01, 0.02, 0.03],
                     "clipfrac": [0.1, 0.2, 0.3], "explained_variance": [0.5, 0.6, 0.7],
                     "return": [1.0, None, 2.0]}  # fmt: skip
    return {"key": study.run_key(setting, env_id, seed), "setting": setting, "env_id": env_id, "seed": seed,
            "status": "completed", "mean_return_last100": score, "eval_return_mean": score,
            "per_iteration": per_iteration}  # fmt: skip


def test_normalized_score_is_the_papers():
    random_scores = {"HalfCheetah-v4": -300.0, "Hopper-v4": 20.0, "Walker2d-v4": 0.0}
    returns = {"none": -300.0, "clip": 1700.0, "kl_adaptive": 700.0, "kl_fixed": 1200.0}
    records = [fake_record(s, e, seed, r + (10 if seed == 2 else -10)) for s, r in returns.items() for e in study.ENVS
               for seed in (1, 2) if e == "HalfCheetah-v4"]  # fmt: skip
    records.append(fake_record("clip", "Hopper-v4", 1, 2000.0))  # Hopper: not every setting has run, not counted
    scores = study.normalized_scores(study.by_cell(records), random_scores)
    # HalfCheetah: random -300 is 0, the best setting (clip, mean 1700 over the seeds) is 1.
    assert scores["clip"] == pytest.approx([1990 / 2000, 2010 / 2000])
    assert scores["none"] == pytest.approx([-10 / 2000, 10 / 2000])
    assert scores["kl_adaptive"] == pytest.approx([990 / 2000, 1010 / 2000])


def test_report_writes_tables_and_figures(tmp_path):
    records = [fake_record(s, e, seed, 1000.0 + seed) for s, e, seed in study.grid()]
    records[0]["status"] = "diverged"
    text = study.report(tmp_path, records, {"HalfCheetah-v4": -300.0, "Hopper-v4": 20.0, "Walker2d-v4": 0.0})
    assert "44 of 44 runs done" in text and "1001*" in text
    assert (tmp_path / "tables.md").read_text() == text
    for name in ("table1_curves", "trust_region", "epochs", "gae_lambda", "ppo_m"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    json.dumps(records)  # the records are what results.jsonl holds


def test_a_run_claimed_by_a_live_study_is_left_to_it(tmp_path):
    claim = tmp_path / "claims" / "Hopper-v4__clip__1"
    assert study.claim(claim) and claim.read_text() == str(__import__("os").getpid())
    assert not study.claim(claim)  # claimed by a study that is alive (this one)
    claim.write_text("999999999")  # a study that was stopped: its claim is taken over
    assert study.claim(claim)


def test_normalized_score_counts_the_seeds_every_setting_has():
    """Walker2d with seed 2 of one setting only: each setting counts seed 1, so the best of seed 1 is the 1."""
    returns = {"none": 100.0, "clip": 1000.0, "kl_adaptive": 500.0, "kl_fixed": 2000.0}
    records = [fake_record(s, "Walker2d-v4", 1, r) for s, r in returns.items()]
    records.append(fake_record("clip", "Walker2d-v4", 2, 9000.0))  # not counted: the others lack seed 2
    scores = study.normalized_scores(study.by_cell(records), {"Walker2d-v4": 0.0})
    assert scores == {"none": [0.05], "clip": [0.5], "kl_adaptive": [0.25], "kl_fixed": [1.0]}


def test_the_study_page_shows_the_tables_of_the_runs_recorded():
    """docs/what_ppo_buys.md's generated blocks are those of results.jsonl (regenerate: the study's --report-only)."""
    out = REPO / "benchmarks" / "results" / "ppo_objectives"
    random_scores = json.loads((out / "random_policy.json").read_text())
    page = REPO / "docs" / "what_ppo_buys.md"
    blocks = study.page_blocks(study.read_records(out), random_scores)
    assert study.update_page(page, blocks) == page.read_text(), (
        "stale tables; run: python benchmarks/ppo_objectives_study.py --report-only"
    )


def test_update_page_replaces_only_the_marked_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- study:a -->\nold\n<!-- /study:a -->\nprose\n")
    assert study.update_page(page, {"a": "new"}) == "intro\n<!-- study:a -->\nnew\n<!-- /study:a -->\nprose\n"
    with pytest.raises(SystemExit, match="no <!-- study:b --> marker"):
        study.update_page(page, {"b": "x"})
