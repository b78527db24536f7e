# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.4",
#     "gymnasium>=1.0,<2",
#     "mujoco>=3.0",
#     "numpy>=1.26",
#     "tyro>=0.8",
#     "tensorboard>=2.14",
# ]
# ///
"""PPO for continuous actions (Gaussian policy), in one file.

Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with Generalized Advantage
Estimation (Schulman et al. 2015, arXiv:1506.02438), for any gymnasium environment whose action
space is a `Box`: MuJoCo (v4, v5), Pendulum, ... The defaults are the widely used MuJoCo settings
(1 env, 2048 steps per rollout, 10 epochs of 32 minibatches), and every implementation detail of
"The 37 Implementation Details of PPO" (Huang et al., ICLR blog track 2022) that concerns
continuous control is here and named.

Run:
    python ppo_continuous.py --env-id Hopper-v4 --total-timesteps 1000000
    python ppo_continuous.py --help
    tensorboard --logdir runs
Evaluate a saved model (frozen normalization statistics, mean action):
    python ppo_continuous.py --eval-checkpoint runs/<run>/checkpoint.pt --eval-episodes 10
Resume an interrupted run:
    python ppo_continuous.py --env-id Hopper-v4 --resume runs/<run>/checkpoint.pt

What differs from the sibling scripts:
- ppo_atari.py: discrete actions (categorical policy), pixels through a shared CNN, many envs and
  short rollouts; this file: a Gaussian policy with state-independent log-std, separate 64-64 tanh
  actor and critic, observation normalization and reward scaling whose statistics are saved
  with the model.
- ppo_llm_toy.py: the same clipped loss applied to tokens of a language model.

gymnasium 1.x, done on purpose: the vector env uses the SAME_STEP autoreset mode, so the step that
ends an episode returns the first observation of the next episode, and the true final observation
arrives in `info["final_obs"]`. No step is ever spent on a reset (no phantom transition with an
ignored action and a zero reward), and on time-limit truncation the value is bootstrapped from
V(final_obs), never from the reset observation; on termination the bootstrap value is 0.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

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
    exp_name: str = SCRIPT_NAME
    """the name of this experiment: the first part of the run name `runs/<exp_name>__<env>__<seed>__<time>`"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments)"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms: the same seed then gives the same run twice on CPU"""
    cuda: bool = True
    """use CUDA for the networks when a GPU is available (otherwise the CPU is used)"""
    torch_threads: int = 1
    """CPU threads for torch: 64-64 MLPs gain nothing from more, and extra threads stall on busy cores"""
    track: bool = False
    """log the run to Weights & Biases (needs `pip install wandb`; works with WANDB_MODE=offline)"""
    wandb_project_name: str = "ppo-reference"
    """the Weights & Biases project"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user); None uses your default"""
    capture_video: bool = False
    """record MP4 videos of the evaluation episodes into `<run>/videos` (needs moviepy)"""
    runs_dir: str = "runs"
    """the folder that holds one sub-folder per run (TensorBoard events, checkpoints, summary.json)"""
    save_interval: int = 0
    """also save the checkpoint every N iterations (0: only at the end and on interruption)"""
    resume: str | None = None
    """path of a checkpoint of this script and env to continue training from"""
    eval_checkpoint: str | None = None
    """do not train: evaluate this checkpoint (its env, frozen normalization statistics) and exit"""
    eval_episodes: int = 10
    """the number of evaluation episodes (after training, and with --eval-checkpoint)"""
    eval_stochastic: bool = False
    """evaluate with sampled actions instead of the mean action"""

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
    """anneal the learning rate linearly to 0 over the run"""
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
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon"""
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

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size


class ConfigError(ValueError):
    """Bad input (flags, env, checkpoint): main() prints it as one line and exits with code 2."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


def require_module(module: str, purpose: str) -> None:
    """Fail early with the install command when an optional package is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: pip install {module}") from None


def validate_args(args: Args) -> None:
    """Reject inconsistent settings before anything is built."""
    positive = (
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "torch_threads",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be positive, got {args.learning_rate}")
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
    if args.batch_size % args.num_minibatches != 0:
        raise ConfigError(
            f"the rollout (num_envs * num_steps = {args.batch_size}) does not divide into "
            f"{args.num_minibatches} minibatches"
        )
    if args.norm_adv and args.minibatch_size < 2:
        raise ConfigError("advantage normalization needs minibatches of at least 2 samples")
    if args.total_timesteps < args.batch_size:
        raise ConfigError(
            f"--total-timesteps {args.total_timesteps} is smaller than one rollout "
            f"(num_envs * num_steps = {args.batch_size})"
        )
    if args.eval_episodes < 1:
        raise ConfigError(f"--eval-episodes must be at least 1, got {args.eval_episodes}")
    if args.track:
        require_module("wandb", "--track")
    if args.capture_video:
        require_module("moviepy", "--capture-video")


# ENVIRONMENT


def check_env_id(env_id: str) -> None:
    """Reject an unknown id, or a MuJoCo id without mujoco installed, before building any env."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ConfigError(f"unknown environment id {env_id!r}: {e}") from None
    if "mujoco" in str(spec.entry_point):
        require_module("mujoco", f"the MuJoCo environment {env_id}")


def make_vector_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """num_envs copies of env_id, stepped in this process.

    SAME_STEP autoreset: when an episode ends, step() already returns the reset observation and puts
    the true last observation into info["final_obs"], so every step of the rollout is a real
    transition. RecordEpisodeStatistics reports the raw (unscaled) return of each finished episode.
    """
    check_env_id(env_id)
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    if not isinstance(envs.single_action_space, gym.spaces.Box):
        space = envs.single_action_space
        envs.close()
        raise ConfigError(
            f"{env_id} has a {type(space).__name__} action space; this script needs a continuous (Box) one"
        )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


class RunningMeanStd:
    """Running mean and variance of a stream of batches (parallel update of Chan et al., 1979)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, batch: np.ndarray) -> None:
        batch_mean, batch_var, batch_count = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict:
        mean, var = torch.as_tensor(np.asarray(self.mean)), torch.as_tensor(np.asarray(self.var))
        return {"mean": mean, "var": var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = state["mean"].numpy().copy(), state["var"].numpy().copy()
        self.count = float(state["count"])


class ObservationNormalizer:
    """(obs - mean) / std clipped to [-10, 10], with ONE running mean/std shared by all envs.

    The statistics are part of the model: they are saved in the checkpoint and evaluation uses them
    frozen (update=False). A policy fed unnormalized or re-normalized observations is a different,
    worse policy.
    """

    def __init__(self, obs_shape: tuple[int, ...], clip: float = 10.0, epsilon: float = 1e-8):
        self.rms = RunningMeanStd(obs_shape)
        self.clip, self.epsilon = clip, epsilon

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        """obs: (num_envs, *obs_shape) raw observations -> normalized float32 of the same shape."""
        if update:
            self.rms.update(obs)
        normalized = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.epsilon)
        return np.clip(normalized, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Divide rewards by the std of the discounted return, clip to [-10, 10] (as in PPO2's VecNormalize).

    The mean is not subtracted: shifting rewards would change which policy is optimal.
    One running std is shared by all envs; each env keeps its own discounted return.
    """

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        self.rms = RunningMeanStd(())
        self.discounted_return = np.zeros(num_envs, np.float64)
        self.gamma, self.clip, self.epsilon = gamma, clip, epsilon

    def __call__(self, rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
        """rewards, episode_ends: (num_envs,) -> scaled rewards (num_envs,) float32."""
        self.discounted_return = self.discounted_return * self.gamma + rewards
        self.rms.update(self.discounted_return)
        self.discounted_return[episode_ends] = 0.0
        scaled = rewards / np.sqrt(self.rms.var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)


# NETWORK


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias (implementation detail 2 of Huang et al.)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate 64-64 tanh actor and critic; Gaussian policy with a state-independent log-std.

    Gains: sqrt(2) for hidden layers, 0.01 for the policy head (initial actions near 0 whatever the
    observation), 1.0 for the value head. The log-std is a free parameter starting at 0 (std 1).
    """

    def __init__(self, obs_dim: int, action_dim: int):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, action_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.zeros(1, action_dim))

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (B, obs_dim) -> V(obs): (B,)"""
        return self.critic(obs).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None):
        """obs: (B, obs_dim); action: (B, action_dim) or None to sample one.

        Returns action (B, action_dim), log pi(action|obs) (B,), entropy (B,), V(obs) (B,).
        The log-prob and entropy of the diagonal Gaussian are sums over action dimensions.
        """
        mean = self.actor_mean(obs)
        log_std = self.actor_logstd.expand_as(mean)
        std = log_std.exp()
        if action is None:
            action = mean + std * torch.randn_like(mean)
        # log N(a; mean, std) and the Gaussian entropy, per dimension, summed over dimensions.
        # (Written out rather than via torch.distributions.Normal: same numbers, ~1.4x faster per step.)
        logprob = (-0.5 * ((action - mean) / std) ** 2 - log_std - LOG_SQRT_2PI).sum(-1)
        entropy = (0.5 + LOG_SQRT_2PI + log_std).sum(-1)
        return action, logprob, entropy, self.get_value(obs)


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


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminations: torch.Tensor,
    episode_ends: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    advantage = torch.zeros_like(rewards[0])  # A_{t+1}, carried backwards through time; (N,)
    for t in reversed(range(num_steps)):
        delta = rewards[t] + gamma * (1.0 - terminations[t]) * next_values[t] - values[t]
        advantage = delta + gamma * gae_lambda * (1.0 - episode_ends[t]) * advantage
        advantages[t] = advantage
    return advantages, advantages + values


def ppo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    args: Args,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective on one minibatch (all inputs (B,)); returns (loss to minimize, statistics).

    loss = L^CLIP + vf_coef * L^VF - ent_coef * entropy, eq. 9 of arXiv:1707.06347 (negated).
    """
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()  # pi_new(a|s) / pi_old(a|s)
    with torch.no_grad():
        # Two estimators of KL(pi_old || pi_new): k1 = -log r (unbiased, noisy) and
        # k3 = (r - 1) - log r (unbiased and always >= 0), from John Schulman's note on KL estimators.
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1.0) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

    if args.norm_adv:  # per-minibatch advantage normalization
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # L^CLIP, eq. 7 of arXiv:1707.06347: the pessimistic (max of the negated) of the unclipped and
    # clipped surrogates. Once the ratio leaves [1 - eps, 1 + eps] in the direction the advantage
    # favours, the clipped term is constant and no gradient pushes it further.
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - args.clip_coef, 1.0 + args.clip_coef)
    policy_loss = torch.max(pg_loss1, pg_loss2).mean()

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
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "entropy": entropy_mean.detach(),
        "old_approx_kl": old_approx_kl,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
        "loss": loss.detach(),
    }
    return loss, stats


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is a perfect critic, <= 0 no better than a constant."""
    var_targets = targets.var()
    if var_targets == 0:
        return float("nan")
    return (1.0 - (targets - predictions).var() / var_targets).item()


# ROLLOUT, UPDATE, CHECKPOINTS


class Timers:
    """Wall-clock seconds spent in the environment, in policy inference and in the update."""

    def __init__(self):
        self.env = self.inference = self.update = 0.0


def collect_rollout(
    envs: gym.vector.VectorEnv,
    agent: Agent,
    obs_normalizer: ObservationNormalizer,
    reward_scaler: RewardScaler,
    next_obs: np.ndarray,
    num_steps: int,
    timers: Timers,
    episode_stats: list,
) -> tuple[Rollout, np.ndarray]:
    """Run the policy for num_steps steps in every env.

    next_obs: (N, obs_dim) normalized observation to start from. Returns the rollout (on the agent's
    device) and the normalized observation the next rollout starts from. Appends (return, length)
    of every finished episode to episode_stats.

    What the env produces (observations, rewards, done flags) stays in numpy until the rollout ends
    and crosses to the device once; what the policy produces stays on the device. The only per-step
    transfers are the unavoidable ones: observation in, action out.
    """
    device = next(agent.parameters()).device
    num_envs = envs.num_envs
    action_space = envs.single_action_space
    obs = np.zeros((num_steps, num_envs, *envs.single_observation_space.shape), np.float32)
    rewards, terminations, episode_ends = (np.zeros((num_steps, num_envs), np.float32) for _ in range(3))
    actions = torch.zeros((num_steps, num_envs, *action_space.shape), device=device)
    logprobs, values, next_values = (torch.zeros((num_steps, num_envs), device=device) for _ in range(3))
    for step in range(num_steps):
        t0 = time.perf_counter()
        obs[step] = next_obs
        with torch.inference_mode():
            action, logprob, _, value = agent.get_action_and_value(torch.as_tensor(next_obs, device=device))
        actions[step], logprobs[step], values[step] = action, logprob, value
        # The buffer keeps the raw Gaussian sample (its log-prob is the one we train on); the env
        # gets it clipped to the action bounds.
        env_action = np.clip(action.cpu().numpy(), action_space.low, action_space.high)
        t1 = time.perf_counter()
        raw_obs, reward, terminated, truncated, info = envs.step(env_action)
        t2 = time.perf_counter()
        ended = terminated | truncated
        rewards[step] = reward_scaler(reward, ended)
        terminations[step], episode_ends[step] = terminated, ended
        next_obs = obs_normalizer(raw_obs)
        if ended.any():
            # SAME_STEP autoreset: raw_obs already belongs to the next episode; the observation
            # the ended episode really reached is info["final_obs"]. Its value is the bootstrap
            # on truncation (compute_gae multiplies it by 0 on termination).
            final_obs = obs_normalizer(np.stack(info["final_obs"][ended]), update=False)
            with torch.inference_mode():
                final_values = agent.get_value(torch.as_tensor(final_obs, device=device))
            next_values[step, torch.as_tensor(ended, device=device)] = final_values
            for i in np.flatnonzero(info["_episode"]):
                episode_stats.append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))
        timers.inference += t1 - t0 + time.perf_counter() - t2
        timers.env += t2 - t1

    to_device = lambda array: torch.as_tensor(array, device=device)  # noqa: E731
    episode_ends_t = to_device(episode_ends)
    # next_values[t] = V(s_{t+1}) = values[t + 1] inside an episode; V(s_T) after the last step.
    with torch.inference_mode():
        last_value = agent.get_value(to_device(next_obs))
    shifted = torch.cat([values[1:], last_value.unsqueeze(0)])
    next_values = torch.where(episode_ends_t == 0, shifted, next_values)
    rollout = Rollout(
        to_device(obs), actions, logprobs, values, to_device(rewards), next_values,
        to_device(terminations), episode_ends_t,
    )  # fmt: skip
    return rollout, next_obs


def update_policy(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    args: Args,
) -> dict[str, float]:
    """update_epochs passes over the flattened rollout in shuffled minibatches; returns mean stats."""
    b_obs = rollout.obs.reshape(-1, rollout.obs.shape[-1])  # (B, obs_dim), B = T * N
    b_actions = rollout.actions.reshape(-1, rollout.actions.shape[-1])
    b_logprobs, b_values = rollout.logprobs.reshape(-1), rollout.values.reshape(-1)
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

    params = list(agent.parameters())
    totals: dict[str, torch.Tensor] = {}
    num_minibatch_updates = 0
    for _epoch in range(args.update_epochs):
        # A fresh permutation each epoch: every sample is used exactly once per epoch.
        permutation = torch.randperm(args.batch_size, device=b_obs.device)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb = permutation[start : start + args.minibatch_size]
            _, new_logprobs, entropy, new_values = agent.get_action_and_value(b_obs[mb], b_actions[mb])
            loss, stats = ppo_loss(
                new_logprobs, b_logprobs[mb], entropy, new_values, b_values[mb],
                b_advantages[mb], b_returns[mb], args,
            )  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # one global norm over all weights
            optimizer.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            num_minibatch_updates += 1
        # Early stop on the KL of the last minibatch of the epoch (implementation detail 12).
        if args.target_kl is not None and stats["approx_kl"].item() > args.target_kl:
            break
    # Averages over all minibatches; the KL and clip fraction also as seen on the last one.
    result = {key: (value / num_minibatch_updates).item() for key, value in totals.items()}
    result["last_approx_kl"] = stats["approx_kl"].item()
    result["epochs"] = _epoch + 1
    return result


def save_checkpoint(path: Path, agent, optimizer, obs_normalizer, reward_scaler, args, global_step, iteration):
    """Weights, optimizer, normalization statistics, args and progress in one file.

    Written to a temporary file and renamed, so an interrupted save never destroys the last one.
    """
    checkpoint = {
        "script": SCRIPT_NAME,
        "env_id": args.env_id,
        "args": asdict(args),
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "obs_rms": obs_normalizer.rms.state_dict(),
        "return_rms": reward_scaler.rms.state_dict(),
        "global_step": global_step,
        "iteration": iteration,
    }
    tmp_path = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp_path)
    os.replace(tmp_path, path)


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
    if env_id is not None and checkpoint["env_id"] != env_id:
        raise ConfigError(f"{path} was trained on {checkpoint['env_id']}, not on {env_id}")
    return checkpoint


def evaluate(
    agent: Agent,
    obs_normalizer: ObservationNormalizer,
    env_id: str,
    episodes: int,
    seed: int,
    stochastic: bool = False,
    video_dir: Path | None = None,
) -> list[float]:
    """Returns of `episodes` full episodes with FROZEN normalization statistics.

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
            obs = obs_normalizer(raw_obs[None], update=False)
            with torch.inference_mode():
                obs_t = torch.as_tensor(obs, device=device)
                action = agent.get_action_and_value(obs_t)[0] if stochastic else agent.actor_mean(obs_t)
            raw_obs, reward, terminated, truncated, _ = env.step(np.clip(action[0].cpu().numpy(), low, high))
            episode_return += float(reward)
            done = terminated or truncated
        episode_returns.append(episode_return)
    env.close()
    return episode_returns


def load_agent(checkpoint: dict, obs_dim: int, action_dim: int, device: torch.device):
    """Rebuild the agent and its frozen observation normalizer from a loaded checkpoint."""
    agent = Agent(obs_dim, action_dim).to(device)
    agent.load_state_dict(checkpoint["model"])
    obs_normalizer = ObservationNormalizer((obs_dim,))
    obs_normalizer.rms.load_state_dict(checkpoint["obs_rms"])
    return agent, obs_normalizer


def evaluate_checkpoint(args: Args) -> dict:
    """--eval-checkpoint: evaluate a saved model on the env it was trained on; print mean and std."""
    checkpoint = load_checkpoint(args.eval_checkpoint)
    env_id = checkpoint["env_id"]
    check_env_id(env_id)
    probe = gym.make(env_id)
    obs_dim, action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    device = select_device(args)
    agent, obs_normalizer = load_agent(checkpoint, obs_dim, action_dim, device)
    video_dir = Path(args.eval_checkpoint).parent / "videos" if args.capture_video else None
    returns = evaluate(
        agent,
        obs_normalizer,
        env_id,
        args.eval_episodes,
        args.seed,
        args.eval_stochastic,
        video_dir,
    )
    result = {
        "env_id": env_id,
        "global_step": checkpoint["global_step"],
        "eval_episodes": len(returns),
        "eval_return_mean": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_returns": returns,
    }
    print(
        f"{env_id} ({args.eval_checkpoint}, {checkpoint['global_step']} steps): "
        f"return {result['eval_return_mean']:.1f} +- {result['eval_return_std']:.1f} over {len(returns)} episodes"
    )
    return result


def select_device(args: Args) -> torch.device:
    """The device for the networks, chosen once per run; also sets torch's CPU thread count."""
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


def start_run(args: Args) -> tuple[Path, SummaryWriter]:
    """The run folder, its TensorBoard writer and, with --track, a W&B run mirroring TensorBoard.

    A resumed run goes on writing into the folder of its checkpoint.
    """
    if args.resume:
        run_dir = Path(args.resume).parent
    else:
        run_name = f"{args.exp_name}__{args.env_id}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.runs_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name,
            config=asdict(args), dir=str(run_dir), sync_tensorboard=True,
        )  # fmt: skip
    writer = SummaryWriter(str(run_dir))
    hyperparameters = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")
    return run_dir, writer


def log_iteration(writer, global_step, stats, rollout, returns, learning_rate, sps, timers, new_episodes):
    """TensorBoard scalars of one iteration, under the tags of the popular single-file scripts."""
    for episode_return, episode_length in new_episodes:
        writer.add_scalar("charts/episodic_return", episode_return, global_step)
        writer.add_scalar("charts/episodic_length", episode_length, global_step)
    writer.add_scalar("charts/learning_rate", learning_rate, global_step)
    writer.add_scalar("charts/SPS", sps, global_step)
    writer.add_scalar("charts/update_epochs", stats["epochs"], global_step)
    for key in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
        writer.add_scalar(f"losses/{key}", stats[key], global_step)
    ev = explained_variance(rollout.values.flatten(), returns.flatten())
    writer.add_scalar("losses/explained_variance", ev, global_step)
    for key in ("env", "inference", "update"):
        writer.add_scalar(f"time/{key}_s", getattr(timers, key), global_step)


def progress_line(global_step: int, total_steps: int, sps: float, recent_returns, timers: Timers) -> str:
    eta = format_duration((total_steps - global_step) / max(sps, 1e-9))
    recent = f"{np.mean(recent_returns):9.1f}" if recent_returns else "      n/a"
    return (
        f"step {global_step:>10,}/{total_steps:,} | {sps:5.0f} SPS | ETA {eta} | "
        f"return {recent} (last {len(recent_returns)}) | "
        f"time env {timers.env:.0f}s inference {timers.inference:.0f}s update {timers.update:.0f}s"
    )


def train(args: Args) -> dict:
    """Train PPO and return the summary that is also written to <run>/summary.json."""
    validate_args(args)
    checkpoint = load_checkpoint(args.resume, args.env_id) if args.resume else None
    seed_everything(args.seed, args.torch_deterministic)
    device = select_device(args)
    envs = make_vector_env(args.env_id, args.num_envs)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    run_dir, writer = start_run(args)
    checkpoint_path = run_dir / "checkpoint.pt"

    agent = Agent(obs_dim, action_dim).to(device)
    # Adam with eps 1e-5 (PPO2's value, not torch's 1e-8); the fused kernel is the same math, faster.
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    obs_normalizer = ObservationNormalizer((obs_dim,))
    reward_scaler = RewardScaler(args.num_envs, args.gamma)
    global_step, start_iteration = 0, 1
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        obs_normalizer.rms.load_state_dict(checkpoint["obs_rms"])
        reward_scaler.rms.load_state_dict(checkpoint["return_rms"])
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        print(f"resuming {checkpoint_path} at step {global_step:,} (iteration {start_iteration})")

    def save(progress: dict) -> None:
        save_checkpoint(checkpoint_path, agent, optimizer, obs_normalizer, reward_scaler, args,
                        progress["global_step"], progress["iteration"])  # fmt: skip

    raw_obs, _ = envs.reset(seed=args.seed + start_iteration - 1)
    next_obs = obs_normalizer(raw_obs)
    episode_stats: list[tuple[float, int]] = []  # (return, length) of every finished episode
    recent_returns: deque[float] = deque(maxlen=100)
    timers = Timers()
    done = {
        "iteration": start_iteration - 1,
        "global_step": global_step,
    }  # last completed iteration
    total_steps = args.num_iterations * args.batch_size
    status, diverged = "completed", None
    start_time = last_print = time.time()
    start_step = global_step
    previous_sigterm = handle_sigterm_as_interrupt()
    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:  # linear annealing of the learning rate to 0
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            # COLLECT TRAJECTORIES
            first_new_episode = len(episode_stats)
            rollout, next_obs = collect_rollout(
                envs,
                agent,
                obs_normalizer,
                reward_scaler,
                next_obs,
                args.num_steps,
                timers,
                episode_stats,
            )
            global_step += args.batch_size

            # CALCULATE ADVANTAGE
            advantages, returns = compute_gae(
                rollout.rewards, rollout.values, rollout.next_values, rollout.terminations,
                rollout.episode_ends, args.gamma, args.gae_lambda,
            )  # fmt: skip

            # UPDATE NETWORK
            update_start = time.perf_counter()
            stats = update_policy(agent, optimizer, rollout, advantages, returns, args)
            timers.update += time.perf_counter() - update_start
            if not math.isfinite(stats["loss"]):
                raise TrainingDiverged(
                    f"the loss became {stats['loss']} at iteration {iteration} (step {global_step:,}); "
                    f"stopped without saving, the last good checkpoint is kept"
                )
            done = {"iteration": iteration, "global_step": global_step}

            # LOG
            new_episodes = episode_stats[first_new_episode:]
            recent_returns.extend(episode_return for episode_return, _ in new_episodes)
            sps = (global_step - start_step) / (time.time() - start_time)
            learning_rate = optimizer.param_groups[0]["lr"]
            log_iteration(
                writer,
                global_step,
                stats,
                rollout,
                returns,
                learning_rate,
                sps,
                timers,
                new_episodes,
            )
            if time.time() - last_print >= 10 or iteration in (
                start_iteration,
                args.num_iterations,
            ):
                last_print = time.time()
                print(progress_line(global_step, total_steps, sps, recent_returns, timers), flush=True)
            if args.save_interval and iteration % args.save_interval == 0:
                save(done)
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"interrupted at step {done['global_step']:,}: saving {checkpoint_path}", flush=True)
    except TrainingDiverged as error:
        status, diverged = "diverged", error
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        envs.close()

    if status != "diverged":
        save(done)
    wall_time = time.time() - start_time
    summary = {
        "script": SCRIPT_NAME,
        "env_id": args.env_id,
        "seed": args.seed,
        "status": status,
        "global_step": done["global_step"],
        "iterations": done["iteration"],
        "wall_time_s": wall_time,
        "sps": (done["global_step"] - start_step) / max(wall_time, 1e-9),
        "episodes": len(episode_stats),
        "mean_return": float(np.mean(recent_returns)) if recent_returns else None,
        "time_env_s": timers.env,
        "time_inference_s": timers.inference,
        "time_update_s": timers.update,
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint_path) if checkpoint_path.exists() else None,
    }
    if status == "completed":
        # EVALUATE the final model exactly as a reloaded checkpoint is evaluated.
        previous_sigterm = handle_sigterm_as_interrupt()
        try:
            summary.update(evaluate_final_model(agent, obs_normalizer, args, run_dir))
        except KeyboardInterrupt:  # the checkpoint is saved: keep the logs, skip the evaluation
            status = summary["status"] = "interrupted"
            print(f"interrupted in the final evaluation; {checkpoint_path} is saved", flush=True)
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
    if status == "completed":
        writer.add_scalar("eval/episodic_return_mean", summary["eval_return_mean"], global_step)
        print(
            f"done: {global_step:,} steps in {format_duration(wall_time)} ({summary['sps']:.0f} SPS); "
            f"training return {summary['mean_return']:.1f} (last {len(recent_returns)} episodes) | "
            f"evaluation {summary['eval_return_mean']:.1f} +- {summary['eval_return_std']:.1f} | {run_dir}",
            flush=True,
        )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    if diverged is not None:
        raise diverged
    return summary


def evaluate_final_model(agent: Agent, obs_normalizer: ObservationNormalizer, args: Args, run_dir: Path) -> dict:
    video_dir = run_dir / "videos" if args.capture_video else None
    returns = evaluate(
        agent,
        obs_normalizer,
        args.env_id,
        args.eval_episodes,
        args.seed,
        args.eval_stochastic,
        video_dir,
    )
    return {"eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns))}


def handle_sigterm_as_interrupt():
    """SIGTERM (e.g. from a cluster scheduler) is handled like Ctrl-C: save, flush, exit.

    Returns the previous handler, or None where signals cannot be set (not the main thread).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, raise_interrupt)


def main() -> None:
    args = tyro.cli(Args)
    try:
        if args.eval_checkpoint:
            evaluate_checkpoint(args)
        elif train(args)["status"] == "interrupted":
            sys.exit(130)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
