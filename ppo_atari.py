# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.4",
#     "gymnasium>=1.0,<2",
#     "ale-py>=0.11",
#     "opencv-python-headless>=4.9",
#     "numpy>=1.26",
#     "tyro>=0.8",
#     "tensorboard>=2.14",
# ]
# ///
"""PPO for Atari from pixels (discrete actions, Nature CNN), in one file.

Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with Generalized Advantage
Estimation (Schulman et al. 2015, arXiv:1506.02438), for the Atari 2600 games of the Arcade Learning
Environment through ale-py. The network is the Nature CNN of DQN (Mnih et al. 2015, "Human-level
control through deep reinforcement learning", Nature 518) shared by actor and critic. The defaults
are the widely used Atari settings (8 envs, 128 steps per rollout, 4 epochs of 4 minibatches, clip
0.1), and every implementation detail of "The 37 Implementation Details of PPO" (Huang et al., ICLR
blog track 2022) that concerns Atari is here and named.

Run:
    python ppo_atari.py --env-id BreakoutNoFrameskip-v4 --total-timesteps 10000000
    python ppo_atari.py --help
    tensorboard --logdir runs
Evaluate a saved model (full games, unclipped score):
    python ppo_atari.py --eval-checkpoint runs/<run>/checkpoint.pt --eval-episodes 10
Resume an interrupted run:
    python ppo_atari.py --env-id BreakoutNoFrameskip-v4 --resume runs/<run>/checkpoint.pt
Data parallel over several processes (GPUs: one per process, NCCL; CPU: gloo), --num-envs is global:
    torchrun --standalone --nproc_per_node 2 ppo_atari.py --num-envs 8

Preprocessing (Mnih et al. 2015; settings discussed by Machado et al. 2018, arXiv:1709.06009):
no-op reset (random no-op frames), max-and-skip 4 (an action repeated 4 frames, the observation is
the pixel-wise max of the last two: sprites that flicker between frames stay visible), 84x84
grayscale, 4-frame stack, FIRE at the start of every game and after every lost life in games that
have FIRE (Breakout serves no ball until it is pressed), life loss as episode end for learning (the
game goes on), rewards clipped to their sign. The episodic return reported everywhere is the full
game's unclipped score; its length counts the game's steps, the FIRE presses included. Two
environment paths give these semantics:
- `--env-backend ale_vector` (default, fast): ale-py's `AtariVectorEnv`, C++ threads doing the
  preprocessing natively, one single-game env per env so that one of them can press FIRE alone;
- `--env-backend gymnasium` (readable): a gymnasium wrapper stack in which each detail is one
  wrapper, named as in Huang et al.
They differ in one detail of the reset only: a new game starts with 0-29 random no-op frames on the
fast path (ale-py's C++ env) and 1-30 on the readable one (NoopReset, as OpenAI baselines); then
both press FIRE for one step of 4 frames. NoFrameskip-v4 ids have no sticky actions; v5 ids
(`ALE/Breakout-v5`) keep theirs (repeat probability 0.25, Machado et al.); either way the id's own
frameskip is replaced by max-and-skip 4.

What differs from the sibling scripts:
- ppo_continuous.py: a Gaussian policy with separate MLPs and saved normalization statistics; this
  file: a categorical policy on a shared CNN, pixels kept uint8 until the network divides by 255
  (nothing to normalize, so nothing to save but the weights), many envs with short rollouts, a
  bfloat16 option for the update and torchrun data parallelism.
- ppo_llm_toy.py: the same clipped loss applied to tokens of a language model.

gymnasium 1.x, done on purpose: both paths use the SAME_STEP autoreset mode, so the step that ends
an episode (a lost life or the end of the game) returns the first observation of what comes next and
the true final observation arrives in `info["final_obs"]`. No step is ever spent on a reset (no
phantom transition with an ignored action and a zero reward), and on time-limit truncation the value
is bootstrapped from V(final_obs); on termination (including a lost life) the bootstrap value is 0.
"""

from __future__ import annotations

import importlib
import inspect
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
from typing import Literal

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT_NAME = "ppo_atari"
gym.register_envs(ale_py)  # ale-py >= 0.10 no longer registers its ids on import of gymnasium


@dataclass
class Args:
    exp_name: str = SCRIPT_NAME
    """the name of this experiment: the first part of the run name `runs/<exp_name>__<env>__<seed>__<time>`"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments; rank r of torchrun adds r)"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms: the same seed then gives the same run twice on CPU"""
    cuda: bool = True
    """use CUDA for the networks when a GPU is available (otherwise the CPU is used)"""
    torch_threads: int = 0
    """CPU threads for torch (0: the cores of this machine divided by the processes on it)"""
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
    """do not train: evaluate this checkpoint on its env (full games, unclipped score) and exit"""
    eval_episodes: int = 10
    """the number of evaluation episodes, each a full game (after training, and with --eval-checkpoint)"""
    eval_stochastic: bool = True
    """evaluate with sampled actions (a greedy argmax policy can get stuck repeating itself up to the time limit)"""

    # Atari
    env_backend: Literal["ale_vector", "gymnasium"] = "ale_vector"
    """ale_vector: ale-py's native C++ vector env (fast); gymnasium: the readable Python wrapper stack"""
    channels_last: bool = True
    """keep the CNN's weights and activations in channels-last (NHWC) layout: same math, faster on CPU"""
    bf16: bool = False
    """run the network's forward passes (rollout and update alike) and the backward pass under bfloat16 autocast (weights and Adam stay float32)"""

    # Algorithm
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of an Atari environment of ale-py (NoFrameskip-v4 or ALE/...-v5)"""
    total_timesteps: int = 10_000_000
    """total environment steps of the experiment (summed over envs and processes; 4 frames each)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the Adam optimizer"""
    num_envs: int = 8
    """the number of parallel environments, over all torchrun processes together"""
    num_steps: int = 128
    """the number of steps each env runs per rollout (a rollout has num_envs * num_steps steps)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda of Generalized Advantage Estimation"""
    num_minibatches: int = 4
    """the number of minibatches each rollout is split into"""
    update_epochs: int = 4
    """the number of passes over the rollout per update"""
    norm_adv: bool = True
    """normalize the advantages within each minibatch (over all processes' minibatches together)"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient epsilon"""
    clip_vloss: bool = True
    """clip the value loss around the old value predictions, as the policy loss is clipped"""
    ent_coef: float = 0.01
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


def require_module(module: str, purpose: str, package: str | None = None) -> None:
    """Fail early with the install command when an optional package is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: pip install {package or module}") from None


def cores_per_process() -> int:
    """This machine's CPU cores divided by the processes torchrun started on it (at least 1)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_args(args: Args) -> None:
    """Reject inconsistent settings before anything is built."""
    positive = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs")
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.torch_threads < 0:
        raise ConfigError(f"--torch-threads must be 0 or more, got {args.torch_threads}")
    if args.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be positive, got {args.learning_rate}")
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
    world_size = world_size_from_env()
    if args.num_envs % world_size != 0:
        raise ConfigError(f"--num-envs {args.num_envs} does not divide over the {world_size} torchrun processes")
    if args.batch_size % (args.num_minibatches * world_size) != 0:
        raise ConfigError(
            f"the rollout (num_envs * num_steps = {args.batch_size}) does not divide into "
            f"{args.num_minibatches} minibatches" + (f" on each of {world_size} processes" if world_size > 1 else "")
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
    if args.env_backend == "gymnasium" or args.capture_video:
        # gymnasium's ResizeObservation resizes with OpenCV; videos are recorded on that path too.
        require_module("cv2", "the gymnasium wrapper stack", "opencv-python-headless")
    if args.track:
        require_module("wandb", "--track")
    if args.capture_video:
        require_module("moviepy", "--capture-video")


# ENVIRONMENT


def check_env_id(env_id: str) -> dict:
    """Reject anything but a pixel Atari id of ale-py; return the game settings the id stands for.

    The settings are read from the registered id so that both paths play the same game: the ROM,
    the sticky-action probability (0 for NoFrameskip-v4, 0.25 for v5), the action set and the
    time limit in frames (108,000 = 30 minutes of play for both families).
    """
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ConfigError(f"unknown environment id {env_id!r}: {e}") from None
    if spec.entry_point != "ale_py.env:AtariEnv":
        hint = "; for continuous actions use ppo_continuous.py" if has_continuous_actions(env_id) else ""
        raise ConfigError(f"{env_id} is not an Atari environment of ale-py (e.g. BreakoutNoFrameskip-v4){hint}")
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(ale_py.env.AtariEnv.__init__).parameters.items()
    }
    settings = {**defaults, **spec.kwargs}
    return {
        "game": settings["game"],
        "repeat_action_probability": settings["repeat_action_probability"],
        "full_action_space": settings["full_action_space"],
        "max_num_frames_per_episode": settings["max_num_frames_per_episode"] or 108_000,
    }


def has_continuous_actions(env_id: str) -> bool:
    """Whether a (non-Atari) env has Box actions, to point its user to ppo_continuous.py."""
    try:
        env = gym.make(env_id)
    except Exception:  # missing extras (e.g. mujoco): no hint rather than a second error
        return False
    env.close()
    return isinstance(env.action_space, gym.spaces.Box)


class NoopReset(gym.Wrapper):
    """NoopResetEnv (detail 1 of the Atari details of Huang et al.): a new game starts after 1 to
    noop_max random no-op frames (this wrapper sits under the frame skip), so that the games do not
    all start from the same state (Mnih et al. 2015)."""

    def __init__(self, env: gym.Env, noop_max: int = 30):
        super().__init__(env)
        self.noop_max = noop_max

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.unwrapped.np_random.integers(1, self.noop_max + 1)):
            obs, _, terminated, truncated, info = self.env.step(0)  # action 0 is NOOP in ALE's sets
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """MaxAndSkipEnv (detail 2): each action is repeated for `skip` frames and their rewards summed;
    the observation is the pixel-wise max of the last two frames, because some sprites are drawn
    only every other frame and the max keeps them visible."""

    def __init__(self, env: gym.Env, skip: int = 4):
        super().__init__(env)
        self.skip = skip

    def step(self, action):
        frames, total_reward = [], 0.0
        for _ in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            frames.append(obs)
            total_reward += reward
            if terminated or truncated:
                break
        return np.max(frames[-2:], axis=0), total_reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """EpisodicLifeEnv (detail 3): a lost life ends the episode for learning (terminated=True,
    bootstrap value 0) but not the game (Mnih et al. 2015): the vector env then calls reset(), which
    right after a lost life returns the last observation, so play goes on from there, and otherwise
    (game over, time limit, a first or seeded reset) starts a new game."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives, self.life_lost, self.last = 0, False, None

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self.env.unwrapped.ale.lives()
        # Lives reach 0 only with the game's own termination, which is no lost life but game over.
        self.life_lost = 0 < lives < self.lives and not (terminated or truncated)
        self.lives, self.last = lives, (obs, {"lives": lives})
        return obs, reward, terminated or self.life_lost, truncated, info

    def reset(self, **kwargs):
        if self.life_lost:
            self.life_lost = False
            return self.last
        obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """FireResetEnv (detail 4): press FIRE after every reset. This wrapper sits outside
    EpisodicLife, as in the reference, so a reset means the start of a game or a lost life, and FIRE
    is pressed after both: Breakout serves no ball until it is, and an agent that has not learned
    that yet would idle until the time limit. The press is part of the reset, never a step the
    agent is trained on; its reward (0 in practice) counts in the game's score only. (The reference
    also takes a no-op step and an action-2 step around it: 8 more frames, left out here.)"""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.fire = env.unwrapped.get_action_meanings().index("FIRE")

    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(self.fire)
        if terminated or truncated:  # the press itself ended the episode: go on from what follows
            obs, info = self.env.reset()
        return obs, info


class ClipReward(gym.RewardWrapper):
    """ClipRewardEnv (detail 6): the learner gets the sign of each reward, -1, 0 or +1, so that one
    set of hyperparameters fits games whose scores differ by orders of magnitude (Mnih et al. 2015)."""

    def reward(self, reward):
        return float(np.sign(reward))


def make_atari_env(env_id: str, video_dir: Path | None = None) -> gym.Env:
    """The readable path: one game, each Atari detail one wrapper, innermost first."""
    # frameskip=1: frames are skipped (and max-pooled) by MaxAndSkip, not by the ALE. Grayscale
    # screens come from the emulator's palette, as in ale-py's C++ path; gymnasium's
    # GrayscaleObservation weighs RGB differently, and the two paths would no longer see the same pixels.
    env = gym.make(env_id, frameskip=1, obs_type="grayscale", render_mode="rgb_array" if video_dir else None)
    if video_dir is not None:  # innermost: every frame, one video per game
        env = gym.wrappers.RecordVideo(env, str(video_dir), episode_trigger=lambda _: True)
    env = NoopReset(env, noop_max=30)
    env = MaxAndSkip(env, skip=4)
    # WarpFrame (detail 5): 84x84 gray (gray from the emulator above), INTER_AREA as in ale-py's C++.
    env = gym.wrappers.ResizeObservation(env, (84, 84))
    # FrameStack (detail 7): (4, 84, 84), oldest frame first, zeros before the first frame, as in
    # ale-py's vector env. Inside EpisodicLife (the reference has it outermost), so that a lost life
    # does not empty the stack: the game goes on, and so does its picture.
    env = gym.wrappers.FrameStackObservation(env, 4, padding_type="zero")
    # Inside EpisodicLife, so it sees whole games: the full-game, unclipped score and its length.
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env = EpisodicLife(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env)
    return ClipReward(env)


class AleVectorEnv(gym.vector.VectorEnv):
    """The fast path: ale-py's C++ emulators and preprocessing, with the readable path's semantics.

    Each env is a single-game `AtariVectorEnv` of ale-py (one C++ thread each): all are sent their
    actions and then all are received, so the games run in parallel, and a single game can be
    stepped alone, which pressing FIRE after a lost life needs (ale-py's own options cannot: its
    `episodic_life` restarts the whole game on a lost life, its `use_fire_reset` presses FIRE at the
    start of a game only). The C++ side does no-op reset, max-and-skip 4, 84x84 gray and the stack
    of 4, and reports a lost life as terminated=True with the game going on (`life_loss_info`,
    detail 3). This class adds what the readable path's outer wrappers add:
    - FIRE (detail 4) in each env whose episode ended (lost life or new game), before the agent
      sees its next observation: the press is part of the reset, never a step of the rollout;
    - each finished game's full, unclipped score and length in info["final_info"]["episode"], as
      RecordEpisodeStatistics reports them, and the true last observation in info["final_obs"];
    - sign-clipped rewards (detail 6).
    """

    def __init__(self, settings: dict, num_envs: int):
        from ale_py.vector_env import AtariVectorEnv

        self.games = [
            AtariVectorEnv(
                settings["game"], 1, num_threads=1, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
                repeat_action_probability=settings["repeat_action_probability"],
                full_action_space=settings["full_action_space"],
                max_num_frames_per_episode=settings["max_num_frames_per_episode"],
                img_height=84, img_width=84, grayscale=True, stack_num=4, frameskip=4, maxpool=True,
                noop_max=30, use_fire_reset=False, reward_clipping=False, episodic_life=False,
                life_loss_info=True,
            )
            for _ in range(num_envs)
        ]  # fmt: skip
        self.num_envs = num_envs
        self.single_observation_space = self.games[0].single_observation_space
        self.single_action_space = self.games[0].single_action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        action_set = self.games[0].ale.get_action_set()
        self.fire = action_set.index(ale_py.Action.FIRE) if ale_py.Action.FIRE in action_set else None
        self.paddle_strength = np.ones(1, np.float32)  # full strength: the discrete action set
        self.scores = np.zeros(num_envs, np.float64)  # raw score of the game so far
        self.lengths = np.zeros(num_envs, np.int64)  # steps of the game so far
        self.frames = np.zeros((num_envs, 2), np.int64)  # the emulator's frame counters after the last step

    def reset(self, *, seed: int | None = None, options=None):
        results = [game.reset(seed=None if seed is None else seed + i) for i, game in enumerate(self.games)]
        obs, info = np.concatenate([r[0] for r in results]), self.merge_info([r[1] for r in results])
        self.scores[:], self.lengths[:] = 0, 0
        self.frames[:] = np.stack([info["frame_number"], info["episode_frame_number"]], 1)
        return self.press_fire(obs, info, np.ones(self.num_envs, bool))

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info, game_over = self.step_games(actions, np.arange(self.num_envs))
        ended = terminated | truncated
        if ended.any():
            # The true last observation: where the game is over, the one before ale-py's reset;
            # after a lost life the game goes on, and it is obs itself (before the FIRE below).
            info["final_obs"] = np.where(game_over[:, None, None, None], info["final_obs"], obs)
        if game_over.any():
            episode = {"r": self.scores.copy(), "l": self.lengths.copy()}
            info["final_info"] = {"episode": episode, "_episode": game_over}
            self.scores[game_over], self.lengths[game_over] = 0, 0
        obs, info = self.press_fire(obs, info, ended)
        return obs, np.sign(reward).astype(np.float32), terminated, truncated, info

    def press_fire(self, obs: np.ndarray, info: dict, which: np.ndarray):
        """FIRE for one step in the envs `which` (in games that have FIRE); obs and info are updated
        in place to what the envs show after it, and returned."""
        if self.fire is None or not which.any():
            return obs, info
        actions = np.full(self.num_envs, self.fire)
        indices = np.flatnonzero(which)
        fire_obs, _, _, _, fire_info, game_over = self.step_games(actions, indices)
        self.scores[indices[game_over]], self.lengths[indices[game_over]] = 0, 0  # the press ended the game
        obs[which] = fire_obs
        for key in ("lives", "frame_number", "episode_frame_number"):
            info[key][which] = fire_info[key]
        return obs, info

    def step_games(self, actions: np.ndarray, indices: np.ndarray):
        """Step the games `indices` with their actions, all in parallel; count score and length.

        Returns their (obs, reward, terminated, truncated, info) and `game_over`: where the game
        ended, whatever its lives. The emulator counts frames twice, in all and in this game; where
        the two did not advance alike, ale-py reset the game at this step.
        """
        for i in indices:
            self.games[i].ale.send(actions[i : i + 1], self.paddle_strength)  # what AtariVectorEnv.send does
        results = [self.games[i].recv() for i in indices]
        obs = np.concatenate([r[0] for r in results])
        reward, terminated, truncated = (np.concatenate([r[k] for r in results]) for k in (1, 2, 3))
        info = self.merge_info([r[4] for r in results])
        if (terminated | truncated).any():
            info["final_obs"] = np.concatenate([r[4].get("final_obs", r[0]) for r in results])
        frames = np.stack([info["frame_number"], info["episode_frame_number"]], 1)
        advanced = frames - self.frames[indices]
        game_over = advanced[:, 0] != advanced[:, 1]
        self.frames[indices] = frames
        self.scores[indices] += reward
        self.lengths[indices] += 1
        return obs, reward, terminated, truncated, info, game_over

    @staticmethod
    def merge_info(infos: list[dict]) -> dict:
        keys = ("lives", "frame_number", "episode_frame_number")
        return {key: np.concatenate([info[key] for info in infos]) for key in keys}

    def close(self, **kwargs):
        for game in self.games:
            game.close()


def make_vector_env(env_id: str, num_envs: int, backend: str, video_dir: Path | None = None) -> gym.vector.VectorEnv:
    """num_envs copies of the game with the Atari preprocessing, by either path.

    Both give uint8 observations (num_envs, 4, 84, 84), sign-clipped rewards, terminated=True on a
    lost life, FIRE pressed after every episode end as part of the reset, finished games in
    info["final_info"]["episode"], and SAME_STEP autoreset: when an
    episode ends, step() already returns the next observation and the true last observation is in
    info["final_obs"], so every step of the rollout is a real transition.
    """
    settings = check_env_id(env_id)
    if backend == "gymnasium" or video_dir is not None:  # only this path can render frames
        return gym.vector.SyncVectorEnv(
            [lambda: make_atari_env(env_id, video_dir) for _ in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
    return AleVectorEnv(settings, num_envs)


def finished_games(info: dict) -> list[tuple[float, int]]:
    """(full-game unclipped score, length in steps) of each game that ended at this step."""
    final_info = info.get("final_info", {})
    if "_episode" not in final_info:
        return []
    episode = final_info["episode"]
    return [(float(episode["r"][i]), int(episode["l"][i])) for i in np.flatnonzero(final_info["_episode"])]


# NETWORK


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (implementation detail 2 of Huang et al.)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The Nature CNN (Mnih et al. 2015) shared by a categorical actor head and a value head.

    Gains: sqrt(2) for the hidden layers, 0.01 for the policy head (near-uniform initial policy),
    1.0 for the value head. Pixels arrive as uint8 and are scaled to [0, 1] here, so the rollout
    buffer holds 1 byte per pixel instead of 4.
    """

    def __init__(self, num_actions: int, channels_last: bool = True, bf16: bool = False):
        super().__init__()
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)),  # (B, 4, 84, 84) -> (B, 32, 20, 20)
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),  # -> (B, 64, 9, 9)
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),  # -> (B, 64, 7, 7)
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)),
            nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        # NHWC weights and inputs: oneDNN's (and cuDNN's) convolutions then run without layout
        # conversions. The numbers are the same up to float rounding order.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        # --bf16: every forward pass runs under bfloat16 autocast, here in one place, so the rollout's
        # log-probs and values and the update's are computed alike and the ratio is exactly 1
        # before the first gradient step. Weights, gradients and Adam stay float32.
        self.bf16 = bf16

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (B, 4, 84, 84) uint8 -> (B, 512)"""
        x = obs.to(dtype=torch.float32, memory_format=self.memory_format)
        return self.network(x * (1.0 / 255.0))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs: (B, 4, 84, 84) uint8 -> action logits (B, num_actions), V(obs) (B,), both float32"""
        with torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.features(obs)
            logits, value = self.actor(hidden), self.critic(hidden).squeeze(-1)
        return logits.float(), value.float()

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (B, 4, 84, 84) uint8 -> V(obs): (B,)"""
        return self(obs)[1]

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None):
        """obs: (B, 4, 84, 84) uint8; action: (B,) int64 or None to sample one.

        Returns action (B,), log pi(action|obs) (B,), entropy (B,), V(obs) (B,), all float32 even
        under bfloat16 autocast: the log-softmax and the losses need the precision.
        """
        logits, value = self(obs)
        log_probs = logits.log_softmax(-1)  # (B, num_actions)
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        # Categorical log-prob and entropy written out from one log-softmax: the numbers of
        # torch.distributions.Categorical, each step readable here.
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, logprob, entropy, value


# ALGORITHM


@dataclass
class Rollout:
    """One fixed-length rollout: T = num_steps rows of N = num_envs transitions each."""

    obs: torch.Tensor  # (T, N, 4, 84, 84) uint8 observation s_t, on the agent's device
    actions: torch.Tensor  # (T, N) int64 action a_t
    logprobs: torch.Tensor  # (T, N) log pi_old(a_t | s_t)
    values: torch.Tensor  # (T, N) V(s_t)
    rewards: torch.Tensor  # (T, N) sign-clipped reward r_t
    next_values: torch.Tensor  # (T, N) V(s_{t+1}); V(final_obs) where truncated at t, 0 where terminated
    terminations: torch.Tensor  # (T, N) 1.0 where s_{t+1} is terminal (lost life or game over)
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


def global_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of x; under torchrun of the union of every process's x, so all
    processes normalize with the same statistics, as one process with the whole batch would."""
    if not dist.is_initialized():
        return x.mean(), x.std()
    moments = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)])
    dist.all_reduce(moments)
    total, total_sq, count = moments
    mean = total / count
    return mean, ((total_sq - count * mean * mean) / (count - 1)).clamp(min=0).sqrt()


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
        mean, std = global_mean_std(advantages)
        advantages = (advantages - mean) / (std + 1e-8)

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
    """Wall-clock seconds spent stepping the environment, in policy inference (with the rollout's
    bookkeeping) and in the update."""

    def __init__(self):
        self.env = self.inference = self.update = 0.0


def collect_rollout(
    envs: gym.vector.VectorEnv,
    agent: Agent,
    next_obs: torch.Tensor,
    num_steps: int,
    timers: Timers,
    episode_stats: list,
) -> tuple[Rollout, torch.Tensor]:
    """Run the policy for num_steps steps in every env: act, step the envs, store.

    next_obs: (N, 4, 84, 84) uint8 observation to start from, on the agent's device. Returns the
    rollout (on the agent's device) and the observation the next rollout starts from. Appends
    (full-game score, length) of every finished game to episode_stats. Observations go to the device
    once, as uint8, and are stored there; rewards and done flags stay in numpy until the rollout ends
    and cross once; what the policy produces stays on the device.
    """
    device = next(agent.parameters()).device
    num_envs = next_obs.shape[0]
    obs = torch.zeros((num_steps, *next_obs.shape), dtype=torch.uint8, device=device)
    rewards, terminations, episode_ends = (np.zeros((num_steps, num_envs), np.float32) for _ in range(3))
    actions = torch.zeros((num_steps, num_envs), dtype=torch.int64, device=device)
    logprobs, values, next_values = (torch.zeros((num_steps, num_envs), device=device) for _ in range(3))
    for step in range(num_steps):
        t0 = time.perf_counter()
        obs[step] = next_obs
        with torch.inference_mode():
            action, logprob, _, value = agent.get_action_and_value(next_obs)
        actions[step], logprobs[step], values[step] = action, logprob, value
        cpu_action = action.cpu().numpy()
        t1 = time.perf_counter()
        raw_obs, reward, terminated, truncated, info = envs.step(cpu_action)
        t2 = time.perf_counter()
        ended = terminated | truncated  # terminated includes a lost life
        rewards[step], terminations[step], episode_ends[step] = reward, terminated, ended
        next_obs = torch.as_tensor(raw_obs, device=device)
        if truncated.any():
            # SAME_STEP autoreset: raw_obs already belongs to what comes next (a new game, or the
            # same game after a lost life); the observation the episode really ended on is
            # info["final_obs"]. Its value is the bootstrap on truncation only (compute_gae
            # multiplies it by 0 on termination, so a terminated env needs none). The check is on
            # numpy flags and the indices go to the device as data: no device sync.
            final_obs = torch.as_tensor(np.stack(info["final_obs"][truncated]), device=device)
            with torch.inference_mode():
                final_values = agent.get_value(final_obs)
            next_values[step, torch.as_tensor(np.flatnonzero(truncated), device=device)] = final_values
        if ended.any():
            episode_stats.extend(finished_games(info))
        timers.env += t2 - t1
        timers.inference += (t1 - t0) + (time.perf_counter() - t2)

    to_device = lambda array: torch.as_tensor(array, device=device)  # noqa: E731
    episode_ends_t = to_device(episode_ends)
    # next_values[t] = V(s_{t+1}) = values[t + 1] inside an episode; V(s_T) after the last step.
    with torch.inference_mode():
        last_value = agent.get_value(next_obs)
    shifted = torch.cat([values[1:], last_value.unsqueeze(0)])
    next_values = torch.where(episode_ends_t == 0, shifted, next_values)
    rollout = Rollout(
        obs, actions, logprobs, values, to_device(rewards), next_values,
        to_device(terminations), episode_ends_t,
    )  # fmt: skip
    return rollout, next_obs


def average_gradients(params: list[nn.Parameter]) -> None:
    """Under torchrun: replace every process's gradients by their mean over all processes, in one
    all-reduce of a flat buffer, so every process then takes the very same optimizer step."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view(g.shape))
        offset += g.numel()


def update_policy(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    args: Args,
) -> dict[str, float]:
    """update_epochs passes over the flattened rollout in shuffled minibatches; returns mean stats.

    Under torchrun each process works on its own rollout with minibatches of
    minibatch_size / world_size samples; gradients, advantage statistics, the KL early-stop
    decision and the returned statistics are all shared, so the processes stay identical.
    """
    b_obs = rollout.obs.reshape(-1, *rollout.obs.shape[2:])  # (B, 4, 84, 84) uint8, B = T * N
    b_actions = rollout.actions.reshape(-1)
    b_logprobs, b_values = rollout.logprobs.reshape(-1), rollout.values.reshape(-1)
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)
    distributed = dist.is_initialized()
    local_batch = b_obs.shape[0]
    local_minibatch = local_batch // args.num_minibatches

    params = list(agent.parameters())
    totals: dict[str, torch.Tensor] = {}
    num_minibatch_updates = 0
    for _epoch in range(args.update_epochs):
        # A fresh permutation each epoch: every sample is used exactly once per epoch.
        permutation = torch.randperm(local_batch, device=b_obs.device)
        for start in range(0, local_batch, local_minibatch):
            mb = permutation[start : start + local_minibatch]
            # Under --bf16 the agent's autocast covers the network only; ppo_loss gets float32 inputs.
            _, new_logprobs, entropy, new_values = agent.get_action_and_value(b_obs[mb], b_actions[mb])
            loss, stats = ppo_loss(
                new_logprobs, b_logprobs[mb], entropy, new_values, b_values[mb],
                b_advantages[mb], b_returns[mb], args,
            )  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            if distributed:
                average_gradients(params)
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # one global norm over all weights
            optimizer.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            num_minibatch_updates += 1
        # Early stop on the KL of the last minibatch of the epoch (implementation detail 12),
        # averaged over processes so that all of them stop at the same epoch.
        last_kl = stats["approx_kl"].clone()
        if distributed:
            dist.all_reduce(last_kl)
            last_kl /= dist.get_world_size()
        if args.target_kl is not None and last_kl.item() > args.target_kl:
            break
    # Averages over all minibatches (and processes); the KL also as seen on the last one.
    names = list(totals)
    means = torch.stack([totals[key] for key in names]) / num_minibatch_updates
    if distributed:
        dist.all_reduce(means)
        means /= dist.get_world_size()
    result = dict(zip(names, means.tolist(), strict=True))
    result["last_approx_kl"] = last_kl.item()
    result["epochs"] = _epoch + 1
    return result


def save_checkpoint(path: Path, agent, optimizer, args, global_step, iteration):
    """Weights, optimizer, args and progress in one file (pixels need no normalization statistics:
    the network's fixed 1/255 is all there is).

    Written to a temporary file and renamed, so an interrupted save never destroys the last one.
    """
    checkpoint = {
        "script": SCRIPT_NAME,
        "env_id": args.env_id,
        "args": asdict(args),
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
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
    env_id: str,
    backend: str,
    episodes: int,
    seed: int,
    stochastic: bool = True,
    video_dir: Path | None = None,
) -> list[float]:
    """Full-game, unclipped scores of `episodes` games, played one after the other in one env.

    The agent plays with the same preprocessing as in training (a lost life continues the game); it
    samples its actions unless stochastic is False (then argmax). Env and sampling are seeded with
    seed, so the same model and seed always score the same on CPU.
    """
    envs = make_vector_env(env_id, 1, backend, video_dir)
    device = next(agent.parameters()).device
    torch.manual_seed(seed)
    raw_obs, _ = envs.reset(seed=seed)
    scores: list[float] = []
    while len(scores) < episodes:
        with torch.inference_mode():
            obs = torch.as_tensor(raw_obs, device=device)
            action = agent.get_action_and_value(obs)[0] if stochastic else agent(obs)[0].argmax(-1)
        raw_obs, _, _, _, info = envs.step(action.cpu().numpy())
        scores.extend(score for score, _ in finished_games(info))
    envs.close()
    return scores[:episodes]


def load_agent(checkpoint: dict, num_actions: int, device: torch.device) -> Agent:
    """Rebuild the agent from a loaded checkpoint."""
    saved_args = checkpoint["args"]
    agent = Agent(num_actions, saved_args.get("channels_last", True), saved_args.get("bf16", False)).to(device)
    agent.load_state_dict(checkpoint["model"])
    return agent


def evaluate_checkpoint(args: Args) -> dict:
    """--eval-checkpoint: evaluate a saved model on the env it was trained on; print mean and std."""
    checkpoint = load_checkpoint(args.eval_checkpoint)
    env_id = checkpoint["env_id"]
    check_env_id(env_id)
    backend = checkpoint["args"]["env_backend"]
    if backend == "gymnasium" or args.capture_video:
        require_module("cv2", "the gymnasium wrapper stack", "opencv-python-headless")
    probe = make_vector_env(env_id, 1, backend)
    num_actions = int(probe.single_action_space.n)
    probe.close()
    device = select_device(args)
    agent = load_agent(checkpoint, num_actions, device)
    video_dir = Path(args.eval_checkpoint).parent / "videos" if args.capture_video else None
    returns = evaluate(agent, env_id, backend, args.eval_episodes, args.seed, args.eval_stochastic, video_dir)
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
    """The device for the networks, chosen once per process; also sets torch's CPU thread count.

    Under torchrun, process LOCAL_RANK of a machine takes GPU LOCAL_RANK, and by default the CPU
    cores are shared out among the processes of the machine.
    """
    torch.set_num_threads(args.torch_threads or cores_per_process())
    if args.cuda and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_distributed(device: torch.device) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL between GPUs, gloo on CPU.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, on one machine or many.
    Returns this process's rank (0 without torchrun).
    """
    if world_size_from_env() == 1:
        return 0
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


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
    """Train PPO and return the summary that is also written to <run>/summary.json.

    Under torchrun every process runs this same loop on its share of the envs; only rank 0 logs,
    prints, saves and evaluates (the finished games of all processes are gathered for its logs and
    returns), and the returned summary of the other ranks has no run folder.
    """
    validate_args(args)
    checkpoint = load_checkpoint(args.resume, args.env_id) if args.resume else None
    device = select_device(args)
    rank, world_size = start_distributed(device), world_size_from_env()
    is_main = rank == 0
    seed_everything(args.seed + rank, args.torch_deterministic)  # each process samples its own actions
    local_num_envs = args.num_envs // world_size
    envs = make_vector_env(args.env_id, local_num_envs, args.env_backend)
    run_dir, writer = start_run(args) if is_main else (None, None)
    checkpoint_path = run_dir / "checkpoint.pt" if is_main else None

    agent = Agent(int(envs.single_action_space.n), args.channels_last, args.bf16).to(device)
    if world_size > 1:  # identical initial weights everywhere: rank 0's
        for tensor in agent.state_dict().values():
            dist.broadcast(tensor, src=0)
    # Adam with eps 1e-5 (PPO2's value, not torch's 1e-8); the fused kernel is the same math, faster.
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    global_step, start_iteration = 0, 1
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        if is_main:
            print(f"resuming {checkpoint_path} at step {global_step:,} (iteration {start_iteration})")

    def save(progress: dict) -> None:
        if is_main:
            save_checkpoint(checkpoint_path, agent, optimizer, args, progress["global_step"],
                            progress["iteration"])  # fmt: skip

    # Env i of rank r starts from seed + r * local_num_envs + i (+ an offset when resuming).
    env_seed = args.seed + rank * local_num_envs + (start_iteration - 1) * args.num_envs
    next_obs = torch.as_tensor(envs.reset(seed=env_seed)[0], device=device)
    num_episodes = 0  # finished games, over all processes
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
            new_episodes: list[tuple[float, int]] = []  # (score, length) of each game finished
            rollout, next_obs = collect_rollout(envs, agent, next_obs, args.num_steps, timers, new_episodes)
            global_step += args.batch_size  # over all processes

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
            if world_size > 1:  # every process's games, so the logged returns stand for all envs
                gathered = [None] * world_size
                dist.all_gather_object(gathered, new_episodes)
                new_episodes = [game for games in gathered for game in games]
            num_episodes += len(new_episodes)
            recent_returns.extend(episode_return for episode_return, _ in new_episodes)
            sps = (global_step - start_step) / (time.time() - start_time)
            learning_rate = optimizer.param_groups[0]["lr"]
            if is_main:
                log_iteration(
                    writer, global_step, stats, rollout, returns, learning_rate, sps, timers,
                    new_episodes,
                )  # fmt: skip
            if is_main and (time.time() - last_print >= 10 or iteration in (start_iteration, args.num_iterations)):
                last_print = time.time()
                print(progress_line(global_step, total_steps, sps, recent_returns, timers), flush=True)
            if args.save_interval and iteration % args.save_interval == 0:
                save(done)
    except KeyboardInterrupt:
        status = "interrupted"
        if is_main:
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
        "env_backend": args.env_backend,
        "world_size": world_size,
        "seed": args.seed,
        "status": status,
        "global_step": done["global_step"],
        "iterations": done["iteration"],
        "wall_time_s": wall_time,
        "sps": (done["global_step"] - start_step) / max(wall_time, 1e-9),
        "episodes": num_episodes,
        "mean_return": float(np.mean(recent_returns)) if recent_returns else None,
        "time_env_s": timers.env,
        "time_inference_s": timers.inference,
        "time_update_s": timers.update,
        "run_dir": str(run_dir) if is_main else None,
        "checkpoint": str(checkpoint_path) if is_main and checkpoint_path.exists() else None,
    }
    if world_size > 1:
        dist.destroy_process_group()
    if not is_main:
        if diverged is not None:
            raise diverged
        return summary
    if status == "completed":
        # EVALUATE the final model exactly as a reloaded checkpoint is evaluated.
        previous_sigterm = handle_sigterm_as_interrupt()
        try:
            summary.update(evaluate_final_model(agent, args, run_dir))
        except KeyboardInterrupt:  # the checkpoint is saved: keep the logs, skip the evaluation
            status = summary["status"] = "interrupted"
            print(f"interrupted in the final evaluation; {checkpoint_path} is saved", flush=True)
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
    if status == "completed":
        writer.add_scalar("eval/episodic_return_mean", summary["eval_return_mean"], global_step)
        recent = f"{summary['mean_return']:.1f}" if recent_returns else "n/a"
        print(
            f"done: {global_step:,} steps in {format_duration(wall_time)} ({summary['sps']:.0f} SPS); "
            f"training return {recent} (last {len(recent_returns)} episodes) | "
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


def evaluate_final_model(agent: Agent, args: Args, run_dir: Path) -> dict:
    video_dir = run_dir / "videos" if args.capture_video else None
    returns = evaluate(
        agent, args.env_id, args.env_backend, args.eval_episodes, args.seed, args.eval_stochastic,
        video_dir,
    )  # fmt: skip
    return {"eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns))}


def handle_sigterm_as_interrupt():
    """SIGTERM (e.g. from a cluster scheduler or torchrun) is handled like Ctrl-C: save, flush, exit.

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
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process finds it: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
