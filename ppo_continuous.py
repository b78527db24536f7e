# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.4",
#     "gymnasium[mujoco]>=1.0,<2",
#     "mujoco>=3.0",
#     "numpy>=1.26",
#     "tyro>=0.8",
#     "tensorboard>=2.14",
# ]
# ///
"""PPO for continuous actions (Gaussian policy), in one file.

Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with Generalized Advantage
Estimation (Schulman et al. 2015, arXiv:1506.02438) for any gymnasium env with a `Box` action space
(MuJoCo v4/v5, Pendulum, ...). Defaults: the usual MuJoCo settings (1 env, 2048-step rollouts, 10 epochs
of 32 minibatches); each continuous-control detail of "The 37 Implementation Details of PPO" (Huang et
al., ICLR blog track 2022) is named in a comment, with its number in the blog's lists ("core detail 4",
"continuous detail 8", "situational detail 3"). Read Args, ENVIRONMENT, NETWORK, ALGORITHM and
train(): that is all of PPO. Below the PLUMBING banner: run folder, logs, checkpoints, evaluation, checks.

    python ppo_continuous.py --env-id Hopper-v4 --total-timesteps 1000000    # train; --help for all flags
    python ppo_continuous.py --eval-checkpoint runs/<run>/checkpoint.pt      # evaluate a saved model
    python ppo_continuous.py --resume runs/<run>/checkpoint.pt               # continue a stopped run
    tensorboard --logdir runs

Siblings: ppo_atari.py (discrete actions, pixels through a shared CNN, many envs, short rollouts) and
ppo_llm_toy.py (the same clipped loss on the tokens of a language model). Here: a Gaussian policy with a
state-independent log-std, separate 64-64 tanh actor and critic, and observation normalization and
reward scaling whose statistics are saved with the model.

gymnasium 1.x, on purpose: the vector env autoresets in SAME_STEP mode, so the step that ends an episode
already returns the next episode's first observation and the true final one arrives in
`info["final_obs"]`. No step is spent on a reset (no phantom transition with an ignored action and a
zero reward); on time-limit truncation the bootstrap value is V(final_obs), on termination 0.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import itertools
import json
import math
import netrc
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import typing
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT_NAME = "ppo_continuous"
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Args:
    # Each field's docstring is its --help text and stays one line (tyro keeps a docstring's line breaks); more
    # detail goes into a comment above the field.
    # Algorithm
    env_id: str = "HalfCheetah-v4"
    """the id of a gymnasium environment with a Box action space"""
    total_timesteps: int = 1_000_000
    """total environment steps of the experiment (summed over envs)"""
    learning_rate: float = 3e-4
    """the learning rate of the Adam optimizer"""
    num_envs: int = 1
    """the number of parallel environments (they share one set of normalization statistics)"""
    num_steps: int = 2048
    """the number of steps each env runs per rollout (a rollout has num_envs * num_steps steps)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly: iteration i of N uses lr * (1 - (i - 1) / N), the last one lr / N"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda of Generalized Advantage Estimation"""
    num_minibatches: int = 32
    """the number of minibatches each rollout is split into"""
    update_epochs: int = 10
    """the number of passes over the rollout per update"""
    norm_adv: bool = True
    """normalize the advantages within each minibatch"""
    policy_objective: Literal["clip", "kl-penalty", "none"] = "clip"
    """the policy surrogate: clip (L^CLIP, eq. 7), kl-penalty (L^KLPEN, eq. 8) or none (L^CPI, eq. 6) of the paper"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon (also the trust region the ratio statistics are measured against)"""
    kl_coef: float = 1.0
    """kl-penalty: the coefficient beta of the KL penalty (with --adaptive-kl, its starting value)"""
    adaptive_kl: bool = False
    """kl-penalty: after each update halve beta if the KL fell below kl_target / 1.5, double it above 1.5 kl_target"""
    kl_target: float = 0.01
    """kl-penalty with --adaptive-kl: the target KL d_targ of the adaptive rule"""
    clip_vloss: bool = True
    """clip the value loss around the old value predictions, as the policy loss is clipped"""
    ent_coef: float = 0.0
    """the coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum global norm of the gradients (clipped above it)"""
    target_kl: float | None = None
    """stop the update epochs early once the approximate KL exceeds this (None: never)"""
    norm_obs: bool = True
    """normalize observations by a running mean and std and clip them to [-10, 10]"""
    norm_reward: bool = True
    """scale rewards by the running std of the discounted return and clip them to [-10, 10]"""
    ortho_init: bool = True
    """orthogonal initialization of the weights (otherwise PyTorch's default initialization)"""

    # The run: seeding, device, logging, checkpoints, evaluation
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments)"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms: the same seed then gives the same run twice on CPU"""
    cuda: bool = True
    """use CUDA for the networks when a GPU is available (otherwise the CPU is used)"""
    torch_threads: int = 1
    """CPU threads for torch: 64-64 MLPs gain nothing from more, and extra threads stall on busy cores"""
    # --compile: compiled once at start-up, its time reported in the progress line; docs/ppo_continuous.md says when
    # it pays.
    compile: bool = False
    """torch.compile the update's forward pass and loss (same numbers up to float rounding), timed at start-up"""
    exp_name: str = SCRIPT_NAME
    """the name of this experiment: the first part of the run name `runs/<exp_name>__<env>__<seed>__<time>`"""
    runs_dir: str = "runs"
    """the folder that holds one sub-folder per run (TensorBoard events, checkpoints, summary.json)"""
    track: bool = False
    """log the run to Weights & Biases (needs wandb, and `wandb login` or WANDB_MODE=offline)"""
    wandb_project_name: str = "ppo-reference"
    """the Weights & Biases project"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user); None uses your default"""
    save_interval: int = 0
    """also save the checkpoint every N iterations (0: only at the end and on interruption)"""
    # --resume: the environments start new episodes, so each env's discounted return of the reward scaling starts
    # at 0 again (its running std is restored).
    resume: str | None = None
    """continue this checkpoint's run with its saved settings (only logging, saving, eval, device flags may differ)"""
    eval_checkpoint: str | None = None
    """do not train: evaluate this checkpoint (its env, frozen normalization statistics) and exit"""
    eval_episodes: int = 10
    """the number of evaluation episodes (after training, and with --eval-checkpoint)"""
    eval_stochastic: bool = False
    """evaluate with sampled actions instead of the mean action"""
    capture_video: bool = False
    """record MP4 videos of the evaluation episodes into `<run>/videos` (needs moviepy)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size


# ENVIRONMENT

# Two library warnings the user can do nothing about, each printed every time an env is made. The v4 MuJoCo
# envs are the default on purpose (the published reference figures are for v4; v5 works too): gymnasium's
# "out of date" notice says nothing new. Their model files, inside gymnasium, use MuJoCo's deprecated
# `settotalmass`: MuJoCo prints that from C, through a handler that mujoco_warning replaces.
warnings.filterwarnings("ignore", message=r".*The environment \S+-v4 is out of date", category=DeprecationWarning)


def mujoco_warning(text: str) -> None:
    """MuJoCo's warnings, printed as MuJoCo prints them, except the `settotalmass` one (see above)."""
    if "'settotalmass' is deprecated" not in text:
        print(f"WARNING: {text}\n", file=sys.stderr)


with contextlib.suppress(ImportError):  # only the MuJoCo envs need mujoco (check_env names its install command)
    importlib.import_module("mujoco").set_mju_user_warning(mujoco_warning)


def make_vector_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """num_envs copies of env_id, stepped in this process (vectorized envs: core detail 1 of Huang et al.).

    SAME_STEP autoreset: when an episode ends, step() already returns the reset observation and puts
    the true last observation into info["final_obs"], so every step of the rollout is a real
    transition. The raw (unscaled) return of each finished episode is recorded by the run's monitor
    (EpisodeAndTimeMonitor, below the banner).
    """
    # gym.make's wrappers stay, each for a check a user needs: TimeLimit ends an episode at the env's limit (the
    # truncation compute_gae bootstraps), OrderEnforcing refuses a step before reset, and the env checker
    # checks the first reset and step of an env a user swaps in. All three cost ~8 % of a bare step on Hopper-v4,
    # the checker ~2.5 % of it (benchmarks/env_stack_throughput.py; docs/benchmarks.md), too little to drop one.
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


class RunningMeanStd:
    """Running mean and variance of a stream of batches (parallel update of Chan et al., 1979)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, batch: np.ndarray) -> None:
        # This runs twice per env step, so it is written for speed, with the same numbers: a batch of one (the
        # default, one env) has its sample as mean and variance 0; a larger batch's mean and variance are sums,
        # the same numbers as batch.mean() and batch.var() in half the time.
        batch_count = batch.shape[0]
        if batch_count == 1:
            batch_mean, batch_var = batch[0], 0.0
        else:
            batch_mean = batch.sum(axis=0) / batch_count
            batch_var = ((batch - batch_mean) ** 2).sum(axis=0) / batch_count
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total


class ObservationNormalizer:
    """(obs - mean) / std clipped to [-10, 10], with ONE running mean/std shared by all envs (continuous
    details 6 and 7 of Huang et al.: observation normalization and clipping).

    The statistics are part of the model: they are saved in the checkpoint and evaluation uses them
    frozen (update=False). A policy fed unnormalized or re-normalized observations is a different,
    worse policy. With enabled=False (--no-norm-obs) it passes the raw observations through.
    """

    def __init__(self, obs_shape: tuple[int, ...], clip: float = 10.0, epsilon: float = 1e-8, enabled: bool = True):
        self.rms = RunningMeanStd(obs_shape)
        self.clip, self.epsilon, self.enabled = clip, epsilon, enabled

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        """obs: (num_envs, *obs_shape) raw observations -> normalized float32 of the same shape."""
        if not self.enabled:
            return obs.astype(np.float32)
        if update:
            self.rms.update(obs)
        normalized = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.epsilon)
        return np.clip(normalized, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Divide rewards by the std of the discounted return, clip to [-10, 10] (as in PPO2's VecNormalize;
    continuous details 8 and 9 of Huang et al.: reward scaling and clipping).

    The mean is not subtracted: shifting rewards would change which policy is optimal.
    One running std is shared by all envs; each env keeps its own discounted return. With enabled=False
    (--no-norm-reward) the env's rewards pass through, unscaled and unclipped.
    """

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8, enabled: bool = True):
        self.rms = RunningMeanStd(())
        self.discounted_return = np.zeros(num_envs, np.float64)
        self.gamma, self.clip, self.epsilon, self.enabled = gamma, clip, epsilon, enabled

    def __call__(self, rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
        """rewards, episode_ends: (num_envs,) -> scaled rewards (num_envs,) float32."""
        if not self.enabled:
            return rewards.astype(np.float32)
        self.discounted_return = self.discounted_return * self.gamma + rewards
        self.rms.update(self.discounted_return)
        self.discounted_return[episode_ends] = 0.0
        scaled = rewards / np.sqrt(self.rms.var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)


# NETWORK


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias (core detail 2 of Huang et al.)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate 64-64 tanh actor and critic; Gaussian policy with a state-independent log-std (continuous
    details 4, 1 and 2 of Huang et al.; the log-prob sums over independent action dimensions: detail 3).

    Gains: sqrt(2) for hidden layers, 0.01 for the policy head (initial actions near 0 whatever the
    observation), 1.0 for the value head. The log-std is a free parameter starting at 0 (std 1).
    With ortho_init=False (--no-ortho-init) every layer keeps PyTorch's default initialization instead.
    """

    def __init__(self, obs_dim: int, action_dim: int, ortho_init: bool = True):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )  # fmt: skip
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, action_dim), std=0.01),
        )  # fmt: skip
        self.actor_logstd = nn.Parameter(torch.zeros(1, action_dim))
        if not ortho_init:
            for layer in (*self.critic, *self.actor_mean):
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()  # PyTorch's default: Kaiming-uniform weights and bias

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (B, obs_dim) -> V(obs): (B,)"""
        return self.critic(obs).squeeze(-1)

    def get_action(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (B, obs_dim) -> a sample a ~ N(mean(obs), std): (B, action_dim). The rollout's per-step call."""
        mean = self.actor_mean(obs)
        return mean + self.actor_logstd.exp() * torch.randn_like(mean)

    def get_logprob_entropy_value(self, obs: torch.Tensor, action: torch.Tensor):
        """obs: (B, obs_dim), action: (B, action_dim) -> log pi(action|obs) (B,), entropy (B,), V(obs) (B,).

        The log-prob and entropy of the diagonal Gaussian are sums over action dimensions.
        """
        mean = self.actor_mean(obs)
        log_std = self.actor_logstd.expand_as(mean)
        # log N(a; mean, std) and the Gaussian entropy, per dimension, summed over dimensions. (Written out
        # rather than via torch.distributions.Normal: the same numbers, without a distribution object per call.)
        logprob = (-0.5 * ((action - mean) / log_std.exp()) ** 2 - log_std - LOG_SQRT_2PI).sum(-1)
        entropy = (0.5 + LOG_SQRT_2PI + log_std).sum(-1)
        return logprob, entropy, self.get_value(obs)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q) -> torch.Tensor:
    """KL(p || q) between diagonal Gaussians, exact: (B, action_dim) means, log-stds that broadcast -> (B,).

    Per dimension: log(std_q / std_p) + (std_p^2 + (mean_p - mean_q)^2) / (2 std_q^2) - 1/2, summed.
    """
    variance_ratio = ((2.0 * (log_std_p - log_std_q)).exp() + (mean_p - mean_q) ** 2 / (2.0 * log_std_q).exp()) / 2.0
    return (log_std_q - log_std_p + variance_ratio - 0.5).sum(-1)


# ALGORITHM


@dataclass
class Rollout:
    """One fixed-length rollout: T = num_steps rows of N = num_envs transitions each."""

    obs: torch.Tensor  # (T, N, obs_dim) normalized observation s_t
    actions: torch.Tensor  # (T, N, action_dim) raw Gaussian sample a_t (the env got it clipped)
    logprobs: torch.Tensor  # (T, N) log pi_old(a_t | s_t)
    values: torch.Tensor  # (T, N) V(s_t)
    rewards: torch.Tensor  # (T, N) scaled reward r_t
    next_values: torch.Tensor  # (T, N) V(s_{t+1}); V(final_obs) where the episode ended at t
    terminations: torch.Tensor  # (T, N) 1.0 where s_{t+1} is terminal (bootstrap value 0)
    episode_ends: torch.Tensor  # (T, N) 1.0 where the episode ended at t (terminated or truncated)


@torch.no_grad()  # collecting data needs no gradients
def collect_rollout(envs, agent: Agent, obs_normalizer, reward_scaler, next_obs: np.ndarray, num_steps: int):
    """Run the policy for num_steps steps in every env; returns (rollout, the next rollout's first obs).

    next_obs: (N, obs_dim) normalized observation to start from. Each step only samples an action. The
    log-probs log pi_old(a_t | s_t) and values V(s_t) that PPO needs are computed after the last step, for
    all T * N transitions in one batched pass: the weights do not change during the rollout, so these are
    the numbers a step-by-step computation gives (up to float rounding), at a fraction of the cost (at
    batch 1 a forward pass costs its fixed overhead, not its arithmetic). What the env produces stays in
    numpy until the rollout ends and crosses to the device once: the only per-step transfers are
    observation in, action out.
    """
    device = next(agent.parameters()).device
    check_policy(agent, next_obs)  # NaN or infinite outputs stop the run here (TrainingDiverged), not in the env
    action_space = envs.single_action_space
    obs, actions, rewards, terminations, episode_ends = ([] for _ in range(5))  # one entry per step
    next_values = torch.zeros((num_steps, envs.num_envs), device=device)  # filled only where an episode ended
    for step in range(num_steps):
        obs.append(next_obs)
        action = agent.get_action(torch.as_tensor(next_obs, device=device))
        actions.append(action)
        # The buffer keeps the raw Gaussian sample (its log-prob is the one we train on); the env gets it
        # clipped to the action bounds (continuous detail 5 of Huang et al.).
        env_action = np.clip(action.cpu().numpy(), action_space.low, action_space.high)
        raw_obs, reward, terminated, truncated, info = envs.step(env_action)
        ended = terminated | truncated
        rewards.append(reward_scaler(reward, ended))
        terminations.append(terminated)
        episode_ends.append(ended)
        next_obs = obs_normalizer(raw_obs)
        if ended.any():
            # SAME_STEP autoreset: raw_obs already belongs to the next episode; the observation the ended
            # episode really reached is info["final_obs"]. Its value is the bootstrap on truncation
            # (compute_gae multiplies it by 0 on termination).
            final_obs = torch.as_tensor(obs_normalizer(np.stack(info["final_obs"][ended]), update=False), device=device)
            next_values[step, torch.as_tensor(ended, device=device)] = agent.get_value(final_obs)

    to_device = lambda arrays: torch.as_tensor(np.stack(arrays), dtype=torch.float32, device=device)  # noqa: E731
    obs, actions, episode_ends = to_device(obs), torch.stack(actions), to_device(episode_ends)  # (T, N, ...)
    # log pi_old(a_t | s_t) and V(s_t) of all T * N transitions in one pass.
    logprobs, _, values = agent.get_logprob_entropy_value(obs.flatten(0, 1), actions.flatten(0, 1))
    logprobs, values = logprobs.view(num_steps, -1), values.view(num_steps, -1)  # (T, N)
    # next_values[t] = V(s_{t+1}) = values[t + 1] inside an episode; V(s_T) after the last step.
    last_value = agent.get_value(torch.as_tensor(next_obs, device=device))
    shifted = torch.cat([values[1:], last_value.unsqueeze(0)])
    next_values = torch.where(episode_ends == 0, shifted, next_values)
    rollout = Rollout(
        obs, actions, logprobs, values, to_device(rewards), next_values, to_device(terminations), episode_ends
    )
    return rollout, next_obs


def compute_gae(rewards, values, next_values, terminations, episode_ends, gamma: float, gae_lambda: float):
    """Generalized Advantage Estimation, eq. 16 of arXiv:1506.02438. All tensors (T, N).

    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - ended_t) * A_{t+1}

    The bootstrap value V(s_{t+1}) comes from next_values:
    - inside an episode it is V of the next observation, and at the last step of the rollout it is
      V(s_T), the value of the observation the next rollout starts from;
    - on time-limit truncation it is V(final_obs), the observation the env returned before its reset:
      the episode was cut, not finished, so the future still counts;
    - on termination it is multiplied by 0: there is no future.
    An ended episode (terminated or truncated) also stops the recursion: A_{t+1} belongs to the
    next episode. lambda = 0 gives the one-step TD error, lambda = 1 the Monte-Carlo return minus V.

    Returns (advantages, returns) with returns = advantages + values, the critic's TD(lambda) target.
    """
    # The TD errors of all steps at once; only the recursion over t has to run step by step.
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values  # (T, N)
    discounts = gamma * gae_lambda * (1.0 - episode_ends)  # (T, N), 0 where the episode ended at t
    advantages = torch.zeros_like(rewards)
    advantage = torch.zeros_like(rewards[0])  # A_{t+1}, carried backwards through time; (N,)
    for t in reversed(range(rewards.shape[0])):
        advantage = deltas[t] + discounts[t] * advantage
        advantages[t] = advantage
    return advantages, advantages + values


def ppo_loss(
    new_logprobs, old_logprobs, entropy, new_values, old_values, advantages, returns, args: Args, kl=None, kl_coef=0.0
):
    """The PPO objective on one minibatch (all inputs (B,)); returns (loss to minimize, statistics).

    loss = -L^CLIP + vf_coef * L^VF - ent_coef * S: the negative of eq. 9 of arXiv:1707.06347, which
    maximizes L^CLIP - c1 L^VF + c2 S. --policy-objective puts L^KLPEN or L^CPI in the place of L^CLIP;
    L^KLPEN needs kl, the exact KL(pi_old(.|s) || pi(.|s)) of each sample's state, and its beta kl_coef.
    """
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()  # pi_new(a|s) / pi_old(a|s)
    with torch.no_grad():
        # Two estimators of KL(pi_old || pi_new): k1 = -log r (unbiased, noisy) and
        # k3 = (r - 1) - log r (unbiased and always >= 0), from John Schulman's note on KL estimators.
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1.0) - logratio).mean()
        # The trust region in practice: the fraction of ratios outside [1 - eps, 1 + eps] and the extremes
        # (measured whatever the objective, so that clipping and no clipping can be compared).
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
        ratio_max, ratio_min = ratio.max(), ratio.min()

    if args.norm_adv:  # per-minibatch advantage normalization
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # The paper's three surrogates, written as losses (negated). With r = ratio and A = advantage:
    if args.policy_objective == "clip":
        # L^CLIP, eq. 7: the pessimistic (max of the negated) of the unclipped and clipped surrogates.
        # A > 0: the objective grows with r up to 1 + eps, then is flat; A < 0: it grows as r falls, down
        # to 1 - eps, then is flat. Once r has left [1 - eps, 1 + eps] in the direction A favours, the
        # clipped term is the max, it is constant in r, and no gradient pushes r further.
        pg_loss1 = -advantages * ratio
        pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - args.clip_coef, 1.0 + args.clip_coef)
        policy_loss = torch.max(pg_loss1, pg_loss2).mean()
    elif args.policy_objective == "kl-penalty":
        # L^KLPEN, eq. 8: r * A - beta * KL(pi_old(.|s) || pi(.|s)); the penalty, not a clip, keeps pi close.
        policy_loss = (-advantages * ratio + kl_coef * kl).mean()
    else:
        # L^CPI, eq. 6 (conservative policy iteration): r * A alone; nothing stops r from running away
        # over many epochs on the same rollout.
        policy_loss = (-advantages * ratio).mean()

    # Value loss, optionally clipped around the old prediction the same way (PPO2's baselines code).
    value_loss_unclipped = (new_values - returns) ** 2
    if args.clip_vloss:
        values_clipped = old_values + torch.clamp(new_values - old_values, -args.clip_coef, args.clip_coef)
        value_loss_clipped = (values_clipped - returns) ** 2
        value_loss = 0.5 * torch.max(value_loss_unclipped, value_loss_clipped).mean()
    else:
        value_loss = 0.5 * value_loss_unclipped.mean()

    entropy_mean = entropy.mean()
    loss = policy_loss - args.ent_coef * entropy_mean + args.vf_coef * value_loss
    stats = {
        "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy_mean.detach(),
        "old_approx_kl": old_approx_kl, "approx_kl": approx_kl, "clipfrac": clipfrac, "loss": loss.detach(),
        "ratio_max": ratio_max, "ratio_min": ratio_min,
    }  # fmt: skip
    return loss, stats


class AdaptiveKLController:
    """beta of L^KLPEN: fixed, or with --adaptive-kl adapted after each update (section 4 of arXiv:1707.06347).

    d = KL(pi_old || pi_new) measured after the update: d < d_targ / 1.5 halves beta, d > 1.5 d_targ doubles
    it; the new beta is used in the next update. The paper found the 1.5 and the 2 uncritical and beta's
    starting value unimportant, since it adapts quickly.
    """

    def __init__(self, kl_coef: float, target: float):
        self.value, self.target = kl_coef, target

    def update(self, kl: float) -> None:
        if kl < self.target / 1.5:
            self.value /= 2.0
        elif kl > self.target * 1.5:
            self.value *= 2.0


def minibatch_loss(agent: Agent, batch: dict, mb: torch.Tensor, args: Args, kl_coef: float):
    """The forward pass and the PPO objective on the minibatch mb (indices into the flat rollout `batch`); returns
    ppo_loss's (loss, statistics). This is the part of the update that --compile hands to torch.compile."""
    obs = batch["obs"][mb]
    new_logprobs, entropy, new_values = agent.get_logprob_entropy_value(obs, batch["actions"][mb])
    kl = None
    if args.policy_objective == "kl-penalty":  # KL(pi_old(.|s) || pi(.|s)) with its gradient, for L^KLPEN
        kl = gaussian_kl(batch["old_mean"][mb], batch["old_log_std"], agent.actor_mean(obs), agent.actor_logstd)
    return ppo_loss(
        new_logprobs, batch["logprobs"][mb], entropy, new_values, batch["values"][mb], batch["advantages"][mb],
        batch["returns"][mb], args, kl, kl_coef,
    )  # fmt: skip


def update_policy(
    agent: Agent, optimizer, rollout: Rollout, advantages, returns, args: Args, kl_coef=None, loss_fn=minibatch_loss
) -> dict:
    """update_epochs passes over the flattened rollout in shuffled minibatches; returns statistics: means over
    the minibatches, the extreme ratios over all of them, and the exact KL from the policy before the update
    to the policy after it. kl_coef: beta of L^KLPEN (default --kl-coef; train() passes the adaptive one).
    loss_fn: minibatch_loss, or its compiled form (--compile)."""
    b_obs = rollout.obs.reshape(-1, rollout.obs.shape[-1])  # (B, obs_dim), B = T * N
    b_values, b_returns = rollout.values.reshape(-1), returns.reshape(-1)
    with torch.no_grad():  # pi_old on the rollout's observations, for L^KLPEN and the KL the update reached
        old_mean, old_log_std = agent.actor_mean(b_obs), agent.actor_logstd.clone()  # (B, action_dim), (1, A)
    batch = {
        "obs": b_obs, "actions": rollout.actions.reshape(-1, rollout.actions.shape[-1]),
        "logprobs": rollout.logprobs.reshape(-1), "values": b_values, "advantages": advantages.reshape(-1),
        "returns": b_returns, "old_mean": old_mean, "old_log_std": old_log_std,
    }  # fmt: skip
    kl_coef = args.kl_coef if kl_coef is None else kl_coef

    params = list(agent.parameters())
    totals: dict[str, torch.Tensor] = {}
    ratio_max, ratio_min = torch.full((), -math.inf, device=b_obs.device), torch.full((), math.inf, device=b_obs.device)
    num_minibatch_updates = 0
    for epoch in range(1, args.update_epochs + 1):  # noqa: B007 (epoch is reported below)
        # A fresh permutation each epoch: every sample is used exactly once per epoch.
        permutation = torch.randperm(args.batch_size, device=b_obs.device)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb = permutation[start : start + args.minibatch_size]
            loss, stats = loss_fn(agent, batch, mb, args, kl_coef)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # one global norm over all weights
            optimizer.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            ratio_max = torch.maximum(ratio_max, stats["ratio_max"])  # the extremes over all minibatches
            ratio_min = torch.minimum(ratio_min, stats["ratio_min"])
            num_minibatch_updates += 1
        # Early stop on the KL of the last minibatch of the epoch (situational detail 3 of Huang et al.).
        if args.target_kl is not None and stats["approx_kl"].item() > args.target_kl:
            break
    # Averages over all minibatches; the KL as seen on the last one; what the critic explains.
    result = {key: (value / num_minibatch_updates).item() for key, value in totals.items()}
    result["ratio_max"], result["ratio_min"] = ratio_max.item(), ratio_min.item()  # over all minibatches, not means
    with torch.no_grad():  # exact KL(pi_old || pi_new) over the rollout's observations: how far the update went
        new_mean = agent.actor_mean(b_obs)
        result["exact_kl"] = gaussian_kl(old_mean, old_log_std, new_mean, agent.actor_logstd).mean().item()
    result["beta"] = kl_coef
    result["last_approx_kl"] = stats["approx_kl"].item()
    result["epochs"] = epoch
    result["explained_variance"] = explained_variance(b_values, b_returns)
    result["learning_rate"] = optimizer.param_groups[0]["lr"]
    return result


def train(args: Args) -> dict:
    """Train PPO; returns the summary that is also written to <run>/summary.json."""
    with Run(args) as run:  # checks args; sets up seeding, device, run folder, logs, checkpoints, Ctrl-C
        envs = run.watch(make_vector_env(args.env_id, args.num_envs))
        obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
        agent = Agent(obs_dim, action_dim, args.ortho_init).to(run.device)
        # Adam with eps 1e-5 (core detail 3: PPO2's value, not torch's 1e-8); the fused kernel is the same math, faster.
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
        obs_normalizer = ObservationNormalizer((obs_dim,), enabled=args.norm_obs)
        reward_scaler = RewardScaler(args.num_envs, args.gamma, enabled=args.norm_reward)
        kl_controller = AdaptiveKLController(args.kl_coef, args.kl_target)  # beta, for --policy-objective kl-penalty
        start_iteration = run.restore(agent, optimizer, obs_normalizer, reward_scaler, kl_controller)  # 1, or resumed
        loss_fn = run.compile_loss(agent) if args.compile else minibatch_loss  # --compile: torch.compile, timed
        next_obs = obs_normalizer(envs.reset(seed=args.seed + start_iteration - 1)[0])

        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:  # linear annealing (core detail 4): from lr at the first iteration to lr / N at the last
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

            # COLLECT TRAJECTORIES
            rollout, next_obs = collect_rollout(envs, agent, obs_normalizer, reward_scaler, next_obs, args.num_steps)

            # CALCULATE ADVANTAGE
            advantages, returns = compute_gae(
                rollout.rewards, rollout.values, rollout.next_values, rollout.terminations, rollout.episode_ends,
                args.gamma, args.gae_lambda,
            )  # fmt: skip

            # UPDATE NETWORK
            stats = update_policy(agent, optimizer, rollout, advantages, returns, args, kl_controller.value, loss_fn)
            if args.adaptive_kl:  # section 4 of arXiv:1707.06347: beta follows the KL this update reached
                kl_controller.update(stats["exact_kl"])

            run.log(iteration, stats)  # TensorBoard, progress line; stops the run if the loss is not finite
            run.save_if_due(iteration)  # every --save-interval iterations

        run.finish()  # final checkpoint, its evaluation (as a reloaded model), summary.json
    return run.summary


# ==== PLUMBING: below this line nothing changes what PPO computes ====


class ConfigError(ValueError):
    """Bad input (flags, env, checkpoint, a run folder that cannot be written): main() prints it as one line and
    exits with code 2."""


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the policy's outputs became NaN or infinite: the run stops (exit code 1) and keeps
    its last good checkpoint."""


class StorageError(RuntimeError):
    """Writing the checkpoint, summary.json or the TensorBoard events failed (disk full, folder gone): the run stops
    with one line and exit code 1 (a failed run, as a diverged one), keeping what was saved before."""


class RunFinished(Exception):
    """--resume of a run that has done all its iterations: main() says so and exits with code 0, changing nothing."""


# Each stops the run as Ctrl-C does; the exit code is 128 + the signal's number: 130, 143, 129.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def flush_stdout() -> None:
    """Flush stdout; if nobody reads it any more (`| head`, a `less` that quit, a `tee` that the same Ctrl-C ended),
    send it to os.devnull instead, so that Python's own flush at exit does not fail (it would print an "Exception
    ignored" message and change the exit code to 120)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Run:
    """Everything around PPO for one training run, used as `with Run(args) as run:`.

    It owns the run folder, TensorBoard (and W&B with --track), the progress line, the time split,
    the checkpoints (periodic, final, on Ctrl-C / SIGTERM / SIGHUP; never from NaN weights), the final evaluation
    and summary.json, the dict train() returns. A signal anywhere inside the block (or a closed stdout, as SIGPIPE)
    saves the last completed iteration (if training was not finished), writes the summary and returns normally;
    signals that come during that save are held (see _on_signal). A failed write (StorageError) or a divergence
    (TrainingDiverged) writes the summary too and is raised again as one line.
    """

    def __init__(self, args: Args):
        validate_args(args)
        self.checkpoint = load_checkpoint(args.resume, args.env_id) if args.resume else None
        if self.checkpoint is not None:
            check_resume_settings(args, self.checkpoint)
            if self.checkpoint["iteration"] >= args.num_iterations:
                n = args.num_iterations
                raise RunFinished(f"{args.resume} is a finished run (iteration {n} of {n}): nothing to do")
        self.args = args
        seed_everything(args.seed, args.torch_deterministic)
        self.device = select_device(args)
        name = f"{args.exp_name}__{args.env_id}__{args.seed}__{int(time.time())}"
        # A resumed run goes on writing into the folder of its checkpoint; a new one gets a folder of its own.
        self.dir = Path(args.resume).parent if args.resume else make_run_dir(args.runs_dir, name)
        check_writable(self.dir)
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.start_step = self.checkpoint["global_step"] if self.checkpoint else 0
        self.global_step, self.iteration, self.saved_iteration = self.start_step, 0, None
        self.episodes, self.recent_returns = 0, deque(maxlen=100)
        self.env_time = self.inference_time = self.update_time = self.compile_time = 0.0
        self.status, self.stopped_by, self.training_done, self.summary = "completed", None, False, {}
        self.error = None  # the OSError or TrainingDiverged that stopped the run
        if args.track:
            start_wandb(args, self.dir)
        # purge_step: after a crash, the events logged past the checkpoint are dropped, not shown twice.
        self.writer = SummaryWriter(str(self.dir), purge_step=self.start_step + 1 if self.checkpoint else None)
        hyperparameters = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")

    def __enter__(self) -> Run:
        self.signals, self.stopping, self.saving_on_stop, self.previous_handlers = [], False, False, {}
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self.previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        self.previous_excepthook, threading.excepthook = threading.excepthook, self._on_thread_error
        self.start_time = self.last_print = time.time()
        self.iteration_start = time.perf_counter()
        return self

    def _on_signal(self, signum, frame):
        """Ctrl-C, SIGTERM (schedulers) and SIGHUP (a closed terminal) stop the run: the first one unwinds to
        __exit__, which saves. Once a stop has begun, signals are held until the checkpoint and summary are
        written; a third one abandons the checkpoint's save (the previous checkpoint stays: saves are atomic)."""
        self.signals.append(signal.Signals(signum).name)
        if not self.stopping:
            self.stopping, self.stopped_by = True, self.signals[-1]
            raise KeyboardInterrupt
        if self.saving_on_stop and len(self.signals) >= 3:
            raise KeyboardInterrupt

    def _on_thread_error(self, args) -> None:
        """The TensorBoard writer thread's OSError is raised again in the main thread at the next write, which
        reports it in one line: no traceback from the thread as well."""
        if not issubclass(args.exc_type, OSError):
            self.previous_excepthook(args)

    def watch(self, envs: gym.vector.VectorEnv) -> gym.vector.VectorEnv:
        """Wrap the envs so the run sees each finished episode and the time spent stepping them."""
        self.envs = EpisodeAndTimeMonitor(envs)
        return self.envs

    def restore(self, agent, optimizer, obs_normalizer, reward_scaler, kl_controller) -> int:
        """Register what a checkpoint holds; with --resume, load it. Returns the first iteration to run."""
        self.start_time = self.last_print = time.time()  # SPS and wall time count training, not the setup
        self.iteration_start = time.perf_counter()
        self.model = (agent, optimizer, obs_normalizer, reward_scaler, kl_controller)
        if self.checkpoint is None:
            return 1
        c = self.checkpoint
        agent.load_state_dict(c["model"])
        optimizer.load_state_dict(c["optimizer"])
        load_rms(obs_normalizer.rms, c["obs_rms"])
        load_rms(reward_scaler.rms, c["return_rms"])  # each env's discounted return stays 0: new episodes begin
        kl_controller.value = c.get("kl_coef", self.args.kl_coef)  # the adaptive beta where the run stopped
        set_rng_states(c["rng"])
        self.iteration = self.saved_iteration = c["iteration"]
        print(f"resuming {self.checkpoint_path} at step {self.global_step:,} (iteration {c['iteration'] + 1})")
        return c["iteration"] + 1

    def compile_loss(self, agent: Agent):
        """--compile: torch.compile(minibatch_loss), compiled here on a rollout of zeros (forward and backward) so
        that the compile is timed apart from training: the progress line reports it; SPS and wall time include it."""
        start = time.perf_counter()
        compiled = torch.compile(minibatch_loss)  # the shapes never change (an adaptive beta recompiles it once)
        obs_dim, action_dim = agent.actor_mean[0].in_features, agent.actor_logstd.shape[-1]
        batch_size, zeros = self.args.batch_size, lambda *shape: torch.zeros(shape, device=self.device)  # noqa: E731
        batch = {
            "obs": zeros(batch_size, obs_dim), "actions": zeros(batch_size, action_dim), "logprobs": zeros(batch_size),
            "values": zeros(batch_size), "advantages": zeros(batch_size), "returns": zeros(batch_size),
            "old_mean": zeros(batch_size, action_dim), "old_log_std": zeros(1, action_dim),
        }  # fmt: skip
        minibatch = torch.arange(self.args.minibatch_size, device=self.device)
        try:
            loss, _ = compiled(agent, batch, minibatch, self.args, self.args.kl_coef)
            loss.backward()
        except Exception as e:  # e.g. no C++ compiler for the CPU backend
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            raise ConfigError(f"--compile failed ({reason}); run without it") from None
        agent.zero_grad(set_to_none=True)  # the zeros' gradients are not part of training
        self.compile_time = time.perf_counter() - start
        self.iteration_start = time.perf_counter()  # the time split counts training from here
        return compiled

    def log(self, iteration: int, stats: dict) -> None:
        """Check the loss, then log the iteration's scalars under the tags of the popular single-file scripts."""
        if not math.isfinite(stats["loss"]):
            raise TrainingDiverged(f"the loss became {stats['loss']} at iteration {iteration}")  # + the checkpoint kept
        self.iteration, self.global_step = iteration, iteration * self.args.batch_size
        # The time split: env.step() itself; inference is the rest of the rollout; the update (advantages
        # included) runs from the rollout's last env step to now.
        now, (episodes, env_seconds) = time.perf_counter(), self.envs.pop()
        self.env_time += env_seconds
        self.inference_time += self.envs.last_step_end - self.iteration_start - env_seconds
        self.update_time += now - self.envs.last_step_end
        self.iteration_start = now
        self.recent_returns.extend(episode_return for episode_return, _ in episodes)
        self.episodes += len(episodes)
        step, write = self.global_step, self.writer.add_scalar
        for episode_return, episode_length in episodes:
            write("charts/episodic_return", episode_return, step)
            write("charts/episodic_length", episode_length, step)
        sps = (step - self.start_step) / (time.time() - self.start_time)
        write("charts/learning_rate", stats["learning_rate"], step)
        write("charts/SPS", sps, step)
        write("charts/update_epochs", stats["epochs"], step)
        for key in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "exact_kl"):
            write(f"losses/{key}", stats[key], step)
        write("losses/ratio_max", stats["ratio_max"], step)
        write("losses/ratio_min", stats["ratio_min"], step)
        if self.args.policy_objective == "kl-penalty":
            write("charts/beta", stats["beta"], step)
        write("losses/explained_variance", stats["explained_variance"], step)
        for key, seconds in (("env", self.env_time), ("inference", self.inference_time), ("update", self.update_time)):
            write(f"time/{key}_s", seconds, step)
        first_or_last = self.last_print == self.start_time or iteration == self.args.num_iterations
        if first_or_last or time.time() - self.last_print >= 10:
            self.last_print = time.time()
            try:
                print(self.progress_line(sps), flush=True)
            except BrokenPipeError:  # stdout's reader is gone (`| head`, a `less` that quit): stop as SIGHUP does
                self.stopping, self.stopped_by = True, "SIGPIPE"  # exit code 141, as a shell reports SIGPIPE's
                raise KeyboardInterrupt from None

    def progress_line(self, sps: float) -> str:
        total = self.args.num_iterations * self.args.batch_size
        eta = format_duration((total - self.global_step) / max(sps, 1e-9))
        recent = f"{np.mean(self.recent_returns):9.1f}" if self.recent_returns else "      n/a"
        return (
            f"step {self.global_step:>10,}/{total:,} | {sps:5.0f} SPS | ETA {eta} | return {recent} "
            f"(last {len(self.recent_returns)}) | time env {self.env_time:.0f}s inference {self.inference_time:.0f}s "
            f"update {self.update_time:.0f}s" + (f" compile {self.compile_time:.0f}s" if self.compile_time else "")
        )

    def save_if_due(self, iteration: int) -> None:
        if self.args.save_interval and iteration % self.args.save_interval == 0:
            self.save()

    def save(self) -> None:
        """Write the checkpoint, never from NaN or infinite weights (TrainingDiverged; the last good one stays)."""
        check_finite("the weights", *self.model[0].parameters())
        save_checkpoint(self.checkpoint_path, *self.model, self.args, self.global_step, self.iteration)
        self.saved_iteration = self.iteration

    def finish(self) -> None:
        """Save the final model, then evaluate it exactly as --eval-checkpoint evaluates a saved one."""
        self.save()
        self.training_done, self.training_end = True, time.time()  # wall time and SPS: training only
        result = evaluate_checkpoint(str(self.checkpoint_path), self.args)
        self.summary.update(eval_return_mean=result["eval_return_mean"], eval_return_std=result["eval_return_std"])
        self.writer.add_scalar("eval/episodic_return_mean", result["eval_return_mean"], self.global_step)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.stopping = True  # from here on signals are held (_on_signal)
        if hasattr(self, "envs"):
            self.envs.close()
        if exc_type is KeyboardInterrupt:
            self.status, self.stopped_by = "interrupted", self.stopped_by or "SIGINT"
        elif exc_type is not None:
            self.status = "diverged" if exc_type is TrainingDiverged else "failed"
        self.error = exc if isinstance(exc, (OSError, TrainingDiverged)) else None
        # One guarded section for everything a stop writes: each write is tried even if one before it failed.
        for write in (self.save_on_stop, self.flush_logs, self.write_summary):
            try:
                write()
            except (OSError, TrainingDiverged) as e:  # a save refused from NaN weights is a TrainingDiverged
                self.error = self.error or e
                self.status = "diverged" if isinstance(self.error, TrainingDiverged) else "failed"
        self.close()
        if self.status == "interrupted":
            where = "in the final evaluation" if self.training_done else f"at step {self.global_step:,}"
            aborted = f" ({self.summary['save_aborted']})" if "save_aborted" in self.summary else ""
            with contextlib.suppress(BrokenPipeError):  # no reader left (a `tee` ended by the Ctrl-C): dropped
                print(f"interrupted ({self.stopped_by}) {where}; checkpoint: {self.saved_checkpoint()}{aborted}")
        if isinstance(self.error, TrainingDiverged):
            raise TrainingDiverged(self.error_message()) from None
        if self.error is not None:
            raise StorageError(self.error_message()) from None
        if self.status == "completed" and exc_type is None:
            s, n = self.summary, len(self.recent_returns)
            training = f"{s['mean_return']:.1f} (last {n} episodes)" if n else "n/a (no episode finished)"
            evaluation = f"{s['eval_return_mean']:.1f} +- {s['eval_return_std']:.1f}"
            duration = format_duration(s["wall_time_s"])
            with contextlib.suppress(BrokenPipeError):  # the run is complete; a gone reader changes nothing
                print(f"done: {self.global_step:,} steps in {duration} ({s['sps']:.0f} SPS); training return "
                      f"{training} | evaluation {evaluation} | {self.dir}")  # fmt: skip
        return exc_type is KeyboardInterrupt  # handled: train() returns the summary

    def save_on_stop(self) -> None:
        """After a signal or a failed write, save the newest completed iteration if it is not saved yet. A third
        signal abandons this save: the previous checkpoint is untouched and the summary says so."""
        stop_saves = self.status == "interrupted" or isinstance(self.error, OSError)
        if not stop_saves or not hasattr(self, "model") or self.training_done:
            return
        if self.iteration > (self.saved_iteration or 0):
            self.saving_on_stop = True
            try:
                self.save()
            except KeyboardInterrupt:
                kept = f"iteration {self.saved_iteration}" if self.saved_checkpoint() else "nothing"
                self.summary["save_aborted"] = f"a third signal stopped saving iteration {self.iteration}; kept: {kept}"
            finally:
                self.saving_on_stop = False

    def flush_logs(self) -> None:
        """Write the TensorBoard events out; raises the error of TensorBoard's writer thread, if it had one."""
        self.writer.flush()

    def write_summary(self) -> None:
        """summary.json: the final figures (the dict train() returns), written atomically as the checkpoint."""
        wall_time = (self.training_end if self.training_done else time.time()) - self.start_time
        self.summary = {
            "script": SCRIPT_NAME, "env_id": self.args.env_id, "seed": self.args.seed, "status": self.status,
            "global_step": self.global_step, "iterations": self.iteration, "wall_time_s": wall_time,
            "sps": (self.global_step - self.start_step) / max(wall_time, 1e-9), "episodes": self.episodes,
            "mean_return": float(np.mean(self.recent_returns)) if self.recent_returns else None,
            "time_env_s": self.env_time, "time_inference_s": self.inference_time, "time_update_s": self.update_time,
            "run_dir": str(self.dir), "checkpoint": self.saved_checkpoint(), **self.summary,
        }  # fmt: skip
        if self.stopped_by:
            self.summary["stopped_by"] = self.stopped_by
        if self.error is not None:
            self.summary["error"] = self.error_message()
        write_atomically(self.dir / "summary.json", lambda f: f.write(json.dumps(self.summary, indent=2).encode()))

    def error_message(self) -> str:
        """One line: what went wrong, where, and which checkpoint is kept."""
        kept = f"the checkpoint of iteration {self.saved_iteration} is kept in {self.saved_checkpoint()}"
        kept = kept if self.saved_iteration and self.saved_checkpoint() else "nothing saved"
        if isinstance(self.error, OSError):  # the file the OS names, else the folder all the writes go to
            where = os.fsdecode(self.error.filename or self.dir)  # TensorBoard names its file in bytes
            return f"cannot write {where}: {self.error.strerror or self.error}; {kept}"
        return f"{self.error}; stopped after iteration {self.iteration}, {kept}"

    def close(self) -> None:
        """Close TensorBoard and W&B; give back the signal handlers and the thread excepthook."""
        with contextlib.suppress(OSError):  # a failed write is already recorded
            self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        threading.excepthook = self.previous_excepthook

    def saved_checkpoint(self) -> str | None:
        return str(self.checkpoint_path) if self.checkpoint_path.exists() else None


class EpisodeAndTimeMonitor(gym.vector.VectorWrapper):
    """Records the (raw return, length) of every finished episode and the seconds spent in env.step()."""

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self.episodes, self.step_time, self.last_step_end = [], 0.0, time.perf_counter()
        self.returns, self.lengths = np.zeros(self.num_envs), np.zeros(self.num_envs, np.int64)

    def reset(self, **kwargs):
        self.returns[:], self.lengths[:] = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, actions):
        start = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.last_step_end = time.perf_counter()
        self.step_time += self.last_step_end - start
        self.returns += reward  # the env's own reward: the return is reported unscaled
        self.lengths += 1
        for i in np.flatnonzero(terminated | truncated):
            self.episodes.append((float(self.returns[i]), int(self.lengths[i])))
            self.returns[i], self.lengths[i] = 0.0, 0
        return obs, reward, terminated, truncated, info

    def pop(self) -> tuple[list[tuple[float, int]], float]:
        """The episodes finished and the seconds spent stepping since the last pop()."""
        popped, self.episodes, self.step_time = (self.episodes, self.step_time), [], 0.0
        return popped


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is a perfect critic, <= 0 no better than a constant."""
    var_targets = targets.var()
    if var_targets == 0:
        return float("nan")
    return (1.0 - (targets - predictions).var() / var_targets).item()


def rms_state(rms: RunningMeanStd) -> dict:
    mean, var = (torch.as_tensor(np.asarray(x)) for x in (rms.mean, rms.var))
    return {"mean": mean, "var": var, "count": rms.count}


def load_rms(rms: RunningMeanStd, state: dict) -> None:
    rms.mean, rms.var, rms.count = state["mean"].numpy().copy(), state["var"].numpy().copy(), float(state["count"])


def save_checkpoint(path: Path, agent, optimizer, obs_normalizer, reward_scaler, kl_controller, args, global_step,
                    iteration):  # fmt: skip
    """Weights, optimizer, normalization statistics, beta, RNG states, args and progress in one file.

    Written to a temporary file and renamed, so an interrupted save never destroys the last one.
    """
    checkpoint = {
        "script": SCRIPT_NAME, "env_id": args.env_id, "args": asdict(args), "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(), "obs_rms": rms_state(obs_normalizer.rms),
        "return_rms": rms_state(reward_scaler.rms), "kl_coef": kl_controller.value,
        "rng": rng_states(), "global_step": global_step, "iteration": iteration,
    }  # fmt: skip
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def write_atomically(path: Path, write) -> None:
    """write(file) into path's .tmp, then rename it to path: a save that fails or is interrupted never destroys
    the file saved before, and leaves no partial .tmp behind (a stale one from a killed process is overwritten).
    torch.save gets a Python file so that a full disk is an OSError naming the file, not a RuntimeError."""
    tmp_path = path.with_suffix(".tmp")
    try:
        with open(tmp_path, "wb") as f:
            write(f)
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(tmp_path)
        raise


def make_run_dir(runs_dir: str, name: str) -> Path:
    """A new folder runs_dir/name, or name-2, name-3, ... when that is taken: mkdir without exist_ok claims a
    folder atomically, so two runs started in the same second never share one."""
    path = Path(runs_dir) / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(2):
            try:
                path.mkdir()
                return path
            except FileExistsError:
                path = Path(runs_dir) / f"{name}-{n}"
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {path}: {e.strerror}") from None


def check_writable(folder: Path) -> None:
    """Refuse a run folder that cannot be written, before anything trains (a probe file, gone once closed)."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ConfigError(f"the run folder {folder} is not writable: {e.strerror}") from None


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    """Stop the run (TrainingDiverged) unless every entry of the tensors is finite: one reduction, one host sync."""
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise TrainingDiverged(f"{what} became NaN or infinite")


def check_policy(agent: Agent, obs: np.ndarray) -> None:
    """The first forward pass of each rollout, checked: the mean action on obs (N, obs_dim) and the std."""
    with torch.no_grad():
        mean = agent.actor_mean(torch.as_tensor(obs, device=agent.actor_logstd.device))
    check_finite("the policy's actions", mean, agent.actor_logstd)


def load_checkpoint(path: str, env_id: str | None = None) -> dict:
    """Load a checkpoint of this script; with env_id, also check that it was trained on that env."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != SCRIPT_NAME:
        script = checkpoint.get("script", "unknown") if isinstance(checkpoint, dict) else "unknown"
        raise ConfigError(f"{path} is a checkpoint of {script}, not of {SCRIPT_NAME}")
    missing = sorted(CHECKPOINT_KEYS - set(checkpoint))
    if missing:
        raise ConfigError(f"{path} is not a complete checkpoint of {SCRIPT_NAME}: it lacks {', '.join(missing)}")
    if env_id is not None and checkpoint["env_id"] != env_id:
        raise ConfigError(f"{path} was trained on {checkpoint['env_id']}, not on {env_id}")
    return checkpoint


# What a checkpoint holds: the first keys are what an evaluation needs, the others what a resumed run needs.
CHECKPOINT_KEYS = {"env_id", "args", "model", "obs_rms", "global_step", "iteration"}
RESUME_KEYS = {"optimizer", "return_rms", "rng"}

# Flags that change only how a run is logged, saved, evaluated or placed: a resumed run may change them.
RESUME_MAY_CHANGE = {
    "cuda", "torch_threads", "compile", "exp_name", "runs_dir", "track", "wandb_project_name", "wandb_entity",
    "save_interval", "resume", "eval_checkpoint", "eval_episodes", "eval_stochastic", "capture_video",
}  # fmt: skip


def check_resume_settings(args: Args, checkpoint: dict) -> None:
    """A resumed run keeps the settings it was started with; a flag that would change them is refused."""
    if "rng" not in checkpoint:  # saved before random states were part of a checkpoint
        raise ConfigError(f"{args.resume} is from an older version of {SCRIPT_NAME}: it can be evaluated, not resumed")
    missing = sorted(RESUME_KEYS - set(checkpoint))
    if missing:
        raise ConfigError(f"{args.resume} is not a complete checkpoint of {SCRIPT_NAME}: it lacks {', '.join(missing)}")
    saved = checkpoint["args"]
    for name, value in asdict(args).items():
        if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value:
            flag = f"--{name.replace('_', '-')} {value}"
            raise ConfigError(f"{flag} differs from the checkpoint's {saved[name]}: a resumed run keeps its settings")


def rng_states() -> dict:
    """The python, numpy and torch random states, so a resumed run draws what it would have drawn."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.as_tensor(key.astype(np.int64)), position, has_gauss, gauss)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, key, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_agent(checkpoint: dict, device: torch.device) -> tuple[Agent, ObservationNormalizer]:
    """Rebuild the agent and its frozen observation normalizer from a loaded checkpoint."""
    model = checkpoint["model"]
    obs_dim, action_dim = model["actor_mean.0.weight"].shape[1], model["actor_logstd"].shape[1]
    agent = Agent(obs_dim, action_dim).to(device)
    agent.load_state_dict(model)
    obs_normalizer = ObservationNormalizer((obs_dim,), enabled=checkpoint["args"].get("norm_obs", True))
    load_rms(obs_normalizer.rms, checkpoint["obs_rms"])
    return agent, obs_normalizer


def evaluate_checkpoint(path: str, args: Args) -> dict:
    """The one evaluation entry point (after training, and --eval-checkpoint): a saved model on the env it
    was trained on, with its frozen normalization statistics. Returns the returns and their mean and std."""
    checkpoint = load_checkpoint(path)
    agent, obs_normalizer = load_agent(checkpoint, select_device(args))
    video_dir = Path(path).parent / "videos" if args.capture_video else None
    returns = evaluate(
        agent, obs_normalizer, checkpoint["env_id"], args.eval_episodes, args.seed, args.eval_stochastic, video_dir
    )
    return {
        "env_id": checkpoint["env_id"], "global_step": checkpoint["global_step"], "eval_episodes": len(returns),
        "eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns)), "eval_returns": returns,
    }  # fmt: skip


def evaluate(agent, obs_normalizer, env_id: str, episodes: int, seed: int, stochastic=False, video_dir=None):
    """The returns of `episodes` full episodes, with FROZEN normalization statistics.

    The policy acts with its mean action (deterministic) unless stochastic; episode i is seeded with
    seed + i, so the same model and seed always score the same on CPU.
    """
    if video_dir is not None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering when there is no display
    env = gym.make(env_id, render_mode="rgb_array" if video_dir else None)
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(env, str(video_dir), episode_trigger=lambda _: True)
    device = next(agent.parameters()).device
    low, high = env.action_space.low, env.action_space.high
    episode_returns = []
    for episode in range(episodes):
        raw_obs, _ = env.reset(seed=seed + episode)
        done, episode_return = False, 0.0
        while not done:
            obs = torch.as_tensor(obs_normalizer(raw_obs[None], update=False), device=device)
            with torch.inference_mode():
                action = agent.get_action(obs) if stochastic else agent.actor_mean(obs)
            raw_obs, reward, terminated, truncated, _ = env.step(np.clip(action[0].cpu().numpy(), low, high))
            episode_return += float(reward)
            done = terminated or truncated
        episode_returns.append(episode_return)
    env.close()
    return episode_returns


def require_module(module: str, purpose: str) -> None:
    """Fail early with the install command when an optional package is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: pip install {module}") from None


def validate_args(args: Args) -> None:
    """Reject a setting from which nothing sensible can follow, with one line, before anything is built."""
    counts = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes")
    for name in (*counts, "torch_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    rollout = f"num_envs * num_steps = {args.batch_size}"
    checks = [
        (args.learning_rate > 0, f"--learning-rate must be positive, got {args.learning_rate}"),
        (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must lie in [0, 1]"),
        (args.clip_coef > 0, f"--clip-coef must be positive, got {args.clip_coef}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be positive (0 freezes the policy), got {args.max_grad_norm}"),
        (args.ent_coef >= 0 and args.vf_coef >= 0, "--ent-coef and --vf-coef must not be negative"),
        (args.target_kl is None or args.target_kl > 0, f"--target-kl must be positive when set, got {args.target_kl}"),
        (args.kl_coef >= 0, f"--kl-coef must not be negative, got {args.kl_coef}"),
        (not args.adaptive_kl or args.policy_objective == "kl-penalty",
         "--adaptive-kl needs --policy-objective kl-penalty"),
        (not args.adaptive_kl or (args.kl_coef > 0 and args.kl_target > 0),
         "--adaptive-kl needs a positive --kl-coef (beta's start) and --kl-target"),
        (0 <= args.seed < 2**32, f"--seed must lie in [0, 2**32), got {args.seed}"),
        (args.save_interval >= 0, f"--save-interval must not be negative, got {args.save_interval}"),
        (not (args.resume and args.eval_checkpoint), "--resume and --eval-checkpoint exclude each other"),
        (args.batch_size % args.num_minibatches == 0,
         f"the rollout ({rollout}) does not divide into {args.num_minibatches} minibatches"),
        (not args.norm_adv or args.minibatch_size >= 2, "--norm-adv needs minibatches of 2 samples or more"),
        (args.total_timesteps >= args.batch_size,
         f"--total-timesteps {args.total_timesteps} is smaller than one rollout ({rollout})"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if args.track:
        require_module("wandb", "--track")
        if not wandb_can_log():
            raise ConfigError(
                "--track needs a W&B API key: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"
            )
    if args.capture_video:
        require_module("moviepy", "--capture-video")
    if not args.eval_checkpoint:
        check_env(args.env_id)


def check_env(env_id: str) -> None:
    """Reject an unknown id, a MuJoCo id without mujoco installed, or a non-Box action space."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ConfigError(f"unknown environment id {env_id!r}: {e}") from None
    if "mujoco" in str(spec.entry_point):
        require_module("mujoco", f"the MuJoCo environment {env_id}")
    env = gym.make(env_id)
    action_space = env.action_space
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        raise ConfigError(
            f"{env_id} has a {type(action_space).__name__} action space; this script needs a continuous (Box) one"
        )


def wandb_can_log() -> bool:
    """True in offline mode or with an API key (WANDB_API_KEY or the ~/.netrc entry `wandb login` writes)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_host() -> str:
    import wandb

    return urlparse(wandb.Settings().base_url).hostname  # WANDB_BASE_URL, or the SDK's default server


def start_wandb(args: Args, run_dir: Path) -> None:
    """A W&B run mirroring TensorBoard; when the W&B server cannot be reached, it logs offline and says so."""
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode not in ("offline", "disabled"):
        try:  # a 5-second probe, instead of wandb's own 90-second wait for a server that is not there
            socket.create_connection((wandb_host(), 443), timeout=5).close()
        except OSError as e:
            print(f"W&B unreachable ({e}): logging offline into {run_dir / 'wandb'} (upload later: `wandb sync`)")
            mode = "offline"
    try:
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name, config=asdict(args),
                   dir=str(run_dir), sync_tensorboard=True, mode=mode)  # fmt: skip
    except Exception as e:
        raise ConfigError(
            f"--track: W&B did not start ({type(e).__name__}: {e}); WANDB_MODE=offline logs locally"
        ) from None


def select_device(args: Args) -> torch.device:
    """The device for the networks; also sets torch's CPU thread count."""
    torch.set_num_threads(args.torch_threads)
    return torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (torch's reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel warns instead of stopping the run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro's command line, with a mistyped flag or a bad value as one line; under --resume, flags not given keep
    the checkpoint's values (check_resume_settings refuses the ones given that differ)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    check_flag_values(argv)
    args, unknown = tyro.cli(Args, args=argv, return_unknown_args=True)
    if unknown:
        flag = next((u.split("=")[0] for u in unknown if u.startswith("--")), unknown[0])
        known = ["--" + f.name.replace("_", "-") for f in fields(Args)]
        close = difflib.get_close_matches(flag, known + ["--no-" + k[2:] for k in known], n=1)
        raise ConfigError(
            f"unrecognized argument {flag}" + (f" (did you mean {close[0]}?)" if close else "") + "; see --help"
        )
    if args.eval_checkpoint and "--env-id" in (a.split("=")[0] for a in argv):
        load_checkpoint(args.eval_checkpoint, args.env_id)  # an --env-id given must be the checkpoint's
    if args.resume:
        saved = load_checkpoint(args.resume)["args"]
        defaults = Args(**{f.name: saved[f.name] for f in fields(Args) if f.name in saved})
        args = tyro.cli(Args, args=argv, default=defaults)
    return args


def check_flag_values(argv: list[str]) -> None:
    """A flag without its value, or with a value of the wrong type, as one line (tyro would draw a box)."""
    hints = typing.get_type_hints(Args)
    for i, token in enumerate(argv):
        flag, has_value, value = token.partition("=")
        kind = hints.get(flag[2:].replace("-", "_")) if flag.startswith("--") else None
        if kind is None or kind is bool:
            continue
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            if value is None:
                raise ConfigError(f"{flag} needs a value")
        choices = typing.get_args(kind)  # Literal[...]: its values; X | None: (X, NoneType)
        if typing.get_origin(kind) is typing.Literal and value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        base = next((t for t in choices or (kind,) if t in (int, float)), None)
        if base is not None and not (type(None) in choices and value == "None"):
            try:
                base(value)
            except ValueError:
                expected = "an integer" if base is int else "a number"
                raise ConfigError(f"{flag} expects {expected}, got {value!r}") from None


def main() -> None:
    try:
        args = parse_args()
        if args.eval_checkpoint:
            validate_args(args)
            result = evaluate_checkpoint(args.eval_checkpoint, args)
            mean, std, episodes = result["eval_return_mean"], result["eval_return_std"], result["eval_episodes"]
            print(f"{result['env_id']} ({args.eval_checkpoint}, {result['global_step']:,} steps): "
                  f"return {mean:.1f} +- {std:.1f} over {episodes} episodes")  # fmt: skip
            return
        summary = train(args)
    except RunFinished as e:
        print(e)
        return
    except (ConfigError, TrainingDiverged, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)  # 2: bad input; 1: the run failed (diverged, a write failed)
    except BrokenPipeError:  # stdout closed before --help (or another line) was printed, e.g. `--help | head`
        sys.exit(141)  # 128 + SIGPIPE (13): what a shell reports for a command that SIGPIPE ended
    finally:
        flush_stdout()  # here, not at exit: a reader gone by now (a `tee` ended by the same Ctrl-C) changes nothing
    if summary["status"] == "interrupted":
        sys.exit(128 + signal.Signals[summary["stopped_by"]])  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, 141 stdout closed


if __name__ == "__main__":
    main()
