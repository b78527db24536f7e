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
Estimation (Schulman et al. 2015, arXiv:1506.02438) for the Atari 2600 games of ale-py, with the Nature CNN
of DQN (Mnih et al. 2015, Nature 518) shared by actor and critic. Defaults: the usual Atari settings (8 envs,
128-step rollouts, 4 epochs of 4 minibatches, clip 0.1); each Atari detail of "The 37 Implementation Details
of PPO" (Huang et al., ICLR blog track 2022) is named in a comment, with its number in the blog's lists ("core
detail 4", "Atari detail 1", "situational detail 3"). Read Args, ENVIRONMENT, NETWORK, ALGORITHM and train(): that
is all of PPO. Below the PLUMBING banner: run folder, logs, checkpoints, evaluation, checks,
torchrun.

    python ppo_atari.py --env-id BreakoutNoFrameskip-v4 --total-timesteps 10000000   # train; --help for all flags
    python ppo_atari.py --eval-checkpoint runs/<run>/checkpoint.pt      # evaluate a saved model (full games)
    python ppo_atari.py --resume runs/<run>/checkpoint.pt               # continue a stopped run
    torchrun --standalone --nproc_per_node 2 ppo_atari.py               # data parallel (--num-envs is global)
    tensorboard --logdir runs

Siblings: ppo_continuous.py (a Gaussian policy, separate MLPs, normalization statistics saved with the model)
and ppo_llm_toy.py (the same clipped loss on the tokens of a language model). Here: a categorical policy on a
shared CNN, pixels kept uint8 until the network divides by 255, many envs with short rollouts, bfloat16 autocast
(by default on CPUs with native bfloat16; --bf16 / --no-bf16), torchrun.

Two env paths, one semantics: `--env-backend ale_vector` (default, fast: ale-py's C++ preprocessing) and
`--env-backend gymnasium` (readable: each Atari detail a short named wrapper). On both, a game starts after 0-29
random no-op frames (the range ale-py's C++ draws from); then, in games that have FIRE, FIRE is pressed for one
step, as after every lost life. The frame stack is oldest first on both. A lost life ends the learning episode
(bootstrap value 0) but not the game; the return reported everywhere is the full game's unclipped score.
NoFrameskip-v4 ids have no sticky actions; v5 ids keep theirs (repeat probability 0.25, Machado et al. 2018,
arXiv:1709.06009); either way max-and-skip 4 replaces their frameskip.

gymnasium 1.x, on purpose: the vector env autoresets in SAME_STEP mode, so the step that ends an episode
already returns the next episode's first observation and the true final one arrives in
`info["final_obs"]`. No step is spent on a reset (no phantom transition with an ignored action and a
zero reward); on time-limit truncation the bootstrap value is V(final_obs), on termination 0.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
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
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

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
    # Each field's docstring is its --help text and stays one line (tyro keeps a docstring's line breaks); more
    # detail goes into a comment above the field.
    # Algorithm
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of an Atari environment of ale-py (NoFrameskip-v4 or ALE/...-v5)"""
    env_backend: Literal["ale_vector", "gymnasium"] = "ale_vector"
    """ale_vector: ale-py's native C++ vector env (fast); gymnasium: the readable Python wrapper stack"""
    total_timesteps: int = 10_000_000
    """total environment steps of the experiment (summed over envs and processes; 4 frames each)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the Adam optimizer"""
    num_envs: int = 8
    """the number of parallel environments, over all torchrun processes together"""
    num_steps: int = 128
    """the number of steps each env runs per rollout (a rollout has num_envs * num_steps steps)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly: iteration i of N uses lr * (1 - (i - 1) / N), the last one lr / N"""
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

    # The run: seeding, device, logging, checkpoints, evaluation
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments; rank r of torchrun adds r)"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms: the same seed then gives the same run twice on CPU"""
    cuda: bool = True
    """use CUDA for the networks when a GPU is available (otherwise the CPU is used)"""
    torch_threads: int = 0
    """CPU threads for torch (0: the cores of this machine divided by the processes on it)"""
    channels_last: bool = True
    """keep the CNN's weights and activations in channels-last (NHWC) layout: same math, faster on CPU"""
    # --bf16 covers the rollout's and the update's forward passes and the backward pass. Its default: on where the
    # machine has no GPU and its CPU has native bfloat16 (AVX512-BF16 or AMX, detected), off elsewhere, also with
    # --no-cuda on a machine with a GPU (add --bf16 there); slow where the CPU emulates bfloat16; on GPUs not
    # measured yet.
    bf16: bool = field(default_factory=lambda: cpu_has_native_bf16())
    """bfloat16 autocast of forward and backward passes (weights, Adam: float32); default on: no GPU, bf16-native CPU"""
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
    resume: str | None = None  # the environments start new games
    """continue this checkpoint's run with its saved settings (only logging, saving, eval, device flags may differ)"""
    eval_checkpoint: str | None = None
    """do not train: evaluate this checkpoint on its env (full games, unclipped score) and exit"""
    eval_episodes: int = 10
    """the number of evaluation episodes, each a full game (after training, and with --eval-checkpoint)"""
    eval_stochastic: bool = True
    """evaluate with sampled actions (a greedy argmax policy can get stuck repeating itself up to the time limit)"""
    # --capture-video plays the games on the readable env path, the only one that renders frames, with the fast
    # path's preprocessing and no-op range.
    capture_video: bool = False
    """record MP4 videos of the evaluation games into `<run>/videos` (needs moviepy; played on the readable env path)"""

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


def make_vector_env(env_id: str, num_envs: int, backend: str, video_dir: Path | None = None) -> gym.vector.VectorEnv:
    """num_envs copies of the game with the Atari preprocessing, by either path (vectorized envs: core detail 1
    of Huang et al.).

    Both give uint8 observations (num_envs, 4, 84, 84), sign-clipped rewards, terminated=True on a lost life,
    FIRE pressed after every episode end as part of the reset, finished games in info["final_info"]["episode"],
    and SAME_STEP autoreset: when an episode ends, step() already returns the next observation and the true
    last observation is in info["final_obs"], so every step of the rollout is a real transition.
    """
    if backend == "gymnasium" or video_dir is not None:  # only this path can render frames
        envs = [lambda: make_atari_env(env_id, video_dir) for _ in range(num_envs)]
        return gym.vector.SyncVectorEnv(envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return AleVectorEnv(game_settings(env_id), num_envs)


def game_settings(env_id: str) -> dict:
    """The game an ale-py id stands for, read from its registration so that both paths play the same game:
    the ROM, the sticky-action probability (0 for NoFrameskip-v4, 0.25 for v5), the action set and the time
    limit in frames (108,000 = 30 minutes of play for both families)."""
    signature = inspect.signature(ale_py.env.AtariEnv.__init__)
    settings = {**{name: p.default for name, p in signature.parameters.items()}, **gym.spec(env_id).kwargs}
    return {
        "game": settings["game"], "repeat_action_probability": settings["repeat_action_probability"],
        "full_action_space": settings["full_action_space"],
        "max_num_frames_per_episode": settings["max_num_frames_per_episode"] or 108_000,
    }  # fmt: skip


class NoopReset(gym.Wrapper):
    """NoopResetEnv (Atari detail 1 of Huang et al.): a new game starts after 0 to noop_max - 1 random
    no-op frames (this wrapper sits under the frame skip), so that the games do not all start from the
    same state (Mnih et al. 2015). The range is the fast path's (ale-py's C++ draws 0 to noop_max - 1),
    so both paths play the same distribution of starts; the reference's NoopResetEnv draws 1 to noop_max."""

    def __init__(self, env: gym.Env, noop_max: int = 30):
        super().__init__(env)
        self.noop_max = noop_max

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.unwrapped.np_random.integers(0, self.noop_max)):  # 0 to noop_max - 1, as ale-py's C++
            obs, _, terminated, truncated, info = self.env.step(0)  # action 0 is NOOP in ALE's sets
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """MaxAndSkipEnv (Atari detail 2): each action is repeated for `skip` frames and their rewards summed;
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
    """EpisodicLifeEnv (Atari detail 3): a lost life ends the episode for learning (terminated=True,
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
    """FireResetEnv (Atari detail 4): press FIRE after every reset. This wrapper sits outside
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
    """ClipRewardEnv (Atari detail 6): the learner gets the sign of each reward, -1, 0 or +1, so that one
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
    # WarpFrame (Atari detail 5): 84x84 gray (gray from the emulator above), INTER_AREA as in ale-py's C++.
    env = gym.wrappers.ResizeObservation(env, (84, 84))
    # FrameStack (Atari detail 7): (4, 84, 84), oldest frame first: obs[0] is 3 steps old, obs[3] the newest;
    # zeros before the first frame, as in ale-py's vector env (tested on both paths). Inside EpisodicLife (the
    # reference has it outermost), so that a lost life does not empty the stack: the game goes on, and so does
    # its picture.
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
    of 4 (oldest frame first, as on the readable path: obs[:, 0] is 3 steps old, obs[:, 3] the newest), and
    reports a lost life as terminated=True with the game going on (`life_loss_info`, Atari detail 3). This class
    adds what the readable path's outer wrappers add:
    - FIRE (Atari detail 4) in each env whose episode ended (lost life or new game), before the agent
      sees its next observation: the press is part of the reset, never a step of the rollout;
    - each finished game's full, unclipped score and length in info["final_info"]["episode"], as
      RecordEpisodeStatistics reports them, and the true last observation in info["final_obs"];
    - sign-clipped rewards (Atari detail 6).
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


def finished_games(info: dict) -> list[tuple[float, int]]:
    """(full-game unclipped score, length in steps) of each game that ended at this step."""
    final_info = info.get("final_info", {})
    if "_episode" not in final_info:
        return []
    episode = final_info["episode"]
    return [(float(episode["r"][i]), int(episode["l"][i])) for i in np.flatnonzero(final_info["_episode"])]


# NETWORK


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (core detail 2 of Huang et al.)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The Nature CNN (Mnih et al. 2015) shared by a categorical actor head and a value head (Atari detail 8).

    Gains: sqrt(2) for the hidden layers, 0.01 for the policy head (near-uniform initial policy),
    1.0 for the value head. Pixels arrive as uint8 and are scaled to [0, 1] here (Atari detail 9), so the
    rollout buffer holds 1 byte per pixel instead of 4. The 4 channels are the frame stack, oldest first.
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
        """obs: (B, 4, 84, 84) uint8 -> (B, 512); called inside forward()'s autocast."""
        # The layout is changed on the 1-byte pixels, then they are converted straight to the dtype the first
        # convolution reads (0..255 are exact in bfloat16, and x / 255 rounds to what autocast's cast of the
        # float32 pixels / 255 gives): the same numbers as float32 first, in under half the time.
        x = obs.contiguous(memory_format=self.memory_format).to(torch.bfloat16 if self.bf16 else torch.float32)
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


def collect_rollout(envs, agent: Agent, next_obs: torch.Tensor, num_steps: int):
    """Run the policy for num_steps steps in every env; returns (rollout, the next rollout's first obs).

    next_obs: (N, 4, 84, 84) uint8 observation to start from, on the agent's device. Observations go to the
    device once, as uint8, and are stored there; rewards and done flags stay in numpy until the rollout ends
    and cross once; what the policy produces stays on the device. The only per-step transfers are the
    unavoidable ones: observation in, action out.
    """
    device = next(agent.parameters()).device
    check_policy(agent, next_obs)  # NaN or infinite outputs stop the run here (TrainingDiverged), not in sampling
    obs, actions, logprobs, values, rewards, terminations, episode_ends = ([] for _ in range(7))  # one entry per step
    next_values = torch.zeros((num_steps, next_obs.shape[0]), device=device)  # filled only where truncated
    for step in range(num_steps):
        obs.append(next_obs)
        with torch.inference_mode():
            action, logprob, _, value = agent.get_action_and_value(next_obs)
        actions.append(action)
        logprobs.append(logprob)
        values.append(value)
        raw_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        ended = terminated | truncated  # terminated includes a lost life
        rewards.append(reward)
        terminations.append(terminated)
        episode_ends.append(ended)
        next_obs = torch.tensor(raw_obs, device=device)  # a copy: the rollout keeps it, an env may reuse its array
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

    to_device = lambda arrays: torch.as_tensor(np.stack(arrays), dtype=torch.float32, device=device)  # noqa: E731
    values, episode_ends = torch.stack(values), to_device(episode_ends)
    # next_values[t] = V(s_{t+1}) = values[t + 1] inside an episode; V(s_T) after the last step.
    with torch.inference_mode():
        last_value = agent.get_value(next_obs)
    shifted = torch.cat([values[1:], last_value.unsqueeze(0)])
    next_values = torch.where(episode_ends == 0, shifted, next_values)
    rollout = Rollout(
        torch.stack(obs), torch.stack(actions), torch.stack(logprobs), values, to_device(rewards), next_values,
        to_device(terminations), episode_ends,
    )  # fmt: skip
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


def ppo_loss(new_logprobs, old_logprobs, entropy, new_values, old_values, advantages, returns, args: Args):
    """The PPO objective on one minibatch (all inputs (B,)); returns (loss to minimize, statistics).

    loss = -L^CLIP + vf_coef * L^VF - ent_coef * S: eq. 9 of arXiv:1707.06347, L^CLIP - c1 L^VF + c2 S, is
    maximized; this is its negation, minimized (L^VF here is half the squared error, optionally clipped).
    """
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()  # pi_new(a|s) / pi_old(a|s)
    with torch.no_grad():
        # Two estimators of KL(pi_old || pi_new): k1 = -log r (unbiased, noisy) and
        # k3 = (r - 1) - log r (unbiased and always >= 0), from John Schulman's note on KL estimators.
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1.0) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

    if args.norm_adv:  # per-minibatch advantage normalization (under torchrun over all processes' minibatches)
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
        "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy_mean.detach(),
        "old_approx_kl": old_approx_kl, "approx_kl": approx_kl, "clipfrac": clipfrac, "loss": loss.detach(),
    }  # fmt: skip
    return loss, stats


def update_policy(agent: Agent, optimizer, rollout: Rollout, advantages, returns, args: Args) -> dict[str, float]:
    """update_epochs passes over the flattened rollout in shuffled minibatches; returns mean statistics.

    Under torchrun each process takes its minibatches (minibatch_size / world_size samples) from its own
    rollout; gradients, advantage statistics, the KL early stop and the statistics are averaged over the
    processes (one call each), so that every process takes the very same steps.
    """
    b_obs = rollout.obs.reshape(-1, *rollout.obs.shape[2:])  # (B, 4, 84, 84) uint8, B = T * N
    b_actions = rollout.actions.reshape(-1)
    b_logprobs, b_values = rollout.logprobs.reshape(-1), rollout.values.reshape(-1)
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)
    batch_size = b_obs.shape[0]  # this process's share of args.batch_size
    minibatch_size = batch_size // args.num_minibatches

    params = list(agent.parameters())
    totals: dict[str, torch.Tensor] = {}
    num_minibatch_updates = 0
    for epoch in range(1, args.update_epochs + 1):  # noqa: B007 (epoch is reported below)
        # A fresh permutation each epoch: every sample is used exactly once per epoch.
        permutation = torch.randperm(batch_size, device=b_obs.device)
        for start in range(0, batch_size, minibatch_size):
            mb = permutation[start : start + minibatch_size]
            # Under --bf16 the agent's autocast covers the network only; ppo_loss gets float32 inputs.
            _, new_logprobs, entropy, new_values = agent.get_action_and_value(b_obs[mb], b_actions[mb])
            loss, stats = ppo_loss(
                new_logprobs, b_logprobs[mb], entropy, new_values, b_values[mb], b_advantages[mb], b_returns[mb], args
            )
            optimizer.zero_grad()
            loss.backward()
            average_gradients(params)  # torchrun: every process steps with the mean gradient of all
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # one global norm over all weights
            optimizer.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            num_minibatch_updates += 1
        # Early stop on the KL of the last minibatch of the epoch (situational detail 3 of Huang et al.), averaged
        # over processes so that all of them stop at the same epoch.
        if args.target_kl is not None and mean_over_processes(stats["approx_kl"]).item() > args.target_kl:
            break
    # Averages over all minibatches (and processes); the KL as seen on the last one; what the critic explains.
    result = {key: mean_over_processes(value / num_minibatch_updates).item() for key, value in totals.items()}
    result["last_approx_kl"] = mean_over_processes(stats["approx_kl"]).item()
    result["epochs"] = epoch
    result["explained_variance"] = explained_variance(b_values, b_returns)
    result["learning_rate"] = optimizer.param_groups[0]["lr"]
    return result


def train(args: Args) -> dict:
    """Train PPO; returns the summary that is also written to <run>/summary.json.

    Under torchrun every process runs this loop on its share of the envs (only rank 0 logs and saves)."""
    with Run(args) as run:  # checks args; sets up seeding, device, torchrun, run folder, logs, checkpoints, Ctrl-C
        envs = run.watch(make_vector_env(args.env_id, args.num_envs // run.world_size, args.env_backend))
        agent = Agent(int(envs.single_action_space.n), args.channels_last, args.bf16).to(run.device)
        # Adam with eps 1e-5 (core detail 3: PPO2's value, not torch's 1e-8); the fused kernel is the same math, faster.
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
        start_iteration = run.restore(agent, optimizer)  # 1, or where --resume left off
        # Env i of process r starts from seed + r * its num_envs + i (+ an offset when resuming).
        env_seed = args.seed + run.rank * envs.num_envs + (start_iteration - 1) * args.num_envs
        next_obs = torch.as_tensor(envs.reset(seed=env_seed)[0], device=run.device)

        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:  # linear annealing (core detail 4): from lr at the first iteration to lr / N at the last
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

            # COLLECT TRAJECTORIES
            with run.rollout_threads():  # plumbing: torch takes the CPU cores the emulators' threads leave free
                rollout, next_obs = collect_rollout(envs, agent, next_obs, args.num_steps)

            # CALCULATE ADVANTAGE
            advantages, returns = compute_gae(
                rollout.rewards, rollout.values, rollout.next_values, rollout.terminations, rollout.episode_ends,
                args.gamma, args.gae_lambda,
            )  # fmt: skip

            # UPDATE NETWORK
            stats = update_policy(agent, optimizer, rollout, advantages, returns, args)

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
    Under torchrun every process has one, and only rank 0's writes, logs, saves, evaluates and prints.
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
        self.rank, self.world_size = int(os.environ.get("RANK", "0")), world_size_from_env()
        self.is_main = self.rank == 0
        seed_everything(args.seed + self.rank, args.torch_deterministic)  # each process samples its own actions
        self.device = select_device(args)
        name = f"{args.exp_name}__{args.env_id}__{args.seed}__{int(time.time())}"
        # A resumed run goes on writing into the folder of its checkpoint; a new one gets a folder of its own
        # (made by rank 0 alone: the other processes never write).
        if args.resume or not self.is_main:
            self.dir = Path(args.resume).parent if args.resume else Path(args.runs_dir) / name
        else:
            self.dir = make_run_dir(args.runs_dir, name)
        if self.is_main:
            check_writable(self.dir)
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.start_step = self.checkpoint["global_step"] if self.checkpoint else 0
        self.global_step, self.iteration, self.saved_iteration = self.start_step, 0, None
        self.episodes, self.recent_returns = 0, deque(maxlen=100)
        self.env_time = self.inference_time = self.update_time = 0.0
        self.status, self.stopped_by, self.training_done, self.summary = "completed", None, False, {}
        self.error = None  # the OSError or TrainingDiverged that stopped the run
        start_distributed(self.device)  # torchrun: join the other processes
        if self.is_main:
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
        """Wrap the envs so the run sees each finished game and the time spent stepping them."""
        self.envs = EpisodeAndTimeMonitor(envs)
        return self.envs

    @contextlib.contextmanager
    def rollout_threads(self):
        """torch's CPU threads during the rollout: the cores that the emulators leave free, at least one; then all
        of them again for the update. On the ale_vector path every env steps in a C++ thread of its own, right
        after each forward pass, and torch's idle threads spin on their cores for a while after each of its
        parallel ops, taking those cores from the emulators. On 2 cores with 8 envs, one torch thread makes a
        rollout ~10 % faster, with bitwise the same numbers (docs/benchmarks.md)."""
        threads = torch.get_num_threads()
        emulators = self.envs.num_envs if self.args.env_backend == "ale_vector" and self.device.type == "cpu" else 0
        torch.set_num_threads(max(1, threads - emulators))
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def restore(self, agent, optimizer) -> int:
        """Register what a checkpoint holds; with --resume, load it. Returns the first iteration to run."""
        self.start_time = self.last_print = time.time()  # SPS and wall time count training, not the setup
        self.iteration_start = time.perf_counter()
        self.model = (agent, optimizer)
        broadcast_weights(agent)  # torchrun: every process starts from rank 0's initial weights
        if self.checkpoint is None:
            return 1
        c = self.checkpoint
        agent.load_state_dict(c["model"])
        optimizer.load_state_dict(c["optimizer"])
        if self.is_main:  # rank 0's random states are saved; under torchrun the others start from seed + rank
            set_rng_states(c["rng"])
        self.iteration = self.saved_iteration = c["iteration"]
        if self.is_main:
            print(f"resuming {self.checkpoint_path} at step {self.global_step:,} (iteration {c['iteration'] + 1})")
        return c["iteration"] + 1

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
        episodes = gather_from_processes(episodes)  # torchrun: the games of every process, so all envs count
        self.recent_returns.extend(episode_return for episode_return, _ in episodes)
        self.episodes += len(episodes)
        if not self.is_main:
            return
        step, write = self.global_step, self.writer.add_scalar
        for episode_return, episode_length in episodes:
            write("charts/episodic_return", episode_return, step)
            write("charts/episodic_length", episode_length, step)
        sps = (step - self.start_step) / (time.time() - self.start_time)
        write("charts/learning_rate", stats["learning_rate"], step)
        write("charts/SPS", sps, step)
        write("charts/update_epochs", stats["epochs"], step)
        for key in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
            write(f"losses/{key}", stats[key], step)
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
            f"update {self.update_time:.0f}s"
        )

    def save_if_due(self, iteration: int) -> None:
        if self.args.save_interval and iteration % self.args.save_interval == 0:
            self.save()

    def save(self) -> None:
        """Write the checkpoint, never from NaN or infinite weights or action probabilities (TrainingDiverged; the
        last good one stays): the probe is the first forward pass of the next rollout."""
        check_finite("the weights", *self.model[0].parameters())
        check_policy(self.model[0], self.envs.last_obs)
        if self.is_main:  # under torchrun every process holds the same model: rank 0 writes it
            save_checkpoint(self.checkpoint_path, *self.model, self.args, self.global_step, self.iteration)
        self.saved_iteration = self.iteration

    def finish(self) -> None:
        """Save the final model, then evaluate it exactly as --eval-checkpoint evaluates a saved one."""
        self.save()
        self.training_done, self.training_end = True, time.time()  # wall time and SPS: training only
        if not self.is_main:
            return
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
        if self.status == "interrupted" and self.is_main:
            where = "in the final evaluation" if self.training_done else f"at step {self.global_step:,}"
            aborted = f" ({self.summary['save_aborted']})" if "save_aborted" in self.summary else ""
            with contextlib.suppress(BrokenPipeError):  # no reader left (a `tee` ended by the Ctrl-C): dropped
                print(f"interrupted ({self.stopped_by}) {where}; checkpoint: {self.saved_checkpoint()}{aborted}")
        if isinstance(self.error, TrainingDiverged):
            raise TrainingDiverged(self.error_message()) from None
        if self.error is not None:
            raise StorageError(self.error_message()) from None
        if self.status == "completed" and exc_type is None and self.is_main:
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
        if self.is_main:
            self.writer.flush()

    def write_summary(self) -> None:
        """summary.json: the final figures (the dict train() returns), written atomically as the checkpoint."""
        wall_time = (self.training_end if self.training_done else time.time()) - self.start_time
        self.summary = {
            "script": SCRIPT_NAME, "env_id": self.args.env_id, "env_backend": self.args.env_backend,
            "world_size": self.world_size, "seed": self.args.seed, "status": self.status,
            "global_step": self.global_step, "iterations": self.iteration, "wall_time_s": wall_time,
            "sps": (self.global_step - self.start_step) / max(wall_time, 1e-9), "episodes": self.episodes,
            "mean_return": float(np.mean(self.recent_returns)) if self.recent_returns else None,
            "time_env_s": self.env_time, "time_inference_s": self.inference_time, "time_update_s": self.update_time,
            "run_dir": str(self.dir) if self.is_main else None, "checkpoint": self.saved_checkpoint(), **self.summary,
        }  # fmt: skip
        if self.stopped_by:
            self.summary["stopped_by"] = self.stopped_by
        if self.error is not None:
            self.summary["error"] = self.error_message()
        if self.is_main:
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
        """Close TensorBoard and W&B, leave torchrun's process group; give back the signal handlers and the thread
        excepthook."""
        end_distributed()
        if self.is_main:
            with contextlib.suppress(OSError):  # a failed write is already recorded
                self.writer.close()
            if self.args.track:
                import wandb

                wandb.finish()
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        threading.excepthook = self.previous_excepthook

    def saved_checkpoint(self) -> str | None:
        return str(self.checkpoint_path) if self.is_main and self.checkpoint_path.exists() else None


class EpisodeAndTimeMonitor(gym.vector.VectorWrapper):
    """Records the (full-game unclipped score, length) of every finished game and the seconds spent in env.step()."""

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self.episodes, self.step_time, self.last_step_end = [], 0.0, time.perf_counter()

    def step(self, actions):
        start = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.last_step_end = time.perf_counter()
        self.step_time += self.last_step_end - start
        self.episodes.extend(finished_games(info))
        self.last_obs = obs  # what the next rollout starts from: Run.save() checks the policy on it
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


def save_checkpoint(path: Path, agent, optimizer, args, global_step, iteration):
    """Weights, optimizer, RNG states, args and progress in one file (pixels need no normalization
    statistics: the network's fixed 1/255 is all there is).

    Written to a temporary file and renamed, so an interrupted save never destroys the last one.
    """
    checkpoint = {
        "script": SCRIPT_NAME, "env_id": args.env_id, "args": asdict(args), "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(), "rng": rng_states(), "global_step": global_step, "iteration": iteration,
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


def check_policy(agent: Agent, obs) -> None:
    """The first forward pass of each rollout, checked: the action probabilities on obs (N, 4, 84, 84). Weights that
    exploded give NaN there even while they are finite, and torch.multinomial would fail on them."""
    with torch.inference_mode():
        logits, _ = agent(torch.as_tensor(obs, device=agent.actor.weight.device))
        check_finite("the action probabilities", logits.log_softmax(-1))


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
CHECKPOINT_KEYS = {"env_id", "args", "model", "global_step", "iteration"}
RESUME_KEYS = {"optimizer", "rng"}

# Flags that change only how a run is logged, saved, evaluated or placed: a resumed run may change them.
RESUME_MAY_CHANGE = {
    "cuda", "torch_threads", "exp_name", "runs_dir", "track", "wandb_project_name", "wandb_entity", "save_interval",
    "resume", "eval_checkpoint", "eval_episodes", "eval_stochastic", "capture_video",
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


def load_agent(checkpoint: dict, device: torch.device) -> Agent:
    """Rebuild the agent from a loaded checkpoint, with the layout and precision it was trained with."""
    model, saved = checkpoint["model"], checkpoint["args"]
    agent = Agent(model["actor.weight"].shape[0], saved.get("channels_last", True), saved.get("bf16", False)).to(device)
    agent.load_state_dict(model)
    return agent


def evaluate_checkpoint(path: str, args: Args) -> dict:
    """The one evaluation entry point (after training, and --eval-checkpoint): a saved model on the env and env
    path it was trained on, full games, unclipped score. Returns the returns and their mean and std."""
    checkpoint = load_checkpoint(path)
    agent = load_agent(checkpoint, select_device(args))
    backend = checkpoint["args"]["env_backend"]
    if backend == "gymnasium":
        require_module("cv2", "the gymnasium wrapper stack", "opencv-python-headless")
    video_dir = Path(path).parent / "videos" if args.capture_video else None
    if video_dir is not None and backend != "gymnasium":
        print(f"videos: the games are played on the readable env path, which renders frames ({backend}'s semantics)")
    returns = evaluate(
        agent, checkpoint["env_id"], backend, args.eval_episodes, args.seed, args.eval_stochastic, video_dir
    )
    return {
        "env_id": checkpoint["env_id"], "global_step": checkpoint["global_step"], "eval_episodes": len(returns),
        "eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns)), "eval_returns": returns,
    }  # fmt: skip


def evaluate(agent, env_id: str, backend: str, episodes: int, seed: int, stochastic=True, video_dir=None):
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


def require_module(module: str, purpose: str, package: str | None = None) -> None:
    """Fail early with the install command when an optional package is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: pip install {package or module}") from None


def validate_args(args: Args) -> None:
    """Reject a setting from which nothing sensible can follow, with one line, before anything is built."""
    counts = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes")
    for name in counts:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    rollout, world_size = f"num_envs * num_steps = {args.batch_size}", world_size_from_env()
    on_each = f" on each of {world_size} processes" if world_size > 1 else ""
    checks = [
        (args.torch_threads >= 0, f"--torch-threads must be 0 or more, got {args.torch_threads}"),
        (args.learning_rate > 0, f"--learning-rate must be positive, got {args.learning_rate}"),
        (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must lie in [0, 1]"),
        (args.clip_coef > 0, f"--clip-coef must be positive, got {args.clip_coef}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be positive (0 freezes the policy), got {args.max_grad_norm}"),
        (args.ent_coef >= 0 and args.vf_coef >= 0, "--ent-coef and --vf-coef must not be negative"),
        (args.target_kl is None or args.target_kl > 0, f"--target-kl must be positive when set, got {args.target_kl}"),
        (0 <= args.seed < 2**32, f"--seed must lie in [0, 2**32), got {args.seed}"),
        (args.save_interval >= 0, f"--save-interval must not be negative, got {args.save_interval}"),
        (not (args.resume and args.eval_checkpoint), "--resume and --eval-checkpoint exclude each other"),
        (args.num_envs % world_size == 0,
         f"--num-envs {args.num_envs} does not divide over the {world_size} torchrun processes"),
        (args.batch_size % (args.num_minibatches * world_size) == 0,
         f"the rollout ({rollout}) does not divide into {args.num_minibatches} minibatches{on_each}"),
        (not args.norm_adv or args.minibatch_size >= 2, "--norm-adv needs minibatches of 2 samples or more"),
        (args.total_timesteps >= args.batch_size,
         f"--total-timesteps {args.total_timesteps} is smaller than one rollout ({rollout})"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if args.env_backend == "gymnasium" or args.capture_video:
        # gymnasium's ResizeObservation resizes with OpenCV; videos are recorded on that path too.
        require_module("cv2", "the gymnasium wrapper stack", "opencv-python-headless")
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
    """Reject an unknown id, or one that is not an Atari game of ale-py (pointing Box-action envs elsewhere)."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ConfigError(f"unknown environment id {env_id!r}: {e}") from None
    if spec.entry_point != "ale_py.env:AtariEnv":
        hint = "; for continuous actions use ppo_continuous.py" if has_continuous_actions(env_id) else ""
        raise ConfigError(f"{env_id} is not an Atari environment of ale-py (e.g. BreakoutNoFrameskip-v4){hint}")


def has_continuous_actions(env_id: str) -> bool:
    """Whether a (non-Atari) env has Box actions, to point its user to ppo_continuous.py."""
    try:
        env = gym.make(env_id)
    except Exception:  # missing extras (e.g. mujoco): no hint rather than a second error
        return False
    env.close()
    return isinstance(env.action_space, gym.spaces.Box)


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
    """The device for the networks; also sets torch's CPU thread count. Under torchrun, process LOCAL_RANK of a
    machine takes GPU LOCAL_RANK, and by default the CPU cores are shared out among the machine's processes."""
    torch.set_num_threads(args.torch_threads or cores_per_process())
    if args.cuda and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """--bf16's default: True when the machine has no GPU (torch.cuda.is_available() is False) and the CPU
    computes bfloat16 natively (the Linux CPU flags avx512_bf16 or amx_bf16). There the update is about a third
    faster and learning is unchanged (docs/ppo_atari.md); a CPU without them emulates bfloat16, slower than float32.
    The default is decided before the flags are read, so --no-cuda on a machine with a GPU trains in float32
    unless --bf16 is given. Elsewhere than Linux: False."""
    if torch.cuda.is_available() or not cpuinfo.exists():
        return False
    flags = cpuinfo.read_text().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


# torchrun (data parallel): every process runs train() on num_envs / world_size envs. It is one PPO because
# the processes start from the same weights, average their gradients and share the advantage statistics,
# the KL early stop and the logged statistics; alone, each helper below does nothing.


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cores_per_process() -> int:
    """This machine's CPU cores divided by the processes torchrun started on it (at least 1)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def start_distributed(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL between GPUs, gloo on CPU. torchrun sets
    RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, on one machine or many."""
    if world_size_from_env() > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def end_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_weights(agent: nn.Module) -> None:
    """Every process's initial weights become rank 0's."""
    if dist.is_initialized():
        for tensor in agent.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace every process's gradients by their mean over all processes, in one all-reduce of a flat
    buffer, so every process then takes the very same optimizer step."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view(g.shape))
        offset += g.numel()


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


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (a new tensor; x itself without torchrun)."""
    if not dist.is_initialized():
        return x
    total = x.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def gather_from_processes(items: list) -> list:
    """The items of every process, in rank order (items itself without torchrun)."""
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for process_items in gathered for item in process_items]


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
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process has it: say it once
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
