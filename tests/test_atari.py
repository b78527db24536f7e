"""Tests of ppo_atari.py: each Atari preprocessing detail on a real game, on both environment paths;
the gymnasium 1.x rollout (no phantom transitions, life loss as episode end), the advantage
estimation, two-process data parallelism, checkpoints, evaluation in a fresh process, resume (settings,
RNG states, logs), interruption, divergence, determinism and bad input."""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ppo_atari as pa

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "ppo_atari.py")
BACKENDS = ["ale_vector", "gymnasium"]


# One torch thread in every run of these tests: on a busy 2-core machine a second thread waits for a core
# and a forward pass of the CNN takes ~50x longer (measured: 85 ms instead of 1.6 ms for 4 observations).
ONE_THREAD = ["--torch-threads", "1"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(tmp_path, **overrides) -> pa.Args:
    """A run of a few seconds: 2 iterations of 4 envs x 16 steps on Breakout."""
    base = pa.Args(
        total_timesteps=128, num_envs=4, num_steps=16, num_minibatches=2, update_epochs=2,
        runs_dir=str(tmp_path / "runs"), eval_episodes=1, cuda=False, torch_threads=1,
    )  # fmt: skip
    return replace(base, **overrides)


def run_cli(*flags, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=REPO,
    )  # fmt: skip


def t(rows):
    """A (T, N) float tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)


# ADVANTAGE ESTIMATION (the same function and semantics as ppo_continuous.py)


def test_gae_termination_hand_computed():
    gamma, lam = 0.9, 0.8
    rewards, values = t([[1.0], [2.0], [3.0]]), t([[0.5], [1.0], [2.0]])
    next_values = t([[1.0], [7.0], [4.0]])  # V(s1), V(final obs) (ignored: terminal), V(s_T)
    terminations, ends = t([[0], [1], [0]]), t([[0], [1], [0]])
    adv, ret = pa.compute_gae(rewards, values, next_values, terminations, ends, gamma, lam)
    d2, d1, d0 = 3.0 + 0.9 * 4.0 - 2.0, 2.0 - 1.0, 1.0 + 0.9 * 1.0 - 0.5
    expected = [d0 + gamma * lam * d1, d1, d2]  # the recursion stops at the episode end
    assert adv.squeeze(1).tolist() == pytest.approx(expected)
    assert (ret - adv).squeeze(1).tolist() == pytest.approx([0.5, 1.0, 2.0])


def test_gae_truncation_bootstraps_from_final_observation():
    gamma, lam = 0.99, 0.95
    rewards, values = t([[1.0], [1.0]]), t([[2.0], [3.0]])
    next_values = t([[5.0], [3.5]])  # 5.0 = V(final obs) of the ended episode
    ends = t([[1], [0]])
    adv_term, _ = pa.compute_gae(rewards, values, next_values, t([[1], [0]]), ends, gamma, lam)
    adv_trunc, _ = pa.compute_gae(rewards, values, next_values, t([[0], [0]]), ends, gamma, lam)
    assert adv_term[0, 0].item() == pytest.approx(1.0 - 2.0)
    assert adv_trunc[0, 0].item() == pytest.approx(1.0 + gamma * 5.0 - 2.0)
    assert adv_term[1, 0].item() == pytest.approx(adv_trunc[1, 0].item())


# ATARI PREPROCESSING, OBSERVED ON REAL GAMES, ON BOTH PATHS


@pytest.mark.parametrize("backend", BACKENDS)
def test_observation_format_and_frame_stack_order(backend):
    envs = pa.make_vector_env("BreakoutNoFrameskip-v4", 2, backend)
    assert envs.single_observation_space.shape == (4, 84, 84)
    assert envs.single_observation_space.dtype == np.uint8
    assert envs.single_action_space.n == 4
    assert envs.metadata["autoreset_mode"] == pa.gym.vector.AutoresetMode.SAME_STEP
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    # A new game: the 2 older slots are zero padding, then the first frame and the frame after FIRE.
    assert not obs[:, :2].any() and obs[:, 2].any() and obs[:, 3].any()
    newest = [obs[:, 2], obs[:, 3]]  # the frames seen so far, in the order they were seen
    for _ in range(6):
        new_obs, *_ = envs.step(np.array([2, 3]))
        assert np.array_equal(new_obs[:, :3], obs[:, 1:])  # shifted by one: the oldest frame dropped
        newest.append(new_obs[:, 3])
        obs = new_obs
    # Oldest first: slot k holds the frame seen 3 - k steps ago, slot 3 the one just seen.
    assert all(np.array_equal(obs[:, k], newest[-4 + k]) for k in range(4))
    assert not np.array_equal(newest[-1], newest[-4])  # the picture moved: the order is really tested
    envs.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noop_reset_draws_0_to_29_noop_frames_on_both_paths(backend):
    # ale-py's vector env (src/ale/vector/preprocessed_env.cpp) draws 0-29 no-op frames; NoopReset draws
    # from the same range. Then the FIRE step of 4 frames on both paths.
    envs = pa.make_vector_env("BreakoutNoFrameskip-v4", 8, backend)
    frames = []
    for i in range(20):  # seeded once: a seeded reset reloads the ROM (~0.25 s per env), an unseeded one does not
        _, info = envs.reset(seed=0) if i == 0 else envs.reset()
        frames.extend(info["episode_frame_number"].tolist())
    envs.close()
    noops = [f - 4 for f in frames]
    assert min(noops) >= 0 and max(noops) <= 29, noops
    # 160 draws: each end of the range shows up (a path drawing 1-30 would fail the first or the bound above).
    assert min(noops) == 0 and max(noops) == 29 and len(set(noops)) >= 25, sorted(set(noops))


def test_max_and_skip_pools_the_last_two_of_four_frames():
    import cv2

    env = pa.make_atari_env("BreakoutNoFrameskip-v4")
    env.reset(seed=0)
    ale = env.unwrapped.ale
    action_set = env.unwrapped._action_set
    pooled_differs_from_last = False
    for step in range(40):
        action = [1, 2, 3][step % 3]
        state = ale.cloneState()
        obs = env.step(action)[0][-1]  # the newest frame of the stack
        ale.restoreState(state)  # replay the same 4 frames by hand (v4: no sticky actions)
        screens = []
        for _ in range(4):
            ale.act(action_set[action])
            screens.append(ale.getScreenGrayscale())
        resize = lambda s: cv2.resize(s, (84, 84), interpolation=cv2.INTER_AREA)  # noqa: E731
        assert np.array_equal(obs, resize(np.maximum(screens[2], screens[3])))
        pooled_differs_from_last |= not np.array_equal(obs, resize(screens[3]))
    assert pooled_differs_from_last  # the pooling was really exercised (the ball moves)
    env.close()


def test_both_paths_compute_the_same_pixels():
    """With the reset's randomness off (no no-ops, no FIRE) and the settings make_vector_env uses,
    ale-py's C++ preprocessing and the readable path's wrappers give identical pixels for the same
    actions: the same max over the last two frames, grayscale palette, INTER_AREA resize and stack
    order."""
    from ale_py.vector_env import AtariVectorEnv

    fast = AtariVectorEnv(
        "breakout", 1, noop_max=0, use_fire_reset=False, frameskip=4, maxpool=True, stack_num=4,
        img_height=84, img_width=84, grayscale=True, repeat_action_probability=0.0,
        autoreset_mode=pa.gym.vector.AutoresetMode.SAME_STEP,
    )  # fmt: skip
    readable = pa.gym.make("BreakoutNoFrameskip-v4", frameskip=1, obs_type="grayscale")
    readable = pa.MaxAndSkip(readable, skip=4)
    readable = pa.gym.wrappers.ResizeObservation(readable, (84, 84))
    readable = pa.gym.wrappers.FrameStackObservation(readable, 4, padding_type="zero")
    obs_fast, _ = fast.reset(seed=0)
    obs_readable, _ = readable.reset(seed=0)
    assert np.array_equal(obs_fast[0], obs_readable)
    for step in range(60):
        action = [1, 2, 2, 3, 0][step % 5]
        obs_fast = fast.step(np.array([action]))[0]
        obs_readable = readable.step(action)[0]
        assert np.array_equal(obs_fast[0], obs_readable), step
    fast.close()
    readable.close()


def play_one_game(backend: str, env_id: str, policy) -> dict:
    """Play env 0 until its first game ends; record what the learner sees at every step."""
    envs = pa.make_vector_env(env_id, 1, backend)
    obs, info = envs.reset(seed=3)
    lives, steps, rewards, life_losses = int(info["lives"][0]), 0, [], 0
    while True:
        new_obs, reward, terminated, truncated, info = envs.step(policy(steps))
        steps += 1
        rewards.append(float(reward[0]))
        games = pa.finished_games(info)
        if terminated[0] and not games:  # a lost life: the learning episode ends, the game goes on
            life_losses += 1
            assert int(info["lives"][0]) == lives - life_losses
            final_obs = info["final_obs"][0]
            assert np.array_equal(final_obs[:3], obs[0, 1:])  # the step the agent took ...
            assert np.array_equal(new_obs[0, :3], final_obs[1:])  # ... then FIRE, in the same game
        if games:
            assert terminated[0] or truncated[0]
            assert not new_obs[0, :2].any()  # the next game starts (first frame, then FIRE)
            envs.close()
            return {"game": games[0], "steps": steps, "rewards": rewards,
                    "life_losses": life_losses, "lives": lives}  # fmt: skip
        obs = new_obs


@pytest.mark.parametrize("backend", BACKENDS)
def test_life_loss_ends_the_learning_episode_but_not_the_game_and_score_is_unclipped(backend):
    rng = np.random.default_rng(0)
    result = play_one_game(backend, "SpaceInvadersNoFrameskip-v4", lambda _: rng.integers(0, 6, 1))
    score, length = result["game"]
    assert result["lives"] == 3 and result["life_losses"] == 2  # 3 lives, one game
    assert length == result["steps"] + 3  # all lives, and the FIRE pressed at the start and after each lost life
    assert set(result["rewards"]) <= {-1.0, 0.0, 1.0}  # the learner gets sign-clipped rewards
    # Invaders are worth 5 to 30 points: the reported full-game score is the raw one.
    assert score >= 5 * sum(result["rewards"]) > 0


def noop_only_events(backend: str, steps: int) -> list[tuple[int, int, bool]]:
    """(step, lives, game over) at every episode end of an agent that only ever sends NOOP."""
    envs = pa.make_vector_env("BreakoutNoFrameskip-v4", 1, backend)
    envs.reset(seed=0)
    events = []
    for step in range(steps):
        _, _, terminated, truncated, info = envs.step(np.array([0]))
        if terminated[0] or truncated[0]:
            events.append((step, int(info["lives"][0]), bool(pa.finished_games(info))))
    envs.close()
    return events


def test_fire_serves_the_ball_at_the_start_and_after_every_lost_life():
    events = {backend: noop_only_events(backend, 600) for backend in BACKENDS}
    # The agent itself never presses FIRE: the env serves every ball, so it loses life after life
    # and finishes games (FIRE only at the start of a game would stall after the first lost life).
    games = [event for event in events["ale_vector"] if event[2]]
    assert len(games) >= 4
    lives = [lives for _, lives, _ in events["ale_vector"]]
    assert lives[:10] == [4, 3, 2, 1, 5, 4, 3, 2, 1, 5]  # game over after the 5th ball: a new game, 5 lives
    assert events["gymnasium"] == events["ale_vector"]  # the same lives and episode ends, step for step


def test_both_paths_agree_on_a_whole_game():
    """Same game, same scripted play: the paths differ only in their no-op draws, so compare what
    must not depend on them: format, clipped rewards, life-loss signals and score accounting."""
    rng = np.random.default_rng(1)
    actions = rng.integers(0, 4, 5000)
    results = {b: play_one_game(b, "BreakoutNoFrameskip-v4", lambda i: actions[i : i + 1]) for b in BACKENDS}
    for result in results.values():
        score, length = result["game"]
        assert result["life_losses"] == result["lives"] - 1 == 4
        assert length == result["steps"] + 5  # and one FIRE per ball
        assert score >= sum(result["rewards"]) >= 0
        assert set(result["rewards"]) <= {0.0, 1.0}


# ROLLOUT


def test_the_rollout_keeps_each_observation_even_if_the_env_reuses_its_array():
    class ReusingEnvs:  # writes every step's frames into the same array, as some vector envs do
        def __init__(self):
            self.frames, self.t = np.zeros((2, 4, 84, 84), np.uint8), 0

        def step(self, actions):
            self.t += 1
            self.frames[:] = self.t
            no = np.zeros(2, bool)
            return self.frames, np.zeros(2, np.float32), no, no, {}

    envs = ReusingEnvs()
    rollout, next_obs = pa.collect_rollout(envs, pa.Agent(4), torch.as_tensor(envs.frames.copy()), 5)
    assert [int(rollout.obs[t].float().mean()) for t in range(5)] == [0, 1, 2, 3, 4]
    assert int(next_obs.float().mean()) == 5


def test_the_rollout_leaves_the_cores_to_the_emulators_and_computes_the_same_numbers():
    def rollout(threads: int) -> pa.Rollout:  # the same seeds, weights and first observation each time
        torch.manual_seed(0)
        envs = pa.make_vector_env("BreakoutNoFrameskip-v4", 4, "ale_vector")
        agent = pa.Agent(4, bf16=pa.Args().bf16)  # this CPU's default precision
        raw_obs, _ = envs.reset(seed=0)
        torch.set_num_threads(threads)
        result, _ = pa.collect_rollout(envs, agent, torch.as_tensor(raw_obs), 32)
        envs.close()
        return result

    one, two = rollout(1), rollout(2)
    for name in ("obs", "actions", "logprobs", "values", "next_values"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    run = SimpleNamespace(envs=SimpleNamespace(num_envs=8), args=SimpleNamespace(), device=torch.device("cpu"))
    for threads, backend, expected in [(2, "ale_vector", 1), (16, "ale_vector", 8), (2, "gymnasium", 2)]:
        torch.set_num_threads(threads)
        run.args.env_backend = backend  # the gymnasium path steps its envs in this thread: nothing to leave free
        with pa.Run.rollout_threads(run):
            assert torch.get_num_threads() == expected
        assert torch.get_num_threads() == threads  # the update gets them all back


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_phantom_transition_reaches_the_rollout(backend):
    torch.manual_seed(0)
    envs = pa.EpisodeAndTimeMonitor(pa.make_vector_env("BreakoutNoFrameskip-v4", 2, backend))  # as train() watches
    agent = pa.Agent(4)
    value_calls = []
    get_value = agent.get_value
    agent.get_value = lambda obs: value_calls.append(len(obs)) or get_value(obs)
    raw_obs, _ = envs.reset(seed=0)
    rollout, _ = pa.collect_rollout(envs, agent, torch.as_tensor(raw_obs), 300)
    games, _ = envs.pop()
    envs.close()
    obs = rollout.obs  # (T, N, 4, 84, 84) uint8
    assert obs.dtype == torch.uint8 and obs.shape == (300, 2, 4, 84, 84)
    new_games = life_losses = 0
    for step in range(299):
        for n in range(2):
            if not obs[step + 1, n, :2].any():  # a fresh game starts at step + 1 ...
                new_games += 1  # ... right after the step that ended the last one:
                assert rollout.terminations[step, n] == rollout.episode_ends[step, n] == 1
            elif rollout.terminations[step, n]:  # a lost life: the agent's step, then FIRE, which is
                life_losses += 1  # part of the reset and not a row of the rollout: two frames on
                assert torch.equal(obs[step + 1, n, :2], obs[step, n, 2:])
            else:  # every other row is one step, with the action the agent chose
                assert torch.equal(obs[step + 1, n, :3], obs[step, n, 1:])
    # Under NEXT_STEP autoreset a phantom reset step would follow each game's end: its obs would be
    # a fresh game that no ended step precedes. Had FIRE replaced the agent's action in the row after
    # a lost life, that row would be recorded with an action the env did not take, and the stack
    # would move by one frame after the lost life, not two. The assertions above rule out both.
    assert new_games == len(games) >= 1
    assert life_losses >= 4 * new_games
    # Nothing was truncated, so no V(final_obs) was computed: only V(s_T) of the last observation.
    assert value_calls == [2]
    assert set(rollout.rewards.unique().tolist()) <= {0.0, 1.0}


def test_truncation_bootstraps_and_termination_does_not_in_the_rollout(monkeypatch):
    envs = pa.make_vector_env("BreakoutNoFrameskip-v4", 1, "ale_vector")
    envs.reset(seed=0)
    agent = pa.Agent(4)
    real_step = envs.step
    calls = {"n": 0}

    def step(actions):  # the 5th step is cut by a (simulated) time limit
        obs, reward, terminated, truncated, info = real_step(actions)
        calls["n"] += 1
        if calls["n"] == 5:
            truncated = np.array([True])
            info["final_obs"] = np.full((1, 4, 84, 84), 7, np.uint8)
        return obs, reward, terminated, truncated, info

    monkeypatch.setattr(envs, "step", step)
    raw_obs, _ = envs.reset(seed=0)
    rollout, _ = pa.collect_rollout(envs, agent, torch.as_tensor(raw_obs), 8)
    with torch.inference_mode():
        v_final = agent.get_value(torch.full((1, 4, 84, 84), 7, dtype=torch.uint8))
    assert rollout.episode_ends[4, 0] == 1 and rollout.terminations[4, 0] == 0
    assert rollout.next_values[4, 0].item() == pytest.approx(v_final.item())  # V(final obs)
    assert rollout.next_values[3, 0].item() == pytest.approx(rollout.values[4, 0].item())


# NETWORK AND LOSS


def test_initialization_and_pixel_scaling():
    agent = pa.Agent(6)
    w = agent.actor.weight  # orthogonal rows with gain 0.01
    assert torch.allclose(w @ w.T, 1e-4 * torch.eye(6), atol=1e-8)
    assert torch.allclose(agent.critic.weight @ agent.critic.weight.T, torch.ones(1, 1))
    assert all(not m.bias.any() for m in agent.modules() if hasattr(m, "bias") and m.bias is not None)
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    _, logprob, entropy, _ = agent.get_action_and_value(obs)
    assert entropy.tolist() == pytest.approx([np.log(6)] * 3, abs=1e-3)  # near-uniform policy
    # uint8 in, scaled by 1/255 inside: the same as feeding the float pixels / 255 to the layers.
    expected = agent.network(obs.float() / 255.0)
    assert torch.allclose(agent.features(obs), expected, atol=1e-5)


def test_channels_last_and_bf16_compute_the_same_function():
    torch.manual_seed(0)
    fast = pa.Agent(4, channels_last=True)
    plain = pa.Agent(4, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    actions = torch.randint(0, 4, (8,))
    _, lp_fast, _, v_fast = fast.get_action_and_value(obs, actions)
    _, lp_plain, _, v_plain = plain.get_action_and_value(obs, actions)
    assert torch.allclose(lp_fast, lp_plain, atol=1e-5) and torch.allclose(v_fast, v_plain, atol=1e-5)
    bf16 = pa.Agent(4, channels_last=True, bf16=True)
    bf16.load_state_dict(fast.state_dict())
    _, lp_bf16, _, v_bf16 = bf16.get_action_and_value(obs, actions)
    assert lp_bf16.dtype == torch.float32  # the loss is computed in float32
    assert torch.allclose(lp_bf16, lp_plain, atol=2e-2) and torch.allclose(v_bf16, v_plain, atol=5e-2)
    assert not torch.equal(lp_bf16, lp_plain)  # bfloat16 was really used


def test_bf16_pixels_go_straight_to_bfloat16_with_the_numbers_of_the_float32_path():
    """Under --bf16 features() converts the uint8 pixels to bfloat16 directly: bitwise what the float32 pixels / 255,
    cast by autocast at the first convolution, give; the forward pass and the gradients are those of that path."""
    torch.manual_seed(0)
    agent = pa.Agent(4, channels_last=True, bf16=True)
    obs = torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = agent.features(obs)
        direct.float().sum().backward()
        grads = [p.grad.clone() for p in agent.network.parameters()]
        agent.zero_grad()
        via_float32 = agent.network(obs.to(torch.float32, memory_format=torch.channels_last) * (1.0 / 255.0))
        via_float32.float().sum().backward()
    assert direct.dtype == torch.bfloat16 and torch.equal(direct, via_float32)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, agent.network.parameters(), strict=True))


@pytest.mark.parametrize(
    ("gpu", "flags", "expected"),
    [(False, "fpu avx512f avx512_bf16", True), (False, "fpu amx_bf16 amx_tile", True), (False, "fpu avx512f avx2", False),
     (True, "avx512_bf16 amx_bf16", False)],
)  # fmt: skip
def test_bf16_is_the_default_only_on_a_cpu_with_native_bfloat16(tmp_path, monkeypatch, gpu, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert pa.cpu_has_native_bf16(cpuinfo) is expected
    assert pa.cpu_has_native_bf16(tmp_path / "missing") is False  # not Linux: off
    monkeypatch.setattr(pa, "cpu_has_native_bf16", lambda: expected)  # what Args' default asks
    assert pa.Args().bf16 is expected
    assert pa.Args(bf16=not expected).bf16 is (not expected)  # --bf16 / --no-bf16 still decide
    assert pa.parse_args(["--no-bf16" if expected else "--bf16"]).bf16 is (not expected)


@pytest.mark.parametrize("bf16", [False, True])
def test_ratio_is_one_on_the_first_minibatch(tmp_path, monkeypatch, bf16):
    """Rollout and update compute log pi_old alike (under --bf16 the same autocast): ratio 1."""
    ratios = []
    original = pa.ppo_loss

    def spy(new_logprobs, old_logprobs, *rest):
        ratios.append((new_logprobs - old_logprobs).exp().detach())
        return original(new_logprobs, old_logprobs, *rest)

    monkeypatch.setattr(pa, "ppo_loss", spy)
    pa.train(tiny_args(tmp_path, total_timesteps=64, bf16=bf16))
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0]), atol=1e-5)
    assert not torch.allclose(ratios[-1], torch.ones_like(ratios[-1]), atol=1e-7)


# DATA PARALLEL


def _rank_worker(rank: int, out: str, port: int) -> None:
    """One torchrun-like process: the environment variables torchrun sets, then train()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    captured = {}
    original = pa.update_policy

    def spy(agent, *rest):
        captured["agent"] = agent
        return original(agent, *rest)

    pa.update_policy = spy
    collect = pa.collect_rollout

    def collect_and_finish_a_game(envs, *rest):  # one game of score 1000 + rank per rollout and process
        result = collect(envs, *rest)
        envs.episodes.append((1000.0 + rank, 7))  # as if the monitor train() puts around the envs saw it
        return result

    pa.collect_rollout = collect_and_finish_a_game
    args = pa.Args(
        total_timesteps=192, num_envs=4, num_steps=16, num_minibatches=2, update_epochs=2,
        runs_dir=str(Path(out) / "runs"), eval_episodes=1, cuda=False, torch_threads=1,
        target_kl=1e-9,  # stops after the first epoch: only if all ranks agree
    )  # fmt: skip
    summary = pa.train(args)
    torch.save({"model": captured["agent"].state_dict(), "summary": summary}, f"{out}/rank{rank}.pt")


def test_two_processes_stay_bitwise_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.spawn(_rank_worker, args=(str(tmp_path), port), nprocs=2, join=False)
    deadline = time.time() + 120  # a rank that broke out of the loop alone would hang the other
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish: a collective operation hangs")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key
    assert rank0["summary"]["global_step"] == rank1["summary"]["global_step"] == 192
    assert rank0["summary"]["run_dir"] and rank1["summary"]["run_dir"] is None  # rank 0 logs only
    # Rank 0's logs and returns hold the games of both processes (3 iterations x 2 processes).
    assert rank0["summary"]["episodes"] == rank1["summary"]["episodes"] == 6
    assert rank0["summary"]["mean_return"] == rank1["summary"]["mean_return"] == 1000.5
    assert len(list((tmp_path / "runs").iterdir())) == 1
    saved = pa.load_checkpoint(rank0["summary"]["checkpoint"])["model"]
    assert all(torch.equal(saved[k], rank0["model"][k]) for k in saved)


# END TO END: LOGS, CHECKPOINTS, EVALUATION, DETERMINISM, RESUME


@pytest.mark.parametrize(
    ("backend", "flags"),
    [("ale_vector", {}), ("gymnasium", {"bf16": True, "channels_last": False})],
)
def test_train_writes_logs_checkpoint_and_summary(tmp_path, backend, flags):
    summary = pa.train(tiny_args(tmp_path, env_backend=backend, total_timesteps=256, **flags))
    run_dir = Path(summary["run_dir"])
    assert summary["status"] == "completed" and summary["env_backend"] == backend
    assert summary["global_step"] == 256 and summary["iterations"] == 4
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["time_env_s"] > 0 and summary["time_inference_s"] > 0 and summary["time_update_s"] > 0
    checkpoint = pa.load_checkpoint(summary["checkpoint"], "BreakoutNoFrameskip-v4")
    assert checkpoint["global_step"] == 256 and checkpoint["iteration"] == 4
    assert set(checkpoint) >= {"model", "optimizer", "rng", "args"}  # the random states too, for --resume

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    expected = {
        "charts/learning_rate", "charts/SPS", "losses/policy_loss", "losses/value_loss",
        "losses/entropy", "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac",
        "losses/explained_variance", "time/env_s", "time/inference_s", "time/update_s",
        "eval/episodic_return_mean",
    }  # fmt: skip
    assert expected <= set(events.Tags()["scalars"])
    learning_rates = [e.value for e in events.Scalars("charts/learning_rate")]
    assert learning_rates == pytest.approx([2.5e-4, 1.875e-4, 1.25e-4, 0.625e-4])


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path):
    summary = pa.train(tiny_args(tmp_path, eval_episodes=2, seed=5))
    result = run_cli("--eval-checkpoint", summary["checkpoint"], "--eval-episodes", "2", "--seed", "5", *ONE_THREAD)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    # The format benchmarks/run_benchmark.py parses.
    assert line.startswith(f"BreakoutNoFrameskip-v4 ({summary['checkpoint']}, 128 steps): return ")
    mean, std = (float(x) for x in line.split("return ")[1].split(" over")[0].split(" +- "))
    assert line.endswith("over 2 episodes")
    # The reloaded model plays exactly as the model at the end of training did.
    assert mean == pytest.approx(summary["eval_return_mean"], abs=0.051)
    assert std == pytest.approx(summary["eval_return_std"], abs=0.051)


def test_same_seed_gives_the_same_run(tmp_path):
    first = pa.train(tiny_args(tmp_path / "a"))
    second = pa.train(tiny_args(tmp_path / "b"))
    model_a = pa.load_checkpoint(first["checkpoint"])["model"]
    model_b = pa.load_checkpoint(second["checkpoint"])["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert first["eval_return_mean"] == second["eval_return_mean"]
    other = pa.load_checkpoint(pa.train(tiny_args(tmp_path / "c", seed=2))["checkpoint"])["model"]
    assert not all(torch.equal(model_a[k], other[k]) for k in model_a)


def test_sigterm_in_the_final_evaluation_keeps_checkpoint_and_logs(tmp_path, monkeypatch):
    def evaluate_until_sigterm(*args, **kwargs):  # a scheduler stops the job during evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(pa, "evaluate", evaluate_until_sigterm)
    summary = pa.train(tiny_args(tmp_path))
    assert summary["status"] == "interrupted" and "eval_return_mean" not in summary
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert pa.load_checkpoint(summary["checkpoint"])["global_step"] == 128

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert len(events.Scalars("losses/policy_loss")) == summary["iterations"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


def test_interrupted_run_saves_and_resumes_to_the_end(tmp_path):
    flags = [
        "--total-timesteps", "960", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--save-interval", "1", "--eval-episodes", "1", "--runs-dir", str(tmp_path), "--no-cuda",
        *ONE_THREAD,
    ]  # fmt: skip
    process = subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 60
    while not list(tmp_path.glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 143, stdout  # 128 + SIGTERM's number, as is conventional (Ctrl-C: 130)
    assert "interrupted (SIGTERM)" in stdout
    (checkpoint_path,) = tmp_path.glob("*/checkpoint.pt")
    interrupted_at = pa.load_checkpoint(str(checkpoint_path))["global_step"]
    assert 0 < interrupted_at < 960
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted"

    # Only --resume: every setting (env, envs, steps, minibatches, total) comes from the checkpoint.
    result = run_cli("--resume", str(checkpoint_path), "--no-cuda", *ONE_THREAD, timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"resuming {checkpoint_path} at step {interrupted_at:,}" in result.stdout
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 960
    assert summary["run_dir"] == str(checkpoint_path.parent)  # the same run goes on
    final = pa.load_checkpoint(str(checkpoint_path), "BreakoutNoFrameskip-v4")
    assert final["iteration"] == 960 // 64


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_in_the_final_evaluation_exits_with_the_signal_code(tmp_path, monkeypatch, signum, exit_code):
    def evaluate_until_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal was not handled")

    monkeypatch.setattr(pa, "evaluate", evaluate_until_signal)
    flags = ["--total-timesteps", "64", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
             "--runs-dir", str(tmp_path), "--no-cuda", *ONE_THREAD]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    with pytest.raises(SystemExit) as exit_info:
        pa.main()
    assert exit_info.value.code == exit_code
    (summary_path,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == signal.Signals(signum).name
    assert pa.load_checkpoint(summary["checkpoint"])["global_step"] == 64


def diverge_at_iteration(monkeypatch, bad_iteration):
    """From bad_iteration on, the update starts from NaN weights, so its loss is NaN."""
    real_update, calls = pa.update_policy, []

    def update(agent, *rest):
        calls.append(1)
        if len(calls) >= bad_iteration:
            with torch.no_grad():
                agent.critic.weight.fill_(float("nan"))
        return real_update(agent, *rest)

    monkeypatch.setattr(pa, "update_policy", update)


def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    diverge_at_iteration(monkeypatch, 3)
    saved = []
    real_save = pa.save_checkpoint
    monkeypatch.setattr(pa, "save_checkpoint", lambda path, *a: (real_save(path, *a), saved.append(path.read_bytes())))
    with pytest.raises(pa.TrainingDiverged, match="the checkpoint of iteration 2 is kept"):
        pa.train(tiny_args(tmp_path, total_timesteps=256, save_interval=1))
    (checkpoint_path,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    assert checkpoint_path.read_bytes() == saved[-1] and len(saved) == 2  # nothing saved after the NaN
    checkpoint = pa.load_checkpoint(str(checkpoint_path))
    assert checkpoint["iteration"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["iterations"] == 2


def test_diverged_loss_without_a_checkpoint_says_so(tmp_path, monkeypatch):
    diverge_at_iteration(monkeypatch, 1)
    with pytest.raises(pa.TrainingDiverged, match="nothing saved"):
        pa.train(tiny_args(tmp_path))
    assert not list((tmp_path / "runs").glob("*/checkpoint.pt"))


def test_resume_restores_everything_and_drops_the_logs_past_the_checkpoint(tmp_path, monkeypatch):
    real_save, saved, rng_at_save, rng_at_restore = pa.save_checkpoint, {}, {}, []

    def rng_now():
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    def save_and_keep_a_copy(path, *rest):
        real_save(path, *rest)
        saved[rest[-1]], rng_at_save[rest[-1]] = path.read_bytes(), rng_now()  # by iteration

    monkeypatch.setattr(pa, "save_checkpoint", save_and_keep_a_copy)
    first = pa.train(tiny_args(tmp_path / "a", total_timesteps=256, save_interval=1))
    monkeypatch.undo()
    real_set_rng_states = pa.set_rng_states
    monkeypatch.setattr(
        pa, "set_rng_states", lambda states: (real_set_rng_states(states), rng_at_restore.append(rng_now()))
    )
    # As after `kill -9` between the saves of iterations 2 and 3: the run folder holds the checkpoint of
    # iteration 2 and the TensorBoard events of iterations 1-4. Resume it, and a copy of it elsewhere.
    results = []
    for folder in (Path(first["run_dir"]), tmp_path / "copy"):
        folder.mkdir(exist_ok=True)
        (folder / "checkpoint.pt").write_bytes(saved[2])
        summary = pa.train(tiny_args(tmp_path, total_timesteps=256, resume=str(folder / "checkpoint.pt")))
        results.append((summary, pa.load_checkpoint(summary["checkpoint"])))
    (summary_a, checkpoint_a), (summary_b, checkpoint_b) = results
    assert summary_a["global_step"] == 256 and summary_a["iterations"] == 4
    # The same checkpoint resumed twice gives the same run: weights, optimizer, RNG states.
    assert all(torch.equal(checkpoint_a["model"][k], checkpoint_b["model"][k]) for k in checkpoint_a["model"])
    assert summary_a["mean_return"] == summary_b["mean_return"]
    assert summary_a["eval_return_mean"] == summary_b["eval_return_mean"]
    # ... because the python, numpy and torch random states are those of the moment of the save.
    for torch_state, numpy_state, python_state in rng_at_restore:
        assert torch.equal(torch_state, rng_at_save[2][0]) and (numpy_state == rng_at_save[2][1]).all()
        assert python_state == rng_at_save[2][2]
    assert len(rng_at_restore) == 2 and not torch.equal(rng_at_save[2][0], rng_at_save[4][0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(first["run_dir"])
    events.Reload()
    # Iterations 3 and 4 were logged twice (before the crash and after the resume); one copy remains.
    assert [e.step for e in events.Scalars("losses/policy_loss")] == [64, 128, 192, 256]
    # The learning-rate schedule goes on where it stopped.
    assert [e.value for e in events.Scalars("charts/learning_rate")] == pytest.approx(
        [2.5e-4, 1.875e-4, 1.25e-4, 0.625e-4]
    )


def save_untrained_checkpoint(path: Path, args: pa.Args) -> str:
    """A checkpoint as a run with these args saves it, without the run (the tests that only read it)."""
    agent = pa.Agent(4)
    pa.save_checkpoint(path, agent, torch.optim.Adam(agent.parameters()), args, args.batch_size, 1)
    return str(path)


def test_resume_refuses_other_settings(tmp_path):
    checkpoint = save_untrained_checkpoint(tmp_path / "checkpoint.pt", tiny_args(tmp_path, total_timesteps=64))
    with pytest.raises(pa.ConfigError, match="--num-envs 8 differs from the checkpoint's 4"):
        pa.train(tiny_args(tmp_path, total_timesteps=64, num_envs=8, num_steps=8, resume=checkpoint))
    # The case: a budget and an env count that differ from the checkpoint's (4 envs), refused in one
    # line (it used to train nothing and report "completed").
    result = run_cli("--total-timesteps", "4096", "--num-envs", "8", "--resume", checkpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --total-timesteps 4096 differs from the checkpoint's 64: a resumed run keeps its settings"
    ]
    # A checkpoint saved before random states were saved can be evaluated, not resumed: one line, no traceback.
    old = torch.load(checkpoint, weights_only=True)
    del old["rng"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(pa.ConfigError, match="is from an older version of ppo_atari: it can be evaluated, not resumed"):
        pa.train(tiny_args(tmp_path, total_timesteps=64, resume=str(tmp_path / "old.pt")))


def test_a_run_in_which_no_game_finished_completes(tmp_path, capsys):
    # A Breakout game lasts hundreds of steps: none ends within 16 steps of 4 envs.
    summary = pa.train(tiny_args(tmp_path, total_timesteps=64))
    assert summary["status"] == "completed" and summary["episodes"] == 0 and summary["mean_return"] is None
    assert math.isfinite(summary["eval_return_mean"])
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text()) == summary
    assert "training return n/a (no episode finished)" in capsys.readouterr().out


def test_track_with_wandb_offline(tmp_path):
    summary = pa.train(tiny_args(tmp_path, track=True, total_timesteps=64))
    assert list(Path(summary["run_dir"]).glob("wandb/offline-run-*"))


# BAD INPUT


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_minibatches": 3}, "does not divide into 3 minibatches"),
        ({"total_timesteps": 10}, "smaller than one rollout"),
        ({"num_envs": 0}, "--num-envs must be at least 1"),
        ({"env_id": "ALE/NoSuchGame-v5"}, "unknown environment id"),
        ({"env_id": "Pendulum-v1"}, "not an Atari environment.*; for continuous actions use ppo_continuous.py"),
        ({"env_id": "CartPole-v1"}, r"not an Atari environment of ale-py \(e.g. BreakoutNoFrameskip-v4\)$"),
        ({"learning_rate": -1.0}, "--learning-rate must be positive"),
        ({"clip_coef": -0.1}, "--clip-coef must be positive"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be positive"),
        ({"ent_coef": -1.0}, "--ent-coef and --vf-coef must not be negative"),
        ({"vf_coef": -3.0}, "--ent-coef and --vf-coef must not be negative"),
        ({"target_kl": -1.0}, "--target-kl must be positive"),
        ({"seed": -1}, "--seed must lie in"),
        ({"eval_episodes": 0}, "--eval-episodes must be at least 1"),
        ({"torch_threads": -1}, "--torch-threads must be 0 or more"),
    ],
)
def test_bad_configuration_is_rejected(tmp_path, monkeypatch, overrides, message):
    if "env_id" not in overrides:  # rejected before any env is built
        monkeypatch.setattr(pa, "make_vector_env", lambda *a, **k: pytest.fail("an env was built"))
    with pytest.raises(pa.ConfigError, match=message):
        pa.train(tiny_args(tmp_path, **overrides))
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_one_env_on_the_readable_path_is_accepted(tmp_path):
    args = tiny_args(tmp_path, env_backend="gymnasium", num_envs=1, num_steps=64, total_timesteps=64)
    summary = pa.train(args)
    assert summary["status"] == "completed" and summary["global_step"] == 64


def test_checkpoint_of_another_env_or_script_is_rejected(tmp_path):
    summary = pa.train(tiny_args(tmp_path, total_timesteps=64))
    with pytest.raises(pa.ConfigError, match="trained on BreakoutNoFrameskip-v4, not on PongNoFrameskip-v4"):
        pa.train(tiny_args(tmp_path, env_id="PongNoFrameskip-v4", resume=summary["checkpoint"]))
    foreign = tmp_path / "continuous.pt"
    torch.save({"script": "ppo_continuous", "env_id": "HalfCheetah-v4"}, foreign)
    with pytest.raises(pa.ConfigError, match="checkpoint of ppo_continuous, not of ppo_atari"):
        pa.evaluate_checkpoint(str(foreign), tiny_args(tmp_path))


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--env-id", "Pendulum-v1"], {}, "not an Atari environment"),
        (["--env-id", "ALE/NoSuchGame-v5"], {}, "unknown environment id"),
        (["--num-minibatches", "3"], {}, "does not divide into 3 minibatches"),
        (["--num-envs", "3", "--num-steps", "64"], {"WORLD_SIZE": "2", "RANK": "0"},
         "--num-envs 3 does not divide over the 2 torchrun processes"),
        (["--eval-checkpoint", "/nonexistent.pt"], {}, "does not exist"),
        (["--eval-checkpoint", "/nonexistent.pt", "--eval-episodes", "0"], {}, "--eval-episodes must be at least 1"),
        (["--seed", "-1"], {}, "--seed must lie in [0, 2**32), got -1"),
        (["--max-grad-norm", "0"], {}, "--max-grad-norm must be positive"),
        (["--num-env", "3"], {}, "unrecognized argument --num-env (did you mean --num-envs?)"),
        (["--runs-dir", "/etc/hostname/runs"], {}, "cannot create the run folder"),
    ],
)  # fmt: skip
def test_cli_bad_input_prints_one_error_line(flags, env, message):
    result = run_cli(*flags, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0]  # the last thing said


def test_under_torchrun_only_rank_0_prints_a_bad_setting():
    flags = ["--num-envs", "3", "--num-steps", "64"]
    other_rank = run_cli(*flags, env={"WORLD_SIZE": "2", "RANK": "1"})
    assert other_rank.returncode == 2 and other_rank.stderr.strip() == ""
    rank_0 = run_cli(*flags, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert rank_0.returncode == 2 and rank_0.stderr.count("error: ") == 1


def test_missing_opencv_names_the_install_command():
    hide = "import sys; sys.modules['cv2'] = None; sys.argv = ['ppo_atari.py', '--env-backend', 'gymnasium']; "
    result = subprocess.run(
        [sys.executable, "-c", hide + "import ppo_atari; ppo_atari.main()"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("pip install opencv-python-headless")


def test_missing_opencv_is_found_on_the_eval_checkpoint_path_too(tmp_path):
    checkpoint = save_untrained_checkpoint(tmp_path / "checkpoint.pt", tiny_args(tmp_path, env_backend="gymnasium"))
    argv = ["ppo_atari.py", "--eval-checkpoint", checkpoint]  # the env path comes from the checkpoint
    hide = f"import sys; sys.modules['cv2'] = None; sys.argv = {argv!r}; "
    result = subprocess.run(
        [sys.executable, "-c", hide + "import ppo_atari; ppo_atari.main()"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("pip install opencv-python-headless")


def test_track_without_a_wandb_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")  # no `wandb login` either
    result = subprocess.run([sys.executable, SCRIPT, "--track"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --track needs a W&B API key")


def test_track_without_a_connection_logs_offline_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="0" * 40, WANDB_BASE_URL="https://wandb.invalid")  # a key, but no server
    flags = ["--total-timesteps", "64", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--track",
             "--eval-episodes", "1", "--runs-dir", str(tmp_path), "--no-cuda", *ONE_THREAD]  # fmt: skip
    start = time.time()
    result = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "W&B unreachable" in result.stdout and "logging offline" in result.stdout
    assert list(tmp_path.glob("*/wandb/offline-run-*"))
    assert time.time() - start < 60  # not wandb's 90-second wait for a server


def test_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--env-id", "--env-backend", "--total-timesteps", "--num-envs", "--clip-coef", "--bf16", "--resume",
                 "--eval-checkpoint"):  # fmt: skip
        assert flag in result.stdout
    assert "the surrogate clipping coefficient epsilon" in result.stdout


# HOW A RUN STOPS: SIGNALS DURING THE SAVE, STORAGE ERRORS, DIVERGENCE (issue 19)

LONG_RUN = ["--total-timesteps", "640000", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
            "--update-epochs", "1", "--eval-episodes", "1", "--no-cuda", *ONE_THREAD]  # fmt: skip


def slow_save_command(*flags, seconds=3.0):
    """The script's command line, in a wrapper where every torch.save waits `seconds` inside its open .tmp file:
    time to send a signal into the save. The script itself runs unchanged."""
    code = (
        "import sys, time, torch, ppo_atari as pa\n"
        "real_save = torch.save\n"
        f"torch.save = lambda obj, f: (real_save(obj, f), time.sleep({seconds}))\n"
        f"sys.argv = ['ppo_atari.py', *{list(flags)!r}]\n"
        "pa.main()\n"
    )
    return [sys.executable, "-c", code]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert stderr.strip().splitlines()[-1:] == lines[-1:], stderr
    return lines


def start(command) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_training(process: subprocess.Popen) -> None:
    for line in process.stdout:  # the progress line of the first iteration
        if line.startswith("step"):
            return
    raise AssertionError(f"the run ended before training: {process.stderr.read()}")


def test_sighup_and_a_second_signal_during_the_save_keep_checkpoint_and_summary(tmp_path):
    process = start(slow_save_command(*LONG_RUN, "--runs-dir", str(tmp_path)))
    wait_until_training(process)
    process.send_signal(signal.SIGHUP)  # the terminal closed
    deadline = time.time() + 60
    while not list(tmp_path.glob("*/checkpoint.tmp")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # the scheduler follows up: held until the save is done
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 129 and "Traceback" not in stderr, stderr
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGHUP"
    assert pa.load_checkpoint(summary["checkpoint"])["global_step"] == summary["global_step"] > 0
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize(
    ("ctrl_c", "exit_code", "stopped_by"),
    [(False, 141, "SIGPIPE"), (True, 130, "SIGINT")],  # `| head` or a `less` that quit; `| tee log` and Ctrl-C
)
def test_a_closed_stdout_stops_the_run_as_a_closed_terminal_does(tmp_path, ctrl_c, exit_code, stopped_by):
    process = start([sys.executable, SCRIPT, *LONG_RUN, "--runs-dir", str(tmp_path)])
    wait_until_training(process)
    process.stdout.close()  # the reader is gone: the next progress line (within 10 s) has nowhere to go
    if ctrl_c:
        process.send_signal(signal.SIGINT)  # the same Ctrl-C ended the `tee`: the closing line has nowhere to go
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == exit_code, stderr  # not 1 (a failed run), nor 120 (Python's failed flush at exit)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "error" not in stderr, stderr
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == stopped_by
    assert pa.load_checkpoint(summary["checkpoint"])["global_step"] == summary["global_step"] > 0


def test_help_into_a_pipe_that_is_already_closed_ends_quietly():
    process = start([sys.executable, SCRIPT, "--help"])
    process.stdout.close()  # `--help | head -1`, with head gone before the help is printed
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 141 and stderr == "", stderr


def test_a_full_disk_for_the_summary_is_one_line_and_keeps_the_checkpoint(tmp_path):
    checkpoint = save_untrained_checkpoint(tmp_path / "checkpoint.pt", tiny_args(tmp_path))
    (tmp_path / "summary.tmp").symlink_to("/dev/full")  # a real ENOSPC
    result = run_cli("--resume", checkpoint, "--no-cuda", *ONE_THREAD)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: cannot write {tmp_path / 'summary.tmp'}: No space left on device; "
        f"the checkpoint of iteration 2 is kept in {checkpoint}"
    ]
    assert pa.load_checkpoint(checkpoint)["iteration"] == 2 and not list(tmp_path.glob("*.tmp"))


def explode_after_update(monkeypatch, bad_iteration):
    """The update of bad_iteration leaves weights that are finite but so large that the logits overflow (the
    issue's case: a checkpoint whose evaluation failed in torch.multinomial)."""
    real_update, calls = pa.update_policy, []

    def update(agent, *rest):
        stats = real_update(agent, *rest)
        calls.append(1)
        if len(calls) == bad_iteration:
            with torch.no_grad():
                for p in agent.parameters():
                    p.mul_(1e10)
        return stats

    monkeypatch.setattr(pa, "update_policy", update)


@pytest.mark.parametrize("save_interval", [0, 1])
def test_exploded_weights_stop_the_run_and_are_never_saved(tmp_path, monkeypatch, save_interval):
    explode_after_update(monkeypatch, 2)
    kept = "nothing saved" if save_interval == 0 else "the checkpoint of iteration 1 is kept in "
    with pytest.raises(pa.TrainingDiverged, match=f"^the action probabilities became NaN or infinite; stopped after "
                       f"iteration 2, {kept}"):  # fmt: skip
        pa.train(tiny_args(tmp_path, total_timesteps=256, save_interval=save_interval))
    checkpoints = list((tmp_path / "runs").glob("*/checkpoint.pt"))
    assert len(checkpoints) == save_interval
    for path in checkpoints:  # the last good one, which evaluates
        assert pa.load_checkpoint(str(path))["iteration"] == 1
        result = run_cli("--eval-checkpoint", str(path), "--eval-episodes", "1", *ONE_THREAD)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--seed", "abc"], "error: --seed expects an integer, got 'abc'"),
        (["--num-envs"], "error: --num-envs needs a value"),
        (["--env-backend", "fast"], "error: --env-backend must be one of ale_vector, gymnasium, got 'fast'"),
    ],
)
def test_a_bad_or_missing_flag_value_is_one_line(flags, line):
    result = run_cli(*flags)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line]


def test_eval_checkpoint_refuses_another_env_id_and_missing_keys(tmp_path):
    checkpoint = save_untrained_checkpoint(tmp_path / "checkpoint.pt", tiny_args(tmp_path))
    result = run_cli("--eval-checkpoint", checkpoint, "--env-id", "PongNoFrameskip-v4")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: {checkpoint} was trained on BreakoutNoFrameskip-v4, not on Pong"
                                          "NoFrameskip-v4"]  # fmt: skip
    saved = torch.load(checkpoint, weights_only=True)
    del saved["model"]
    torch.save(saved, tmp_path / "no_model.pt")
    with pytest.raises(pa.ConfigError, match="no_model.pt is not a complete checkpoint of ppo_atari: it lacks model$"):
        pa.evaluate_checkpoint(str(tmp_path / "no_model.pt"), tiny_args(tmp_path))


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    summary = pa.train(tiny_args(tmp_path, total_timesteps=64))
    run_dir = Path(summary["run_dir"])
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    result = run_cli("--resume", summary["checkpoint"], "--no-cuda", *ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip().splitlines()[-1]
        == f"{summary['checkpoint']} is a finished run (iteration 1 of 1): nothing to do"
    )
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before
