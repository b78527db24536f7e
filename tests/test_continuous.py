"""Tests of ppo_continuous.py: the algorithm's pieces against hand-computed cases, the gymnasium 1.x
rollout (no phantom transitions, truncation bootstrap), checkpoints, determinism, resume, learning
and bad input."""

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import ppo_continuous as pc

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "ppo_continuous.py")


def tiny_args(tmp_path, **overrides) -> pc.Args:
    """A run of a few seconds: 4 iterations of 256 steps on InvertedPendulum."""
    base = pc.Args(
        env_id="InvertedPendulum-v4", total_timesteps=1024, num_steps=256, num_minibatches=4,
        update_epochs=2, runs_dir=str(tmp_path / "runs"), eval_episodes=2, cuda=False,
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


# ADVANTAGE ESTIMATION


def test_gae_termination_hand_computed():
    # One env, 3 steps, the episode terminates at t = 1; a new one starts at t = 2.
    gamma, lam = 0.9, 0.8
    rewards, values = t([[1.0], [2.0], [3.0]]), t([[0.5], [1.0], [2.0]])
    next_values = t([[1.0], [7.0], [4.0]])  # V(s1), V(final obs) (ignored: terminal), V(s_T)
    terminations, ends = t([[0], [1], [0]]), t([[0], [1], [0]])
    adv, ret = pc.compute_gae(rewards, values, next_values, terminations, ends, gamma, lam)
    d2 = 3.0 + 0.9 * 4.0 - 2.0  # bootstrapped from V(s_T)
    d1 = 2.0 - 1.0  # terminal: no bootstrap
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    expected = [d0 + gamma * lam * d1, d1, d2]  # the recursion stops at the episode end
    assert adv.squeeze(1).tolist() == pytest.approx(expected)
    assert ret.squeeze(1).tolist() == pytest.approx([a + v for a, v in zip(expected, [0.5, 1.0, 2.0], strict=True)])


def test_gae_truncation_bootstraps_from_final_observation():
    # The same hand-made trajectory, ended at t = 0 by termination or by truncation.
    gamma, lam = 0.99, 0.95
    rewards, values = t([[1.0], [1.0]]), t([[2.0], [3.0]])
    next_values = t([[5.0], [3.5]])  # 5.0 = V(final obs) of the ended episode
    ends = t([[1], [0]])
    adv_term, _ = pc.compute_gae(rewards, values, next_values, t([[1], [0]]), ends, gamma, lam)
    adv_trunc, _ = pc.compute_gae(rewards, values, next_values, t([[0], [0]]), ends, gamma, lam)
    assert adv_term[0, 0].item() == pytest.approx(1.0 - 2.0)
    assert adv_trunc[0, 0].item() == pytest.approx(1.0 + gamma * 5.0 - 2.0)
    # The step after the end belongs to the next episode and is the same in both cases.
    assert adv_term[1, 0].item() == pytest.approx(adv_trunc[1, 0].item())
    assert adv_trunc[1, 0].item() == pytest.approx(1.0 + gamma * 3.5 - 3.0)


def test_gae_lambda_zero_is_one_step_td_error():
    torch.manual_seed(0)
    rewards, values, next_values = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    terminations = (torch.rand(6, 3) < 0.3).float()
    ends = torch.maximum(terminations, (torch.rand(6, 3) < 0.2).float())
    adv, _ = pc.compute_gae(rewards, values, next_values, terminations, ends, 0.9, 0.0)
    td_error = rewards + 0.9 * (1 - terminations) * next_values - values
    torch.testing.assert_close(adv, td_error)


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    # No episode end inside the rollout: A_t = sum_k gamma^k r_{t+k} + gamma^(T-t) V(s_T) - V(s_t).
    torch.manual_seed(1)
    T, gamma = 5, 0.97
    rewards, values = torch.randn(T, 1), torch.randn(T, 1)
    last_value = torch.randn(1)
    next_values = torch.cat([values[1:], last_value[None]])
    zeros = torch.zeros(T, 1)
    adv, ret = pc.compute_gae(rewards, values, next_values, zeros, zeros, gamma, 1.0)
    for i in range(T):
        mc = sum(gamma**k * rewards[i + k, 0].item() for k in range(T - i)) + gamma ** (T - i) * last_value.item()
        assert adv[i, 0].item() == pytest.approx(mc - values[i, 0].item(), abs=1e-5)
        assert ret[i, 0].item() == pytest.approx(mc, abs=1e-5)


def test_gae_several_envs_with_different_episode_ends():
    """Each env column equals a plain per-episode computation, whatever the other columns do."""
    gamma, lam = 0.9, 0.7
    rng = np.random.default_rng(3)
    T, N = 7, 3
    rewards, values, next_values = (rng.normal(size=(T, N)) for _ in range(3))
    terminations = np.zeros((T, N))
    ends = np.zeros((T, N))
    terminations[2, 0] = ends[2, 0] = 1  # env 0: terminated at t = 2
    ends[4, 1] = 1  # env 1: truncated at t = 4
    terminations[0, 2] = ends[0, 2] = ends[5, 2] = 1  # env 2: terminated at 0, truncated at 5
    adv, _ = pc.compute_gae(*(t(x.tolist()) for x in (rewards, values, next_values, terminations, ends)), gamma, lam)
    for n in range(N):
        for i in range(T):
            # Forward sum of discounted TD errors up to and including the end of i's episode.
            expected, weight = 0.0, 1.0
            for k in range(i, T):
                delta = rewards[k, n] + gamma * (1 - terminations[k, n]) * next_values[k, n] - values[k, n]
                expected += weight * delta
                if ends[k, n]:
                    break
                weight *= gamma * lam
            assert adv[i, n].item() == pytest.approx(expected, abs=1e-5), (i, n)


# THE ROLLOUT ON GYMNASIUM 1.x

EXECUTED: list[tuple[int, int, int, float]] = []  # (env instance, episode, step, action) really run


class CountingEnv(gym.Env):
    """Episodes of exactly 5 steps that end by termination; records every action it executes."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-100.0, 100.0, (1,), np.float32)  # wide: no action gets clipped
    length = 5

    def __init__(self):
        self.episode, self.t = -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return np.array([self.t, self.episode], np.float32), {}

    def step(self, action):
        EXECUTED.append((id(self), self.episode, self.t, float(action[0])))
        self.t += 1
        obs = np.array([self.t, self.episode], np.float32)
        return obs, 1.0, self.t >= self.length, False, {}


class ClockEnv(gym.Env):
    """Never terminates; observation = the step counter. Truncated by a TimeLimit of 4 steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)], np.float32), 0.0, False, False, {}


gym.register("CountingEnv-v0", entry_point=CountingEnv)
gym.register("ClockEnv-v0", entry_point=ClockEnv, max_episode_steps=4)


class IdentityNormalizer:
    """Leaves observations as they are, so a test can read them back from the rollout."""

    def __call__(self, obs, update=True):
        return np.asarray(obs, np.float32)


def collect(env_id, num_envs, num_steps, agent=None, normalizer=None):
    envs = pc.EpisodeAndTimeMonitor(pc.make_vector_env(env_id, num_envs))  # as train() watches them
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = agent or pc.Agent(obs_dim, action_dim)
    normalizer = normalizer or pc.ObservationNormalizer((obs_dim,))
    raw_obs, _ = envs.reset(seed=0)
    scaler = pc.RewardScaler(num_envs, 0.99)
    rollout, _ = pc.collect_rollout(envs, agent, normalizer, scaler, normalizer(raw_obs), num_steps)
    episodes, _ = envs.pop()
    envs.close()
    return rollout, episodes, agent


def test_no_phantom_transition_reaches_the_rollout():
    EXECUTED.clear()
    torch.manual_seed(0)
    num_envs, num_steps = 3, 23  # several episode ends per env, at different phases
    rollout, episodes, _ = collect("CountingEnv-v0", num_envs, num_steps)
    executed = {action: (env, episode, step) for env, episode, step, action in EXECUTED}
    # One-to-one: every transition in the buffer is an action the env really executed, and every
    # executed action is in the buffer. (Under NEXT_STEP autoreset a reset step's action is
    # ignored by the env, so it would be missing from EXECUTED.)
    assert len(EXECUTED) == num_envs * num_steps == len(executed)
    buffered = rollout.actions.squeeze(-1)
    for n in range(num_envs):
        for i in range(num_steps):
            env, episode, step = executed[buffered[i, n].item()]
            # The buffer's done flags are those of that very transition.
            assert rollout.terminations[i, n].item() == float(step == CountingEnv.length - 1)
            assert rollout.episode_ends[i, n].item() == float(step == CountingEnv.length - 1)
    assert rollout.rewards.gt(0).all(), "a zero reward would be the mark of a phantom reset step"
    assert [length for _, length in episodes] == [CountingEnv.length] * len(episodes)
    assert len(episodes) == num_envs * (num_steps // CountingEnv.length)
    assert all(r == CountingEnv.length for r, _ in episodes)  # raw, unscaled episodic return


def test_truncation_bootstraps_from_the_true_final_observation():
    agent = pc.Agent(1, 1)
    agent.critic = nn.Linear(1, 1)  # V(obs) = obs: the value tells which observation was used
    nn.init.ones_(agent.critic.weight)
    nn.init.zeros_(agent.critic.bias)
    rollout, _, _ = collect("ClockEnv-v0", 2, 10, agent, IdentityNormalizer())
    truncated_steps = [3, 7]  # the TimeLimit of 4 cuts after steps 3 and 7
    for i in range(10):
        if i in truncated_steps:
            assert rollout.episode_ends[i].tolist() == [1.0, 1.0]
            assert rollout.terminations[i].tolist() == [0.0, 0.0]
            # V(final obs = 4), not V(reset obs = 0).
            assert rollout.next_values[i].tolist() == [4.0, 4.0]
        else:
            assert rollout.next_values[i].tolist() == [(i % 4) + 1.0] * 2
    advantages, _ = pc.compute_gae(
        rollout.rewards, rollout.values, rollout.next_values, rollout.terminations,
        rollout.episode_ends, 0.9, 0.0,
    )  # fmt: skip
    assert advantages[3, 0].item() == pytest.approx(0.9 * 4.0 - 3.0)


def test_observation_statistics_are_shared_across_envs():
    normalizer = pc.ObservationNormalizer((2,))
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(4, 2)) for _ in range(50)]  # 4 envs, 50 steps
    for batch in batches:
        normalizer(batch)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(normalizer.rms.mean, everything.mean(0), rtol=1e-4)
    np.testing.assert_allclose(normalizer.rms.var, everything.var(0), rtol=1e-3)
    assert normalizer.rms.mean.shape == (2,)  # one set of statistics, not one per env
    frozen = normalizer(np.full((1, 2), 1e6), update=False)
    assert frozen.max() == 10.0  # clipped to [-10, 10]
    np.testing.assert_allclose(normalizer.rms.mean, everything.mean(0), rtol=1e-4)  # not updated


@pytest.mark.parametrize("shape", [(3,), ()], ids=["observation", "return"])
def test_running_statistics_of_one_env_and_of_mixed_batches_are_numpys(shape):
    # One env feeds batches of one (RunningMeanStd's own branch); several envs feed larger batches.
    rng = np.random.default_rng(1)
    sizes = [1] * 300 + [4, 1, 7, 1, 1, 2] * 20
    batches = [rng.normal(-2.0, 3.0, size=(n, *shape)) for n in sizes]
    single, mixed = pc.RunningMeanStd(shape), pc.RunningMeanStd(shape)
    for batch in batches[:300]:
        single.update(batch)
    for batch in batches:
        mixed.update(batch)
    for rms, data in ((single, np.concatenate(batches[:300])), (mixed, np.concatenate(batches))):
        np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-5)
        np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-5)
        assert np.shape(rms.mean) == shape and np.shape(rms.var) == shape
        assert rms.count == pytest.approx(len(data) + 1e-4)


def test_reward_scaler_divides_by_return_std_without_centering():
    scaler = pc.RewardScaler(num_envs=2, gamma=0.9)
    for _ in range(200):
        scaled = scaler(np.array([1.0, 3.0]), np.array([False, False]))
    assert (scaled > 0).all()  # not mean-subtracted: the sign of every reward is kept
    assert scaled[1] / scaled[0] == pytest.approx(3.0)
    assert scaler.rms.mean.shape == ()  # one std for all envs
    scaler(np.array([1.0, 1.0]), np.array([True, False]))
    assert scaler.discounted_return[0] == 0.0 and scaler.discounted_return[1] > 0


# THE NETWORK AND THE LOSS


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    torch.manual_seed(0)
    agent = pc.Agent(5, 3)
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[-0.5, 0.0, 0.7]]))
    obs = torch.randn(8, 5)
    action = agent.get_action(obs)
    logprob, entropy, value = agent.get_logprob_entropy_value(obs, action)
    dist = torch.distributions.Normal(agent.actor_mean(obs), agent.actor_logstd.exp())
    torch.testing.assert_close(logprob, dist.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    assert value.shape == (8,) and action.shape == (8, 3)


def test_initialization_follows_the_ppo_details():
    agent = pc.Agent(11, 3)
    head = agent.actor_mean[-1]
    # Orthogonal with gain 0.01: rows orthonormal up to that scale.
    torch.testing.assert_close(head.weight @ head.weight.T, 1e-4 * torch.eye(3), atol=1e-7, rtol=0)
    assert agent.critic[-1].weight.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert all(layer.bias.abs().max() == 0 for layer in agent.modules() if isinstance(layer, nn.Linear))
    assert agent.actor_logstd.abs().max() == 0  # std starts at 1


def test_rollout_logprobs_and_values_are_those_of_the_acting_policy():
    """The rollout samples each action step by step and computes log pi_old and V after the last step, in one
    batched pass: the actions are the policy's own samples, and the batched numbers equal step-by-step ones."""
    agent = pc.Agent(4, 1)
    torch.manual_seed(3)
    rollout, _, _ = collect("InvertedPendulum-v4", 2, 64, agent=agent)
    torch.manual_seed(3)
    with torch.no_grad():
        for t in range(64):  # the rollout draws nothing else from torch's generator: the same samples again
            assert torch.equal(agent.get_action(rollout.obs[t]), rollout.actions[t])
            logprobs, _, values = agent.get_logprob_entropy_value(rollout.obs[t], rollout.actions[t])
            torch.testing.assert_close(logprobs, rollout.logprobs[t], atol=1e-5, rtol=0)
            torch.testing.assert_close(values, rollout.values[t], atol=1e-5, rtol=0)
    assert rollout.logprobs.shape == rollout.values.shape == (64, 2)
    assert not rollout.logprobs.requires_grad and not rollout.values.requires_grad


def test_ratio_is_one_on_the_first_minibatch():
    """The log-probs recomputed at the start of an update equal those stored during the rollout."""
    torch.manual_seed(0)
    rollout, _, agent = collect("InvertedPendulum-v4", 2, 64)
    args = pc.Args(num_envs=2, num_steps=64, num_minibatches=4)
    advantages, returns = pc.compute_gae(
        rollout.rewards, rollout.values, rollout.next_values, rollout.terminations,
        rollout.episode_ends, args.gamma, args.gae_lambda,
    )  # fmt: skip
    first = torch.randperm(args.batch_size)[: args.minibatch_size]
    b_obs, b_actions = rollout.obs.reshape(-1, 4)[first], rollout.actions.reshape(-1, 1)[first]
    new_logprobs, entropy, new_values = agent.get_logprob_entropy_value(b_obs, b_actions)
    old_logprobs = rollout.logprobs.reshape(-1)[first]
    torch.testing.assert_close(new_logprobs, old_logprobs, atol=1e-5, rtol=0)
    _, stats = pc.ppo_loss(
        new_logprobs, old_logprobs, entropy, new_values, rollout.values.reshape(-1)[first],
        advantages.reshape(-1)[first], returns.reshape(-1)[first], args,
    )  # fmt: skip
    assert stats["clipfrac"].item() == 0.0
    assert abs(stats["approx_kl"].item()) < 1e-6 and abs(stats["old_approx_kl"].item()) < 1e-5


@pytest.mark.parametrize(
    ("ratio", "advantage", "gradient_expected"),
    [
        (1.5, 1.0, False),  # above 1 + eps with A > 0: the clip forbids pushing further up
        (0.5, -1.0, False),  # below 1 - eps with A < 0: the clip forbids pushing further down
        (0.5, 1.0, True),  # below 1 - eps with A > 0: moving back up is allowed
        (1.5, -1.0, True),  # above 1 + eps with A < 0: moving back down is allowed
        (1.1, 1.0, True),  # inside the clip range
    ],
)
def test_clipped_surrogate_gradient(ratio, advantage, gradient_expected):
    args = pc.Args(norm_adv=False, clip_coef=0.2, ent_coef=0.0, vf_coef=0.0)
    old_logprobs = torch.zeros(1)
    new_logprobs = torch.tensor([math.log(ratio)], requires_grad=True)
    zeros = torch.zeros(1)
    loss, stats = pc.ppo_loss(new_logprobs, old_logprobs, zeros, zeros, zeros, torch.tensor([advantage]), zeros, args)
    loss.backward()
    assert (new_logprobs.grad.abs().item() > 0) == gradient_expected
    assert stats["clipfrac"].item() == float(abs(ratio - 1) > 0.2)


def test_clipped_value_loss_blocks_gradient_beyond_the_clip():
    args = pc.Args(clip_coef=0.2, vf_coef=1.0, norm_adv=False)
    zeros = torch.zeros(1)
    old_values, returns = torch.tensor([0.0]), torch.tensor([1.0])
    # Moved 1.5 away from the old value 0, past the clip range and past the return 1: the clipped
    # prediction (0.2) is further from the return than the new one, so the clipped term is the max,
    # it is constant in the new value, and no gradient flows.
    far = torch.tensor([1.5], requires_grad=True)
    loss, _ = pc.ppo_loss(zeros, zeros, zeros, far, old_values, zeros, returns, args)
    loss.backward()
    assert far.grad.item() == 0.0
    near = torch.tensor([0.1], requires_grad=True)
    loss, _ = pc.ppo_loss(zeros, zeros, zeros, near, old_values, zeros, returns, args)
    loss.backward()
    assert near.grad.item() == pytest.approx(-0.9)  # d/dv 0.5 (v - R)^2
    unclipped = torch.tensor([-0.5], requires_grad=True)
    loss, _ = pc.ppo_loss(zeros, zeros, zeros, unclipped, old_values, zeros, returns, replace(args, clip_vloss=False))
    loss.backward()
    assert unclipped.grad.item() == pytest.approx(-1.5)


# THE PAPER'S THREE OBJECTIVES, THE TRUST REGION STATISTICS, THE CODE-LEVEL SWITCHES


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(7, 3), torch.randn(7, 3)
    log_std_p, log_std_q = torch.randn(1, 3), torch.randn(1, 3)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p, log_std_p.exp()), torch.distributions.Normal(mean_q, log_std_q.exp())
    ).sum(-1)
    torch.testing.assert_close(pc.gaussian_kl(mean_p, log_std_p, mean_q, log_std_q), expected)
    assert torch.equal(pc.gaussian_kl(mean_p, log_std_p, mean_p, log_std_p), torch.zeros(7))


def surrogate_loss_and_gradient(objective, kl_coef, seed=0):
    """The policy loss and its gradient w.r.t. the new log-probs and the KL, on random data."""
    torch.manual_seed(seed)
    new_logprobs = (0.3 * torch.randn(16)).requires_grad_(True)
    kl = torch.rand(16).requires_grad_(True)
    zeros, advantages = torch.zeros(16), torch.randn(16)
    args = pc.Args(policy_objective=objective, vf_coef=0.0, norm_adv=True)
    loss, stats = pc.ppo_loss(new_logprobs, zeros, zeros, zeros, zeros, advantages, zeros, args, kl, kl_coef)
    loss.backward()
    return loss.detach(), new_logprobs.grad, kl.grad, stats


def test_kl_penalty_at_beta_zero_is_the_plain_surrogate():
    loss_kl, grad_kl, kl_grad, _ = surrogate_loss_and_gradient("kl-penalty", 0.0)
    loss_cpi, grad_cpi, kl_grad_cpi, _ = surrogate_loss_and_gradient("none", 0.0)
    assert torch.equal(loss_kl, loss_cpi) and torch.equal(grad_kl, grad_cpi)
    assert torch.equal(kl_grad, torch.zeros(16)) and kl_grad_cpi is None  # L^CPI does not look at the KL
    # With beta > 0 the penalty adds beta * mean(KL): its gradient w.r.t. each KL term is beta / B.
    loss_beta, grad_beta, kl_grad_beta, _ = surrogate_loss_and_gradient("kl-penalty", 2.0)
    assert torch.equal(grad_beta, grad_cpi)
    torch.testing.assert_close(kl_grad_beta, torch.full((16,), 2.0 / 16))
    assert loss_beta > loss_cpi


def test_plain_surrogate_is_not_clipped_where_the_clip_stops_the_gradient():
    """r = 1.5 with A > 0: L^CLIP gives no gradient (past 1 + eps), L^CPI and L^KLPEN still push r up."""
    zeros = torch.zeros(1)
    for objective, gradient_expected in (("clip", False), ("none", True), ("kl-penalty", True)):
        new_logprobs = torch.tensor([math.log(1.5)], requires_grad=True)
        args = pc.Args(policy_objective=objective, norm_adv=False, vf_coef=0.0)
        loss, stats = pc.ppo_loss(new_logprobs, zeros, zeros, zeros, zeros, torch.ones(1), zeros, args, zeros, 1.0)
        loss.backward()
        assert (new_logprobs.grad.abs().item() > 0) == gradient_expected, objective
        assert stats["clipfrac"].item() == 1.0  # measured against [1 - eps, 1 + eps] whatever the objective
        assert stats["ratio_max"].item() == pytest.approx(1.5) and stats["ratio_min"].item() == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("kl", "beta_after"),
    [
        (0.005, 0.5),  # d < d_targ / 1.5 = 0.00667: beta / 2
        (0.0067, 1.0),  # just above d_targ / 1.5: unchanged
        (0.01, 1.0),  # on target
        (0.0149, 1.0),  # just below 1.5 d_targ: unchanged
        (0.02, 2.0),  # d > 1.5 d_targ = 0.015: beta * 2
    ],
)
def test_adaptive_kl_rule_of_section_4(kl, beta_after):
    controller = pc.AdaptiveKLController(kl_coef=1.0, target=0.01)
    controller.update(kl)
    assert controller.value == beta_after


def test_adaptive_kl_controller_halves_and_doubles_repeatedly():
    controller = pc.AdaptiveKLController(kl_coef=1.0, target=0.01)
    for kl in (0.001, 0.001, 0.001):
        controller.update(kl)
    assert controller.value == 0.125
    for kl in (0.1, 0.1):
        controller.update(kl)
    assert controller.value == 0.5


def update_once(objective="clip", **overrides):
    """One update_policy on a Pendulum rollout; returns (stats, agent before, agent after, rollout)."""
    torch.manual_seed(0)
    rollout, _, agent = collect("Pendulum-v1", 2, 128)
    args = pc.Args(num_envs=2, num_steps=128, policy_objective=objective, **overrides)
    advantages, returns = pc.compute_gae(
        rollout.rewards, rollout.values, rollout.next_values, rollout.terminations,
        rollout.episode_ends, args.gamma, args.gae_lambda,
    )  # fmt: skip
    before = pc.Agent(3, 1)
    before.load_state_dict(agent.state_dict())
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    stats = pc.update_policy(agent, optimizer, rollout, advantages, returns, args)
    return stats, before, agent, rollout


def test_update_statistics_measure_the_trust_region():
    # One epoch of one minibatch: the only ratios seen are those before any step, all exactly 1.
    stats, before, after, rollout = update_once(update_epochs=1, num_minibatches=1)
    assert stats["ratio_max"] == pytest.approx(1.0, abs=1e-5) and stats["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert stats["clipfrac"] == 0.0
    obs = rollout.obs.reshape(-1, 3)
    with torch.no_grad():
        expected = pc.gaussian_kl(
            before.actor_mean(obs), before.actor_logstd, after.actor_mean(obs), after.actor_logstd
        )
    assert stats["exact_kl"] == pytest.approx(expected.mean().item()) and stats["exact_kl"] > 0
    # Ten epochs: the ratios spread around 1; the extremes bound every ratio, the fraction outside is a fraction.
    stats, *_ = update_once(update_epochs=10, num_minibatches=4)
    assert stats["ratio_min"] < 1.0 < stats["ratio_max"]
    assert 0.0 <= stats["clipfrac"] <= 1.0 and stats["exact_kl"] > 0 and stats["beta"] == 1.0


def test_without_clipping_many_epochs_move_the_policy_further():
    """The same rollout, 30 epochs: L^CPI lets the ratio run away, L^CLIP holds it near [0.8, 1.2]."""
    clipped, *_ = update_once("clip", update_epochs=30, num_minibatches=4, anneal_lr=False)
    plain, *_ = update_once("none", update_epochs=30, num_minibatches=4, anneal_lr=False)
    assert plain["exact_kl"] > 2 * clipped["exact_kl"]
    assert plain["ratio_max"] > clipped["ratio_max"]


def test_kl_penalty_keeps_the_policy_closer_the_larger_beta():
    small, *_ = update_once("kl-penalty", update_epochs=30, num_minibatches=4, kl_coef=0.01)
    large, *_ = update_once("kl-penalty", update_epochs=30, num_minibatches=4, kl_coef=100.0)
    assert large["exact_kl"] < small["exact_kl"]
    assert large["beta"] == 100.0 and small["beta"] == 0.01


def test_adaptive_kl_run_logs_beta_and_resumes_it(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def betas_logged(run_dir):
        events = EventAccumulator(run_dir)
        events.Reload()
        return [e.value for e in events.Scalars("charts/beta")], events

    args = tiny_args(tmp_path, policy_objective="kl-penalty", adaptive_kl=True, kl_target=1e-6)
    summary = pc.train(args)
    betas, events = betas_logged(summary["run_dir"])
    # beta as it was in each update: 1, then doubled after every update (the KL is far above 1.5e-6)
    assert betas == [1.0, 2.0, 4.0, 8.0]
    kls = [e.value for e in events.Scalars("losses/exact_kl")]
    assert len(kls) == 4 and all(kl > 1.5e-6 for kl in kls)
    assert {"losses/ratio_max", "losses/ratio_min"} <= set(events.Tags()["scalars"])
    assert pc.load_checkpoint(summary["checkpoint"])["kl_coef"] == 16.0  # the beta the next update would use

    # Stopped after 2 updates, then resumed: the resumed updates use the saved beta, not --kl-coef's start.
    real_update, calls = pc.update_policy, []

    def update_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_update(*a, **k)

    monkeypatch.setattr(pc, "update_policy", update_then_stop)
    interrupted = pc.train(replace(args, runs_dir=str(tmp_path / "second")))
    assert interrupted["status"] == "interrupted" and interrupted["iterations"] == 2
    assert pc.load_checkpoint(interrupted["checkpoint"])["kl_coef"] == 4.0
    monkeypatch.setattr(pc, "update_policy", real_update)
    resumed = pc.train(replace(args, runs_dir=str(tmp_path / "second"), resume=interrupted["checkpoint"]))
    assert resumed["iterations"] == 4 and betas_logged(resumed["run_dir"])[0] == [1.0, 2.0, 4.0, 8.0]
    assert pc.load_checkpoint(resumed["checkpoint"])["kl_coef"] == 16.0


def test_clip_runs_log_no_beta(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=256, num_steps=256))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(summary["run_dir"])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"losses/ratio_max", "losses/ratio_min", "losses/exact_kl", "losses/clipfrac"} <= tags
    assert "charts/beta" not in tags


def test_the_default_objective_computes_what_the_version_before_the_objectives_did(tmp_path):
    """Same seed, bitwise the same weights, optimizer state and statistics as ppo_continuous.py at f5cce97,
    the last commit before the objectives and the code-level switches were added."""
    old_source = subprocess.run(
        ["git", "-C", str(REPO), "show", "f5cce97:ppo_continuous.py"], capture_output=True, text=True
    )
    if old_source.returncode != 0:
        pytest.skip("this checkout has no git history to compare with")
    old_path = tmp_path / "ppo_continuous_f5cce97.py"
    old_path.write_text(old_source.stdout)
    import importlib.util

    spec = importlib.util.spec_from_file_location("ppo_continuous_f5cce97", old_path)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look the module up while Args is defined
    try:
        spec.loader.exec_module(old)
    finally:
        del sys.modules[spec.name]
    checkpoints = []
    for module in (old, pc):
        settings = {f.name: getattr(tiny_args(tmp_path / module.__name__), f.name) for f in fields(old.Args)}
        summary = module.train(module.Args(**settings))
        checkpoints.append(torch.load(summary["checkpoint"], weights_only=True))
    before, after = checkpoints
    assert before["model"].keys() == after["model"].keys()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    optimizer_before, optimizer_after = before["optimizer"]["state"], after["optimizer"]["state"]
    for state_before, state_after in zip(optimizer_before.values(), optimizer_after.values(), strict=True):
        assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    for key in ("obs_rms", "return_rms"):
        assert all(
            torch.equal(torch.as_tensor(before[key][k]), torch.as_tensor(after[key][k])) for k in ("mean", "var")
        )
    assert torch.equal(before["rng"]["torch"], after["rng"]["torch"])


def test_compile_gives_the_same_run_up_to_float_rounding_and_times_its_compile(tmp_path, capsys):
    """--compile (torch.compile of minibatch_loss): the same seed gives the same weights up to float rounding, the
    progress line reports the compile, and the compiled function is the one each minibatch calls."""
    args = tiny_args(tmp_path, total_timesteps=512, update_epochs=1)
    eager = torch.load(pc.train(args)["checkpoint"], weights_only=True)["model"]
    capsys.readouterr()
    calls, real_update = [], pc.update_policy

    def spy(*rest):
        calls.append(rest[-1])  # loss_fn
        return real_update(*rest)

    pc.update_policy = spy
    try:
        summary = pc.train(replace(args, compile=True, runs_dir=str(tmp_path / "compiled")))
    finally:
        pc.update_policy = real_update
    compiled = torch.load(summary["checkpoint"], weights_only=True)["model"]
    assert len(calls) == 2 and all(fn is not pc.minibatch_loss and fn is calls[0] for fn in calls)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    first_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step"))
    assert re.search(r" compile \d+s$", first_line), first_line


def test_a_compile_that_fails_is_one_line_and_no_traceback(tmp_path, monkeypatch):
    def compile_without_a_compiler(function):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(traceback of the backend)")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_without_a_compiler)
    with pytest.raises(pc.ConfigError, match=r"^--compile failed \(RuntimeError: InvalidCxxCompiler: No working C\+\+ "
                       r"compiler found\); run without it$"):  # fmt: skip
        pc.train(tiny_args(tmp_path, compile=True))


def test_code_level_switches_turn_each_detail_off():
    # --no-norm-obs: the policy sees the raw observation; --no-norm-reward: it learns from the raw reward.
    raw = np.array([[100.0, -50.0, 3.0]])
    normalizer = pc.ObservationNormalizer((3,), enabled=False)
    assert np.array_equal(normalizer(raw), raw.astype(np.float32)) and normalizer.rms.count == 1e-4
    scaler = pc.RewardScaler(1, 0.99, enabled=False)
    assert np.array_equal(scaler(np.array([250.0]), np.array([False])), np.array([250.0], np.float32))
    # --no-ortho-init: PyTorch's default init (uniform weights and biases), not orthogonal rows with zero bias.
    torch.manual_seed(0)
    default = pc.Agent(11, 3, ortho_init=False)
    first = default.critic[0]
    assert first.bias.abs().sum() > 0
    gram = first.weight @ first.weight.T
    assert not torch.allclose(gram, gram[0, 0] * torch.eye(64), atol=1e-3)
    assert first.weight.abs().max() <= 1 / math.sqrt(11)  # Kaiming-uniform bound 1 / sqrt(fan_in)


def test_run_without_observation_normalization_is_evaluated_without_it(tmp_path):
    summary = pc.train(tiny_args(tmp_path, norm_obs=False, norm_reward=False, ortho_init=False))
    checkpoint = pc.load_checkpoint(summary["checkpoint"])
    assert checkpoint["obs_rms"]["count"] == 1e-4  # nothing was learned
    agent, normalizer = pc.load_agent(checkpoint, torch.device("cpu"))
    assert not normalizer.enabled
    again = pc.evaluate_checkpoint(summary["checkpoint"], tiny_args(tmp_path))
    assert again["eval_return_mean"] == summary["eval_return_mean"]


# END TO END: LOGS, CHECKPOINTS, EVALUATION, DETERMINISM, RESUME


def test_train_writes_logs_checkpoint_and_summary(tmp_path):
    summary = pc.train(tiny_args(tmp_path))
    run_dir = Path(summary["run_dir"])
    assert summary["status"] == "completed"
    assert summary["global_step"] == 1024 and summary["iterations"] == 4
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["sps"] > 0 and summary["time_env_s"] > 0 and summary["time_update_s"] > 0
    checkpoint = pc.load_checkpoint(summary["checkpoint"], "InvertedPendulum-v4")
    assert checkpoint["global_step"] == 1024 and checkpoint["iteration"] == 4
    assert set(checkpoint) >= {"model", "optimizer", "obs_rms", "return_rms", "args"}
    assert checkpoint["obs_rms"]["count"] > 1000  # statistics of the whole run, saved with the model

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
        "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance", "time/env_s",
        "time/inference_s", "time/update_s", "eval/episodic_return_mean",
    }  # fmt: skip
    assert expected <= tags
    learning_rates = [e.value for e in events.Scalars("charts/learning_rate")]
    assert learning_rates == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 0.75e-4])  # linear annealing


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=2048, eval_episodes=3))
    result = run_cli("--eval-checkpoint", summary["checkpoint"], "--eval-episodes", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    reported = float(result.stdout.split("return ")[1].split(" +- ")[0])
    assert reported == pytest.approx(summary["eval_return_mean"], abs=0.051)

    # Same normalized observations and the same actions in a fresh process.
    probe = (
        "import json, numpy as np, torch, ppo_continuous as pc\n"
        f"c = pc.load_checkpoint({summary['checkpoint']!r})\n"
        "agent, norm = pc.load_agent(c, torch.device('cpu'))\n"
        "obs = norm(np.array([[0.1, -0.2, 0.3, -0.4]]), update=False)\n"
        "print(json.dumps([obs.tolist(), agent.actor_mean(torch.as_tensor(obs)).tolist()]))\n"
    )
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    fresh_obs, fresh_action = json.loads(fresh.stdout)
    checkpoint = pc.load_checkpoint(summary["checkpoint"])
    agent, normalizer = pc.load_agent(checkpoint, torch.device("cpu"))
    obs = normalizer(np.array([[0.1, -0.2, 0.3, -0.4]]), update=False)
    assert fresh_obs == obs.tolist()
    assert fresh_action == agent.actor_mean(torch.as_tensor(obs)).tolist()
    assert normalizer.rms.mean.any()  # really the learned statistics, not the initial zeros


def test_same_seed_gives_the_same_run(tmp_path):
    first = pc.train(tiny_args(tmp_path / "a"))
    second = pc.train(tiny_args(tmp_path / "b"))
    assert first["mean_return"] == second["mean_return"]
    assert first["eval_return_mean"] == second["eval_return_mean"]
    model_a = pc.load_checkpoint(first["checkpoint"])["model"]
    model_b = pc.load_checkpoint(second["checkpoint"])["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    other_seed = pc.load_checkpoint(pc.train(tiny_args(tmp_path / "c", seed=2))["checkpoint"])["model"]
    assert not all(torch.equal(model_a[k], other_seed[k]) for k in model_a)


def test_sigterm_in_the_final_evaluation_keeps_checkpoint_and_logs(tmp_path, monkeypatch):
    def evaluate_until_sigterm(*args, **kwargs):  # a scheduler stops the job during evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(pc, "evaluate", evaluate_until_sigterm)
    summary = pc.train(tiny_args(tmp_path))
    assert summary["status"] == "interrupted" and "eval_return_mean" not in summary
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert pc.load_checkpoint(summary["checkpoint"])["global_step"] == 1024

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert len(events.Scalars("losses/policy_loss")) == summary["iterations"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


def test_interrupted_run_saves_and_resumes_to_the_end(tmp_path):
    flags = [
        "--env-id", "InvertedPendulum-v4", "--total-timesteps", "16384", "--num-steps", "256",
        "--num-minibatches", "4", "--save-interval", "1", "--runs-dir", str(tmp_path), "--no-cuda",
    ]  # fmt: skip
    process = subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 180  # a busy 2-core machine can take a minute to import and run one iteration
    while not list(tmp_path.glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("*/checkpoint.pt")), "no checkpoint after 180 s: the signal would come before training"
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 143, stdout  # 128 + SIGTERM's number, as is conventional (Ctrl-C: 130)
    assert "interrupted (SIGTERM)" in stdout
    (checkpoint_path,) = tmp_path.glob("*/checkpoint.pt")
    interrupted_at = pc.load_checkpoint(str(checkpoint_path))["global_step"]
    assert 0 < interrupted_at < 16384
    assert json.loads((checkpoint_path.parent / "summary.json").read_text())["status"] == "interrupted"

    # Only --resume: every setting (env, steps, minibatches, total) comes from the checkpoint.
    result = run_cli("--resume", str(checkpoint_path), "--eval-episodes", "1", "--no-cuda", timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"resuming {checkpoint_path} at step {interrupted_at:,}" in result.stdout
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 16384
    assert summary["run_dir"] == str(checkpoint_path.parent)  # the same run goes on
    final = pc.load_checkpoint(str(checkpoint_path), "InvertedPendulum-v4")
    assert final["global_step"] == 16384 and final["iteration"] == 64
    agent, _ = pc.load_agent(final, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in agent.parameters())


def test_the_first_run_shows_no_library_warning_the_user_can_do_nothing_about(tmp_path):
    # The default env (HalfCheetah-v4) is made three times (check, training, evaluation); each used to print
    # gymnasium's "out of date" notice for v4 and MuJoCo's `settotalmass` deprecation before the progress line.
    result = run_cli("--total-timesteps", "2048", "--eval-episodes", "1", "--runs-dir", str(tmp_path), "--no-cuda")
    assert result.returncode == 0, result.stderr
    assert "done: 2,048 steps" in result.stdout
    assert "out of date" not in result.stderr and "settotalmass" not in result.stderr, result.stderr
    assert "Warning" not in result.stderr and "WARN" not in result.stderr, result.stderr


def test_other_mujoco_warnings_are_still_printed(capsys):
    pc.mujoco_warning("Nan, Inf or huge value in QACC at DOF 0. The simulation is unstable.")
    pc.mujoco_warning("compiler attribute 'settotalmass' is deprecated and will be removed in a future release")
    assert (
        capsys.readouterr().err == "WARNING: Nan, Inf or huge value in QACC at DOF 0. The simulation is unstable.\n\n"
    )


def diverge_at_iteration(monkeypatch, bad_iteration):
    """From bad_iteration on, the update starts from NaN weights, so its loss is NaN."""
    real_update, calls = pc.update_policy, []

    def update(agent, *rest):
        calls.append(1)
        if len(calls) >= bad_iteration:
            with torch.no_grad():
                agent.critic[0].weight.fill_(float("nan"))
        return real_update(agent, *rest)

    monkeypatch.setattr(pc, "update_policy", update)


def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    diverge_at_iteration(monkeypatch, 3)
    saved = []
    real_save = pc.save_checkpoint
    monkeypatch.setattr(pc, "save_checkpoint", lambda path, *a: (real_save(path, *a), saved.append(path.read_bytes())))
    with pytest.raises(pc.TrainingDiverged, match="the checkpoint of iteration 2 is kept"):
        pc.train(tiny_args(tmp_path, save_interval=1))
    (checkpoint_path,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    assert checkpoint_path.read_bytes() == saved[-1] and len(saved) == 2  # nothing saved after the NaN
    checkpoint = pc.load_checkpoint(str(checkpoint_path))
    assert checkpoint["iteration"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["iterations"] == 2


def test_diverged_loss_without_a_checkpoint_says_so(tmp_path, monkeypatch):
    diverge_at_iteration(monkeypatch, 1)
    with pytest.raises(pc.TrainingDiverged, match="nothing saved"):
        pc.train(tiny_args(tmp_path))
    assert not list((tmp_path / "runs").glob("*/checkpoint.pt"))


def test_resume_restores_everything_and_drops_the_logs_past_the_checkpoint(tmp_path, monkeypatch):
    real_save, saved, rng_at_save, rng_at_restore = pc.save_checkpoint, {}, {}, []

    def rng_now():
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    def save_and_keep_a_copy(path, *rest):
        real_save(path, *rest)
        saved[rest[-1]], rng_at_save[rest[-1]] = path.read_bytes(), rng_now()  # by iteration

    monkeypatch.setattr(pc, "save_checkpoint", save_and_keep_a_copy)
    first = pc.train(tiny_args(tmp_path / "a", save_interval=1))
    monkeypatch.undo()
    real_set_rng_states = pc.set_rng_states
    monkeypatch.setattr(
        pc, "set_rng_states", lambda states: (real_set_rng_states(states), rng_at_restore.append(rng_now()))
    )
    # As after `kill -9` between the saves of iterations 2 and 3: the run folder holds the checkpoint of
    # iteration 2 and the TensorBoard events of iterations 1-4. Resume it, and a copy of it elsewhere.
    results = []
    for folder in (Path(first["run_dir"]), tmp_path / "copy"):
        folder.mkdir(exist_ok=True)
        (folder / "checkpoint.pt").write_bytes(saved[2])
        summary = pc.train(tiny_args(tmp_path, resume=str(folder / "checkpoint.pt")))
        results.append((summary, pc.load_checkpoint(summary["checkpoint"])))
    (summary_a, checkpoint_a), (summary_b, checkpoint_b) = results
    assert summary_a["global_step"] == 1024 and summary_a["iterations"] == 4
    # The same checkpoint resumed twice gives the same run: weights, optimizer, statistics, RNG states.
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
    assert [e.step for e in events.Scalars("losses/policy_loss")] == [256, 512, 768, 1024]
    # The learning-rate schedule goes on where it stopped.
    assert [e.value for e in events.Scalars("charts/learning_rate")] == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 0.75e-4])


def test_resume_starts_each_envs_discounted_return_at_zero_and_keeps_the_running_std(tmp_path, monkeypatch):
    # The envs start new episodes on resume, so the reward scaler's running discounted return of each env
    # starts at 0, as at any episode start; the running std of that return is part of the model and goes on.
    real_save, real_collect, saved, seen = pc.save_checkpoint, pc.collect_rollout, {}, []

    def save_and_keep_a_copy(path, agent, optimizer, obs_normalizer, reward_scaler, *rest):
        real_save(path, agent, optimizer, obs_normalizer, reward_scaler, *rest)
        saved[rest[-1]] = (path.read_bytes(), reward_scaler.discounted_return.copy(), reward_scaler.rms.var)

    def collect_and_look(envs, agent, obs_normalizer, reward_scaler, *rest):
        seen.append((reward_scaler.discounted_return.copy(), reward_scaler.rms.var, reward_scaler.rms.count))
        return real_collect(envs, agent, obs_normalizer, reward_scaler, *rest)

    monkeypatch.setattr(pc, "save_checkpoint", save_and_keep_a_copy)
    pc.train(tiny_args(tmp_path / "a", save_interval=1))
    checkpoint_bytes, return_at_save, var_at_save = saved[3]
    assert return_at_save[0] != 0.0  # mid-episode at the save: there is something to reset
    folder = tmp_path / "resumed"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(checkpoint_bytes)
    monkeypatch.setattr(pc, "collect_rollout", collect_and_look)
    pc.train(tiny_args(tmp_path, resume=str(folder / "checkpoint.pt")))
    discounted_return, var, count = seen[0]  # as the first rollout after the resume begins
    assert discounted_return.tolist() == [0.0]
    assert var == var_at_save and count == 3 * 256 + 1e-4  # the running std and its count, restored
    assert "discounted_return" not in pc.load_checkpoint(str(folder / "checkpoint.pt"))


def test_resume_refuses_other_settings(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=512))
    with pytest.raises(pc.ConfigError, match="--total-timesteps 1024 differs from the checkpoint's 512"):
        pc.train(tiny_args(tmp_path, resume=summary["checkpoint"]))
    result = run_cli("--resume", summary["checkpoint"], "--num-steps", "128")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --num-steps 128 differs from the checkpoint's 256: a resumed run keeps its settings"
    )
    # A checkpoint saved before random states were saved can be evaluated, not resumed: one line, no traceback.
    old = torch.load(summary["checkpoint"], weights_only=True)
    del old["rng"]
    torch.save(old, tmp_path / "old.pt")
    result = run_cli("--resume", str(tmp_path / "old.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("is from an older version of ppo_continuous: it can be evaluated, not resumed")
    )


def test_a_run_in_which_no_episode_finished_completes(tmp_path, capsys):
    # Pendulum's episodes last 200 steps: none ends within 128.
    summary = pc.train(tiny_args(tmp_path, env_id="Pendulum-v1", total_timesteps=128, num_steps=128, eval_episodes=1))
    assert summary["status"] == "completed" and summary["episodes"] == 0 and summary["mean_return"] is None
    assert math.isfinite(summary["eval_return_mean"])
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text()) == summary
    assert "training return n/a (no episode finished)" in capsys.readouterr().out


def test_learns_inverted_pendulum(tmp_path):
    """Real learning in ~20 s: a random policy balances ~5-10 steps. Thresholds from measured runs:
    at 40,960 steps seeds 1-6 reach a training mean of 285-312 (last 100 episodes) and a
    deterministic evaluation return of 1000 (the maximum); the thresholds leave a wide margin."""
    args = pc.Args(
        env_id="InvertedPendulum-v4",
        total_timesteps=40960,
        runs_dir=str(tmp_path),
        cuda=False,
        eval_episodes=5,
    )
    summary = pc.train(args)
    assert summary["mean_return"] > 100
    assert summary["eval_return_mean"] > 500


def test_other_box_envs_work(tmp_path):
    summary = pc.train(tiny_args(tmp_path, env_id="Pendulum-v1", total_timesteps=512, num_steps=128))
    assert summary["status"] == "completed" and summary["episodes"] == 2  # 200-step episodes, truncated


def test_video_of_the_evaluation(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=256, num_steps=256, eval_episodes=1, capture_video=True))
    videos = list((Path(summary["run_dir"]) / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


def test_track_with_wandb_offline(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=256, num_steps=256, track=True))
    assert list((Path(summary["run_dir"]) / "wandb").glob("offline-run-*"))


# BAD INPUT


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_minibatches": 3}, "does not divide into 3 minibatches"),
        ({"total_timesteps": 100}, "smaller than one rollout"),
        ({"num_envs": 0}, "--num-envs must be at least 1"),
        ({"learning_rate": -1.0}, "--learning-rate must be positive"),
        ({"env_id": "HalfCheeta-v4"}, "unknown environment id"),
        ({"env_id": "CartPole-v1"}, "Discrete action space"),
        ({"clip_coef": -0.1}, "--clip-coef must be positive"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be positive"),
        ({"ent_coef": -1.0}, "--ent-coef and --vf-coef must not be negative"),
        ({"vf_coef": -3.0}, "--ent-coef and --vf-coef must not be negative"),
        ({"target_kl": -1.0}, "--target-kl must be positive"),
        ({"kl_coef": -1.0}, "--kl-coef must not be negative"),
        ({"adaptive_kl": True}, "--adaptive-kl needs --policy-objective kl-penalty"),
        ({"adaptive_kl": True, "policy_objective": "kl-penalty", "kl_target": 0.0}, "--adaptive-kl needs a positive"),
        ({"seed": -1}, "--seed must lie in"),
        ({"eval_episodes": 0}, "--eval-episodes must be at least 1"),
    ],
)
def test_bad_configuration_is_rejected(tmp_path, monkeypatch, overrides, message):
    if "env_id" not in overrides:  # rejected before any env is built
        monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    with pytest.raises(pc.ConfigError, match=message):
        pc.train(tiny_args(tmp_path, **overrides))


def test_checkpoint_of_another_env_or_script_is_rejected(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=256, num_steps=256))
    with pytest.raises(pc.ConfigError, match="trained on InvertedPendulum-v4, not on Hopper-v4"):
        pc.train(tiny_args(tmp_path, env_id="Hopper-v4", resume=summary["checkpoint"]))
    foreign = tmp_path / "atari.pt"
    torch.save({"script": "ppo_atari", "env_id": "BreakoutNoFrameskip-v4"}, foreign)
    with pytest.raises(pc.ConfigError, match="checkpoint of ppo_atari, not of ppo_continuous"):
        pc.train(tiny_args(tmp_path, resume=str(foreign)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(pc.ConfigError, match="not a readable checkpoint"):
        pc.evaluate_checkpoint(str(garbage), tiny_args(tmp_path))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-minibatches", "3"], "does not divide into 3 minibatches"),
        (["--env-id", "CartPole-v1", "--total-timesteps", "4096"], "Discrete action space"),
        (["--eval-checkpoint", "/nonexistent.pt"], "does not exist"),
        (["--eval-checkpoint", "/nonexistent.pt", "--eval-episodes", "0"], "--eval-episodes must be at least 1"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32), got -1"),
        (["--num-env", "3"], "unrecognized argument --num-env (did you mean --num-envs?)"),
        (["--runs-dir", "/etc/hostname/runs", "--env-id", "Pendulum-v1"], "cannot create the run folder"),
    ],
)
def test_cli_bad_input_prints_one_error_line(flags, message):
    result = run_cli(*flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("mujoco", ["--env-id", "Hopper-v4"]),
        ("moviepy", ["--capture-video"]),
        ("wandb", ["--track"]),
        ("moviepy", ["--capture-video", "--eval-checkpoint", "/nonexistent.pt"]),  # checked on that path too
    ],
)
def test_missing_optional_package_names_the_install_command(module, flags):
    hide = f"import sys; sys.modules[{module!r}] = None; sys.argv = ['ppo_continuous.py', *{flags!r}]; "
    result = subprocess.run(
        [sys.executable, "-c", hide + "import ppo_continuous; ppo_continuous.main()"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(f"pip install {module}")


def test_track_without_a_wandb_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")  # no `wandb login` either
    result = subprocess.run([sys.executable, SCRIPT, "--track"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --track needs a W&B API key")


def test_track_without_a_connection_logs_offline_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="0" * 40, WANDB_BASE_URL="https://wandb.invalid")  # a key, but no server
    flags = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "256", "--num-steps", "256", "--track",
             "--num-minibatches", "4", "--eval-episodes", "1", "--runs-dir", str(tmp_path)]  # fmt: skip
    start = time.time()
    result = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "W&B unreachable" in result.stdout and "logging offline" in result.stdout
    assert list(tmp_path.glob("*/wandb/offline-run-*"))
    assert time.time() - start < 60  # not wandb's 90-second wait for a server


def test_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--env-id",
        "--total-timesteps",
        "--num-envs",
        "--clip-coef",
        "--resume",
        "--eval-checkpoint",
    ):
        assert flag in result.stdout
    assert "the surrogate clipping coefficient epsilon" in result.stdout


# HOW A RUN STOPS: SIGNALS DURING THE SAVE, STORAGE ERRORS, DIVERGENCE, A FOLDER OF ITS OWN (issue 19)

LONG_RUN = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "102400", "--num-steps", "256",
            "--num-minibatches", "4", "--eval-episodes", "1", "--no-cuda"]  # fmt: skip


def slow_save_command(*flags, seconds=3.0):
    """The script's command line, in a wrapper where every torch.save waits `seconds` inside its open .tmp file:
    time to send a signal into the save. The script itself runs unchanged."""
    code = (
        "import sys, time, torch, ppo_continuous as pc\n"
        "real_save = torch.save\n"
        f"torch.save = lambda obj, f: (real_save(obj, f), time.sleep({seconds}))\n"
        f"sys.argv = ['ppo_continuous.py', *{list(flags)!r}]\n"
        "pc.main()\n"
    )
    return [sys.executable, "-c", code]


def start(command) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_training(process: subprocess.Popen) -> None:
    for line in process.stdout:  # the progress line of the first iteration
        if line.startswith("step"):
            return
    raise AssertionError(f"the run ended before training: {process.stderr.read()}")


def wait_for(paths, timeout=60.0):
    deadline = time.time() + timeout
    while not (found := list(paths())) and time.time() < deadline:
        time.sleep(0.02)
    assert found, "timed out"
    return found


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert stderr.strip().splitlines()[-1:] == lines[-1:], stderr  # the error is the last thing said
    return lines


def unfinished_checkpoint(folder: Path, **overrides) -> Path:
    """The checkpoint that a run of tiny_args saves after its first iteration, written without the run."""
    args = tiny_args(folder, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    agent = pc.Agent(4, 1)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    normalizer, scaler = pc.ObservationNormalizer((4,)), pc.RewardScaler(args.num_envs, args.gamma)
    kl_controller = pc.AdaptiveKLController(args.kl_coef, args.kl_target)
    pc.save_checkpoint(
        folder / "checkpoint.pt", agent, optimizer, normalizer, scaler, kl_controller, args, args.batch_size, 1
    )
    return folder / "checkpoint.pt"


@pytest.mark.parametrize(
    ("first", "second", "exit_code"),
    [(signal.SIGINT, signal.SIGINT, 130), (signal.SIGHUP, signal.SIGTERM, 129)],  # twice Ctrl-C; a closed terminal
)
def test_a_second_signal_during_the_save_is_held_until_checkpoint_and_summary_are_written(
    tmp_path, first, second, exit_code
):
    process = start(slow_save_command(*LONG_RUN, "--runs-dir", str(tmp_path)))
    wait_until_training(process)
    process.send_signal(first)
    wait_for(lambda: tmp_path.glob("*/checkpoint.tmp"))  # the save has begun (and lasts 3 s)
    process.send_signal(second)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr  # 128 + the first signal's number
    assert "Traceback" not in stderr and f"interrupted ({first.name})" in stdout
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == first.name
    checkpoint = pc.load_checkpoint(summary["checkpoint"])
    assert checkpoint["global_step"] == summary["global_step"] > 0
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
    assert pc.load_checkpoint(summary["checkpoint"])["global_step"] == summary["global_step"] > 0


def test_help_into_a_pipe_that_is_already_closed_ends_quietly():
    process = start([sys.executable, SCRIPT, "--help"])
    process.stdout.close()  # `--help | head -1`, with head gone before the help is printed
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 141 and stderr == "", stderr


def test_a_third_signal_abandons_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    checkpoint_path = unfinished_checkpoint(tmp_path / "run", total_timesteps=102400)
    before = checkpoint_path.read_bytes()
    process = start(slow_save_command("--resume", str(checkpoint_path), "--no-cuda", "--eval-episodes", "1"))
    wait_until_training(process)
    process.send_signal(signal.SIGINT)
    wait_for(lambda: checkpoint_path.parent.glob("checkpoint.tmp"))
    process.send_signal(signal.SIGINT)  # held
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # abandons the save
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert checkpoint_path.read_bytes() == before  # the previous checkpoint, untouched
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"] == str(checkpoint_path)
    assert summary["save_aborted"].endswith("kept: iteration 1") and summary["save_aborted"] in stdout
    assert not list(checkpoint_path.parent.glob("*.tmp"))


def test_a_full_disk_for_the_checkpoint_is_one_line_and_the_next_save_is_not_blocked(tmp_path):
    checkpoint_path = unfinished_checkpoint(tmp_path / "run", total_timesteps=512)
    (checkpoint_path.parent / "checkpoint.tmp").symlink_to("/dev/full")  # a real ENOSPC on the final save
    result = run_cli("--resume", str(checkpoint_path), "--no-cuda", "--eval-episodes", "1")
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: cannot write {checkpoint_path.parent / 'checkpoint.tmp'}: No space left on device")
    # The failed .tmp is gone, so the stop's own save (of the newest iteration) went through.
    assert line.endswith(f"the checkpoint of iteration 2 is kept in {checkpoint_path}")
    assert pc.load_checkpoint(str(checkpoint_path))["iteration"] == 2 and not list(tmp_path.glob("run/*.tmp"))
    summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == line.removeprefix("error: ")


def test_a_full_disk_for_the_summary_keeps_the_summary_written_before(tmp_path):
    checkpoint_path = unfinished_checkpoint(tmp_path / "run", total_timesteps=512)
    summary_path = checkpoint_path.parent / "summary.json"
    summary_path.write_text('{"status": "interrupted"}')
    (checkpoint_path.parent / "summary.tmp").symlink_to("/dev/full")
    result = run_cli("--resume", str(checkpoint_path), "--no-cuda", "--eval-episodes", "1")
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line == (
        f"error: cannot write {checkpoint_path.parent / 'summary.tmp'}: No space left on device; "
        f"the checkpoint of iteration 2 is kept in {checkpoint_path}"
    )
    assert summary_path.read_text() == '{"status": "interrupted"}'  # not destroyed by the failed write
    assert pc.load_checkpoint(str(checkpoint_path))["iteration"] == 2


def test_a_stale_tmp_file_does_not_block_the_save(tmp_path):
    checkpoint_path = unfinished_checkpoint(tmp_path / "run", total_timesteps=512)
    (checkpoint_path.parent / "checkpoint.tmp").write_bytes(b"the partial file of a killed run")
    summary = pc.train(tiny_args(tmp_path, total_timesteps=512, resume=str(checkpoint_path)))
    assert summary["status"] == "completed" and pc.load_checkpoint(str(checkpoint_path))["iteration"] == 2
    assert not list(checkpoint_path.parent.glob("*.tmp"))


def test_a_run_folder_that_disappears_during_the_run_is_one_line_without_tracebacks(tmp_path):
    process = start([sys.executable, SCRIPT, *LONG_RUN, "--runs-dir", str(tmp_path / "runs"), "--save-interval", "1"])
    (checkpoint_path,) = wait_for(lambda: (tmp_path / "runs").glob("*/checkpoint.pt"))
    run_dir = checkpoint_path.parent
    run_dir.rename(tmp_path / "moved")  # the disk goes away under the run: every write into the folder fails,
    run_dir.write_text("not a folder")  # TensorBoard's writer thread included
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    (line,) = error_lines(stderr)
    assert line.startswith(f"error: cannot write {run_dir}/") and "Not a directory" in line
    moved = pc.load_checkpoint(str(tmp_path / "moved" / "checkpoint.pt"))  # what was saved before is intact
    assert all(torch.isfinite(v).all() for v in moved["model"].values())


@contextlib.contextmanager
def read_only(folder: Path):
    """folder made unwritable for this process, root included (chattr +i), or the test skipped where it cannot be."""
    os.chmod(folder, 0o555)
    immutable = False
    if os.geteuid() == 0:
        with contextlib.suppress(FileNotFoundError):  # no chattr
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if os.geteuid() == 0 and not immutable:
            pytest.skip("root ignores permissions and chattr +i is not available here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        os.chmod(folder, 0o755)


def test_resume_in_a_read_only_folder_is_refused_before_training(tmp_path):
    checkpoint_path = unfinished_checkpoint(tmp_path / "run", total_timesteps=512)
    before = checkpoint_path.read_bytes()
    with read_only(checkpoint_path.parent):
        result = run_cli("--resume", str(checkpoint_path), "--no-cuda")
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: the run folder {checkpoint_path.parent} is not writable: ")
    assert "step" not in result.stdout and checkpoint_path.read_bytes() == before
    assert sorted(p.name for p in checkpoint_path.parent.iterdir()) == ["checkpoint.pt"]


def test_each_run_has_its_own_folder(tmp_path):
    first, second = pc.make_run_dir(str(tmp_path), "name"), pc.make_run_dir(str(tmp_path), "name")
    assert (first.name, second.name, pc.make_run_dir(str(tmp_path), "name").name) == ("name", "name-2", "name-3")
    # Two runs with the same name and seed started together (most often in the same second): two folders.
    flags = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "256", "--num-steps", "256", "--num-minibatches",
             "4", "--eval-episodes", "1", "--no-cuda", "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    processes = [start([sys.executable, SCRIPT, *flags]) for _ in range(2)]
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    summaries = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*/summary.json")]
    assert len(summaries) == 2 and len({s["run_dir"] for s in summaries}) == 2
    for summary in summaries:
        assert summary["checkpoint"] == str(Path(summary["run_dir"]) / "checkpoint.pt")


def break_the_actor_after_update(monkeypatch, bad_iteration):
    """The update of bad_iteration ends with NaN actor weights (its own loss is finite)."""
    real_update, calls = pc.update_policy, []

    def update(agent, *rest):
        stats = real_update(agent, *rest)
        calls.append(1)
        if len(calls) == bad_iteration:
            with torch.no_grad():
                agent.actor_mean[0].weight.fill_(float("nan"))
        return stats

    monkeypatch.setattr(pc, "update_policy", update)


def test_nan_actions_stop_the_run_in_the_rollout(tmp_path, monkeypatch):
    break_the_actor_after_update(monkeypatch, 2)
    with pytest.raises(pc.TrainingDiverged) as info:
        pc.train(tiny_args(tmp_path))
    assert str(info.value) == "the policy's actions became NaN or infinite; stopped after iteration 2, nothing saved"
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["error"] == str(info.value) and summary["checkpoint"] is None


def test_no_checkpoint_is_written_from_nan_weights(tmp_path, monkeypatch):
    break_the_actor_after_update(monkeypatch, 2)
    with pytest.raises(pc.TrainingDiverged, match="^the weights became NaN or infinite; stopped after iteration 2, "
                       "the checkpoint of iteration 1 is kept in "):  # fmt: skip
        pc.train(tiny_args(tmp_path, save_interval=1))
    (checkpoint_path,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    checkpoint = pc.load_checkpoint(str(checkpoint_path))
    assert checkpoint["iteration"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--seed", "abc"], "error: --seed expects an integer, got 'abc'"),
        (["--seed"], "error: --seed needs a value"),
        (["--seed", "1", "--num-envs", "--no-cuda"], "error: --num-envs needs a value"),
        (["--learning-rate=fast"], "error: --learning-rate expects a number, got 'fast'"),
        (["--target-kl", "x"], "error: --target-kl expects a number, got 'x'"),
        (["--env-id"], "error: --env-id needs a value"),
    ],
)
def test_a_bad_or_missing_flag_value_is_one_line(flags, line):
    result = run_cli(*flags)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line]


def test_eval_checkpoint_refuses_another_env_id_given_explicitly(tmp_path):
    checkpoint_path = unfinished_checkpoint(tmp_path / "run")
    result = run_cli("--eval-checkpoint", str(checkpoint_path), "--env-id", "Hopper-v4")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: {checkpoint_path} was trained on InvertedPendulum-v4, not on Hopper-v4"
    ]


def test_a_checkpoint_missing_keys_is_refused_in_one_line(tmp_path):
    checkpoint = torch.load(unfinished_checkpoint(tmp_path / "run"), weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "model"}, tmp_path / "no_model.pt")
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer"}, tmp_path / "no_optimizer.pt")
    for flag, name, missing in (
        ("--eval-checkpoint", "no_model.pt", "model"),
        ("--resume", "no_optimizer.pt", "optimizer"),
    ):
        result = run_cli(flag, str(tmp_path / name), "--no-cuda")
        assert result.returncode == 2
        assert error_lines(result.stderr) == [
            f"error: {tmp_path / name} is not a complete checkpoint of ppo_continuous: it lacks {missing}"
        ]


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    summary = pc.train(tiny_args(tmp_path, total_timesteps=512))
    run_dir = Path(summary["run_dir"])
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    result = run_cli("--resume", summary["checkpoint"], "--no-cuda")
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == (
        f"{summary['checkpoint']} is a finished run (iteration 2 of 2): nothing to do"
    )
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before  # no new events, same summary
