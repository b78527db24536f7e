# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.4",
#     "numpy>=1.26",
#     "tyro>=0.8",
#     "tensorboard>=2.14",
# ]
# ///
"""PPO for language models (RLHF), in one file, on a tiny model it trains itself.

The whole pipeline of reinforcement learning from human feedback, shrunk until it runs on a laptop CPU
in about a minute with nothing downloaded:
1. a toy language: short sentences from a small grammar ("the kind dog loves the old cat ."), a word
   tokenizer with distinct PAD, BOS and EOS, and an exact validity check (a regular expression);
2. a tiny causal transformer (nanoGPT-like, dropout off, KV cache), pretrained by supervised
   fine-tuning (SFT) on sentences of the grammar;
3. a hidden "gold" scorer (positive minus negative words; invalid text scores low) that labels
   Bradley-Terry preference pairs, and a reward model trained on them: the proxy reward PPO optimizes.
   It only ever saw grammatical sentences, so it can be fooled by text it never saw;
4. PPO (Schulman et al. 2017, arXiv:1707.06347) with GAE (arXiv:1506.02438) over response tokens and
   a KL penalty to the frozen SFT model in the reward (Ziegler et al. 2019, arXiv:1909.08593;
   InstructGPT, arXiv:2203.02155), each detail of "The N Implementation Details of RLHF with PPO"
   (Huang et al. 2024, arXiv:2403.17031) named in a comment. `--advantage-estimator grpo|rloo` swaps the
   critic and GAE for group-relative baselines (GRPO, arXiv:2402.03300; RLOO, arXiv:2402.14740).
Validity and the gold score are exact, so a run *shows* reward hacking: with --kl-coef 0 the proxy reward
rises while validity and gold reward fall; with the default KL penalty the policy gains gold reward and
stays grammatical.

    python ppo_llm_toy.py                       # SFT, reward model, PPO: ~1 minute on 2 cores
    python ppo_llm_toy.py --kl-coef 0           # no KL penalty: watch the proxy get gamed
    python ppo_llm_toy.py --advantage-estimator rloo
    python ppo_llm_toy.py --sft-checkpoint runs/<run>/sft.pt --reward-model-checkpoint runs/<run>/reward_model.pt
    python ppo_llm_toy.py --eval-checkpoint runs/<run>/policy.pt   # evaluate a trained policy, print samples
    tensorboard --logdir runs

Siblings: ppo_continuous.py and ppo_atari.py, where an environment rewards every step of long episodes.
Here an episode is one response: the actions are tokens, the state is the text so far, and the only
reward is the reward model's score at the end plus a per-token KL penalty; the policy starts from a
pretrained model that it must not drift from (the frozen reference), and the discount is 1.
Read Args, TASK, NETWORK, ALGORITHM and train() (PPO), then the SFT and reward-model stages: that is all of
RLHF. Below the PLUMBING banner: run folder, logs, checkpoints, evaluation, checks.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib
import itertools
import json
import math
import netrc
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT_NAME = "ppo_llm_toy"


@dataclass
class Args:
    # Each field's docstring is its --help text and stays one line (tyro keeps a docstring's line breaks); more
    # detail goes into a comment above the field.
    # Algorithm: PPO (stage 3)
    total_episodes: int = 12800
    """the total number of responses sampled during PPO"""
    num_prompts: int = 32
    """the number of distinct prompts per rollout"""
    samples_per_prompt: int = 4
    """the number of responses sampled per prompt (a rollout has num_prompts * samples_per_prompt)"""
    max_prompt_words: int = 3
    """prompts are the first 1..max_prompt_words words of a grammar sentence"""
    response_length: int = 12
    """the maximum number of response tokens; a response without EOS by then is cut"""
    temperature: float = 1.0
    """the sampling temperature, applied identically when sampling and when recomputing log-probs"""
    learning_rate: float = 3e-4
    """the learning rate of the Adam optimizer (policy and critic)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly: iteration i of N uses lr * (1 - (i - 1) / N), the last one lr / N"""
    num_minibatches: int = 4
    """the number of minibatches each rollout is split into"""
    update_epochs: int = 4
    """the number of passes over the rollout per update"""
    advantage_estimator: str = "gae"
    """gae (PPO with a critic), grpo or rloo (group-relative baselines from samples_per_prompt, no critic)"""
    gamma: float = 1.0
    """the discount factor over response tokens (1: the score at the end counts fully)"""
    gae_lambda: float = 0.95
    """the lambda of Generalized Advantage Estimation"""
    norm_adv: bool = True
    """whiten the GAE advantages over the valid response tokens of the rollout (gae only: grpo/rloo keep theirs)"""
    whiten_rewards: bool = False
    """rescale the per-token rewards to std 1 over valid tokens, keeping their mean, before GAE (lm-human-prefs)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon (also clips the value loss)"""
    clip_vloss: bool = True
    """clip the value loss around the old value predictions, as the policy loss is clipped"""
    ent_coef: float = 0.0
    """the coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 1.0
    """the maximum global norm of the gradients (clipped above it)"""
    target_kl: float | None = None
    """stop the update epochs early once the approximate KL exceeds this (None: never)"""
    kl_coef: float = 0.2
    """beta: the coefficient of the per-token KL penalty to the reference model (0: no penalty)"""
    kl_estimator: str = "k1"
    """the per-token KL estimate in the reward, k1 or k3: k1 = log p - log p_ref, k3 = (r - 1) - log r"""
    adaptive_kl: bool = False
    """adapt beta towards kl_target with the proportional controller of Ziegler et al. (lm-human-preferences)"""
    kl_target: float = 1.0
    """the KL (nats per response) the adaptive controller aims for"""
    kl_horizon: int = 10000
    """the horizon (in responses) of the adaptive KL controller"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that has no EOS within response_length"""

    # Model (shared by the policy, the reference, the critic and the reward model)
    n_layer: int = 2
    """the number of transformer blocks"""
    n_head: int = 4
    """the number of attention heads per block"""
    n_embd: int = 64
    """the width of the residual stream"""
    block_size: int = 24
    """the context length in tokens: BOS + prompt + response must fit in it"""

    # Stage 1: supervised fine-tuning (SFT) on the grammar corpus
    sft_corpus_size: int = 20000
    """the number of grammar sentences in the SFT corpus"""
    sft_steps: int = 1500
    """the number of SFT gradient steps"""
    sft_batch_size: int = 64
    """the number of sentences per SFT step"""
    sft_learning_rate: float = 3e-3
    """the learning rate of SFT (AdamW, cosine decay to 0)"""

    # Stage 2: reward model from synthetic preferences
    rm_num_pairs: int = 6000
    """the number of synthetic preference pairs labelled by the gold scorer"""
    rm_epochs: int = 2
    """the number of passes over the preference pairs"""
    rm_batch_size: int = 64
    """the number of pairs per reward-model step"""
    rm_learning_rate: float = 1e-3
    """the learning rate of the reward model (AdamW)"""

    # The run: seeding, device, logging, checkpoints, evaluation
    seed: int = 1
    """seed of the experiment (python, torch, corpus, prompts and sampling)"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms: the same seed then gives the same run twice on CPU"""
    cuda: bool = True
    """use CUDA for the networks when a GPU is available (otherwise the CPU is used)"""
    num_threads: int = 1
    """CPU threads for torch; 1 is fastest for a model this small (threads cost more than they save)"""
    exp_name: str = SCRIPT_NAME
    """the name of this experiment: the first part of the run name `runs/<exp_name>__<seed>__<time>`"""
    runs_dir: str = "runs"
    """the folder that holds one sub-folder per run (TensorBoard events, models, summary.json)"""
    track: bool = False
    """log the run to Weights & Biases (needs wandb, and `wandb login` or WANDB_MODE=offline)"""
    wandb_project_name: str = "ppo-reference"
    """the Weights & Biases project"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user); None uses your default"""
    sft_checkpoint: str | None = None
    """reuse this sft.pt instead of training the SFT model"""
    reward_model_checkpoint: str | None = None
    """reuse this reward_model.pt instead of training the reward model"""
    eval_checkpoint: str | None = None
    """do not train: evaluate this policy.pt with its run's (or the given) sft.pt and reward_model.pt, print samples"""
    eval_interval: int = 20
    """evaluate on the held-out prompts every N PPO iterations (and always at start and end)"""
    eval_prompts: int = 256
    """the number of held-out prompts of each evaluation"""
    num_sample_texts: int = 4
    """the number of sample texts printed before and after PPO"""

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.samples_per_prompt

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_episodes // self.batch_size


# TASK
# Sentences: "the" ADJ{0,2} NOUN VERB "the" ADJ{0,2} NOUN "." -- e.g. "the kind dog loves the cat ."
# Some adjectives and verbs are positive, some negative, some neutral.

POSITIVE_ADJ = ("good", "kind", "happy", "nice", "great")
NEGATIVE_ADJ = ("bad", "mean", "sad", "rude", "awful")
NEUTRAL_ADJ = ("big", "small", "old", "young", "red")
NOUNS = ("cat", "dog", "bird", "man", "woman", "child", "king")
POSITIVE_VERB = ("loves", "likes", "helps")
NEGATIVE_VERB = ("hates", "bites", "fears")
NEUTRAL_VERB = ("sees", "finds", "meets")
ADJECTIVES = POSITIVE_ADJ + NEGATIVE_ADJ + NEUTRAL_ADJ
VERBS = POSITIVE_VERB + NEGATIVE_VERB + NEUTRAL_VERB
POSITIVE_WORDS = frozenset(POSITIVE_ADJ + POSITIVE_VERB)
NEGATIVE_WORDS = frozenset(NEGATIVE_ADJ + NEGATIVE_VERB)
MAX_ADJECTIVES = 2  # per noun phrase

PAD, BOS, EOS = 0, 1, 2  # PAD is distinct from EOS: padding never reads as "the response ended"
VOCAB = ("<pad>", "<bos>", "<eos>", "the", ".", *ADJECTIVES, *NOUNS, *VERBS)
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
MAX_SENTENCE_TOKENS = 2 + 2 * (2 + MAX_ADJECTIVES) + 2  # BOS, 2 noun phrases, verb, ".", EOS
MIN_SENTENCE_WORDS = 2 + 1 + 2 + 1  # "the NOUN VERB the NOUN ."

_NOUN_PHRASE = rf"the(?: (?:{'|'.join(ADJECTIVES)})){{0,{MAX_ADJECTIVES}}} (?:{'|'.join(NOUNS)})"
VALID_SENTENCE = re.compile(rf"{_NOUN_PHRASE} (?:{'|'.join(VERBS)}) {_NOUN_PHRASE} \.")
GOLD_INVALID = -5.0  # the gold score of text outside the grammar: as bad as the worst sentence


def sample_sentence(rng: random.Random) -> list[str]:
    """One sentence of the grammar, uniform choices at every slot."""

    def noun_phrase() -> list[str]:
        adjectives = [rng.choice(ADJECTIVES) for _ in range(rng.randint(0, MAX_ADJECTIVES))]
        return ["the", *adjectives, rng.choice(NOUNS)]

    return [*noun_phrase(), rng.choice(VERBS), *noun_phrase(), "."]


def encode(words: list[str]) -> list[int]:
    return [TOKEN_ID[word] for word in words]


def decode(token_ids: list[int]) -> list[str]:
    """Token ids -> words. Left padding and the leading BOS are dropped and reading stops at the
    first EOS; a PAD or BOS anywhere else is kept as a word ("<pad>", "<bos>"), which no valid
    sentence contains: a policy cannot hide special tokens from the validity check."""
    start = 0
    while start < len(token_ids) and token_ids[start] == PAD:
        start += 1
    if start < len(token_ids) and token_ids[start] == BOS:
        start += 1
    words = []
    for token in token_ids[start:]:
        if token == EOS:
            break
        words.append(VOCAB[token])
    return words


def is_valid(words: list[str]) -> bool:
    """Exact grammaticality: the whole word sequence matches the grammar's regular expression."""
    return VALID_SENTENCE.fullmatch(" ".join(words)) is not None


def gold_score(words: list[str], ended: bool = True) -> float:
    """The hidden "human": positive minus negative words in a valid, finished sentence.

    Unfinished (no EOS) or ungrammatical text gets GOLD_INVALID whatever its words. The reward
    model never sees this function, only preferences it labelled.
    """
    if not ended or not is_valid(words):
        return GOLD_INVALID
    return float(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words))


def left_pad(sequences: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists with PAD -> tokens (B, L) and attention mask (B, L), 1 = real token.

    Left padding puts the last prompt token of every row in the same column, so generation appends
    to all rows at once.
    """
    length = length or max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        tokens[i, length - len(sequence) :] = torch.tensor(sequence)
        mask[i, length - len(sequence) :] = 1
    return tokens, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) attention mask -> (B, L) positions counting real tokens only (pads get 0).

    With left padding, the first real token of every row is position 0, exactly as if it were alone.
    """
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def make_prompts(num: int, max_words: int, rng: random.Random) -> list[list[int]]:
    """Prompts = BOS + the first 1..max_words words of fresh grammar sentences."""
    return [[BOS, *encode(sample_sentence(rng)[: rng.randint(1, max_words)])] for _ in range(num)]


# NETWORK


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias; std=0 gives an all-zero layer."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past=None):
        """x: (B, T, C); allowed: (B, 1, T, S) bool, S = past + T keys; past: cached (k, v)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:  # KV cache: keys and values of earlier tokens are not recomputed
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, C / H)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, allowed, past=None):
        attended, present = self.attn(self.ln_1(x), allowed, past)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), present


class Transformer(nn.Module):
    """A pre-LayerNorm GPT trunk (no dropout anywhere: PPO's ratio must not see random masks)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for module in self.modules():  # GPT-2 initialization
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens, mask, position_ids=None, past=None):
        """tokens: (B, T); mask: (B, S) 1 for real tokens, S = cached + T; -> hidden (B, T, C), cache.

        A query attends to earlier (causal) real keys, and always to itself: a padding query would
        otherwise see no key at all (NaN softmax). Real queries never see padding, so a left-padded
        row computes exactly what it computes alone.
        """
        T, S = tokens.shape[1], mask.shape[1]
        if position_ids is None:
            position_ids = position_ids_from_mask(mask)[:, S - T :]
        query_index = torch.arange(S - T, S, device=tokens.device)[:, None]  # (T, 1)
        key_index = torch.arange(S, device=tokens.device)[None, :]  # (1, S)
        allowed = ((key_index <= query_index) & mask[:, None, :].bool()) | (key_index == query_index)
        allowed = allowed[:, None]  # (B, 1, T, S), broadcast over heads
        x = self.wte(tokens) + self.wpe(position_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, allowed, None if past is None else past[i])
            presents.append(present)
        return self.ln_f(x), presents


@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int

    @staticmethod
    def from_args(args: Args) -> ModelConfig:
        return ModelConfig(len(VOCAB), args.block_size, args.n_layer, args.n_head, args.n_embd)


class LanguageModel(nn.Module):
    """Transformer + a linear head over the vocabulary: the SFT model, the policy, the reference."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.trunk = Transformer(**asdict(config))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, tokens, mask, position_ids=None, past=None):
        """-> logits (B, T, V), cache"""
        hidden, presents = self.trunk(tokens, mask, position_ids, past)
        return self.lm_head(hidden), presents


class ScalarModel(nn.Module):
    """Transformer + a scalar head: the reward model (read at the last real token) and the critic."""

    def __init__(self, config: ModelConfig, head_std: float):
        super().__init__()
        self.config = config
        self.trunk = Transformer(**asdict(config))
        # head_std: 0 for the critic (V = 0 at the start), 1 / sqrt(n_embd + 1) for the reward model
        # (the initialization of OpenAI's lm-human-preferences)
        self.head = layer_init(nn.Linear(config.n_embd, 1), std=head_std)
        # Reward normalization (Ziegler et al. 2019, arXiv:1909.08593): score = (raw - mean) / std with the
        # mean and std of raw scores on SFT samples, so beta means the same whatever the RM's scale.
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def forward(self, tokens, mask):
        """-> one scalar per position (B, T)"""
        hidden, _ = self.trunk(tokens, mask)
        return self.head(hidden).squeeze(-1)


def reward_model_score(reward_model: ScalarModel, tokens, mask, normalize: bool = True):
    """The scalar at the last real token of each row (B,); rows may be left- and right-padded."""
    last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)  # index of the last 1 in each row
    raw = reward_model(tokens, mask).gather(1, last[:, None]).squeeze(1)
    if not normalize:
        return raw
    return (raw - reward_model.score_mean) / reward_model.score_std


# ALGORITHM
# Log-probs, KL and sampling


def response_logits(model: LanguageModel, query_responses, mask, prompt_length, temperature):
    """Logits of every response token (B, R, V), divided by the sampling temperature.

    query_responses: (B, P + R) = left-padded prompt then response; mask (B, P + R). The logits at
    position t predict token t + 1, so the response tokens are predicted by positions P-1 .. P+R-2.
    The same temperature as in sampling, or the "old" log-probs belong to another policy than the
    one that sampled (detail in arXiv:2403.17031).
    """
    logits, _ = model(query_responses, mask)
    return logits[:, prompt_length - 1 : -1] / temperature


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at the chosen tokens: (B, R, V), (B, R) -> (B, R)"""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy of each token distribution: (B, R, V) -> (B, R)"""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) summed over the whole vocabulary at each position: (B, R, V) -> (B, R).

    Affordable because the vocabulary is tiny; always >= 0, unlike the sampled k1 estimate.
    """
    logp, ref_logp = torch.log_softmax(logits, dim=-1), torch.log_softmax(ref_logits, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_per_token(logprobs, ref_logprobs, estimator: str) -> torch.Tensor:
    """Sampled estimates of KL(pi || pi_ref) at each token (Schulman, "Approximating KL divergence").

    k1 = log pi - log pi_ref: unbiased, can be negative per token (the RLHF default, Ziegler et al.);
    k3 = (r - 1) - log r with r = pi_ref / pi: unbiased and never negative.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


@torch.no_grad()
def generate(model: LanguageModel, prompts, prompt_mask, response_length: int, temperature: float):
    """Sample response_length tokens after left-padded prompts, with a KV cache.

    prompts, prompt_mask: (B, P) -> responses (B, R) and the logits they were sampled from, already
    divided by the temperature (B, R, V). Every row goes on sampling after its EOS (the batch stays
    rectangular); truncate_after_eos() cuts those tokens afterwards.
    """
    logits, past = model(prompts, prompt_mask)
    logits = logits[:, -1]  # left padding: the last column is every row's last prompt token
    mask = prompt_mask
    next_position = prompt_mask.sum(dim=1, keepdim=True)  # (B, 1) position of the next token
    tokens, all_logits = [], []
    for step in range(response_length):
        all_logits.append(logits / temperature)
        token = torch.multinomial(torch.softmax(all_logits[-1], dim=-1), 1)  # (B, 1)
        tokens.append(token)
        if step == response_length - 1:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        logits, past = model(token, mask, position_ids=next_position, past=past)
        logits = logits[:, -1]
        next_position = next_position + 1
    return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1)


def truncate_after_eos(responses: torch.Tensor):
    """Keep each response up to and including its first EOS; PAD after it.

    responses: (B, R) -> (responses (B, R), mask (B, R) 1 on kept tokens, has_eos (B,) bool).
    """
    is_eos = responses == EOS
    has_eos = is_eos.any(dim=1)
    # EOS seen strictly before position t (an exclusive cumulative sum) -> position t is cut.
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = (~eos_before).long()
    return responses.masked_fill(eos_before, PAD), mask, has_eos


# Rewards, advantages, the PPO loss, the rollout and the update


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the entries where mask is 1; padding entries neither count nor change.

    shift_mean=False adds the mean back: std 1, the mean kept (as in lm-human-preferences' whiten).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(scores, kl, mask, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the score on the last real token.

    R = r - beta * log(pi / pi_ref) of Ziegler et al. (arXiv:1909.08593), spread over the tokens
    as in OpenAI's lm-human-preferences:
    scores (B,), kl (B, R), mask (B, R) -> rewards (B, R), 0 on padding.
    """
    rewards = -kl_coef * kl * mask
    last = mask.sum(dim=1).long() - 1  # index of the last real token (the EOS if there is one)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def apply_missing_eos_penalty(scores, has_eos, penalty: float) -> torch.Tensor:
    """Lower the score of responses that never ended (detail from arXiv:2403.17031)."""
    return torch.where(has_eos, scores, scores - penalty)


def compute_gae(rewards, values, mask, gamma: float, gae_lambda: float):
    """Generalized Advantage Estimation over response tokens, eq. 16 of arXiv:1506.02438.

    rewards, values, mask: (B, R). Each response is one episode that ends at its last real token:
    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the end, A_t = delta_t + gamma*lambda*A_{t+1}.
    Returns (advantages, returns), both (B, R) and 0 on padding; returns = advantages + values.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * gae_lambda * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def group_advantages(sequence_rewards: torch.Tensor, group_size: int, estimator: str):
    """Critic-free baselines from the other samples of the same prompt. (B,) -> (B,).

    Rows i*group_size .. (i+1)*group_size - 1 answer the same prompt.
    grpo: (R - mean of group) / std of group (outcome supervision of arXiv:2402.03300, sec. 4.1.2);
    rloo: R - mean of the *other* samples of the group (the leave-one-out baseline, arXiv:2402.14740).
    Both then go through PPO's clipped loss, update_epochs passes of minibatches, averaged over tokens.
    GRPO does clipped epochs too but averages each response over its own tokens first (1/|o_i|, eq. 3);
    RLOO is plain REINFORCE, one gradient step per batch: with --update-epochs 1 --num-minibatches 1
    the ratio is 1, nothing is clipped, and the gradient is REINFORCE's (averaged over tokens).
    """
    grouped = sequence_rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        advantages = (grouped - mean) / (grouped.std(dim=1, keepdim=True) + 1e-8)
    else:
        advantages = (grouped - mean) * group_size / (group_size - 1)  # = R_i - mean_{j != i} R_j
    return advantages.reshape(-1)


def ppo_loss(new_logprobs, old_logprobs, entropy, new_values, old_values, advantages, returns, mask, args: Args):
    """The PPO objective on one minibatch of tokens (all inputs (B, R), averaged over mask == 1); returns
    (loss to minimize, statistics).

    loss = -L^CLIP + vf_coef * L^VF - ent_coef * S: eq. 9 of arXiv:1707.06347, L^CLIP - c1 L^VF + c2 S, is
    maximized; this is its negation, minimized (L^VF here is half the squared error, optionally clipped).
    new_values / old_values are None without a critic (grpo, rloo): no value loss.
    """
    logratio = (new_logprobs - old_logprobs) * mask
    ratio = logratio.exp()  # pi_new(token) / pi_old(token), exactly 1 on padding
    with torch.no_grad():
        # Two estimators of KL(pi_old || pi_new): k1 = -log r (unbiased, noisy) and
        # k3 = (r - 1) - log r (unbiased and always >= 0), from John Schulman's note on KL estimators.
        old_approx_kl = masked_mean(-logratio, mask)
        approx_kl = masked_mean((ratio - 1.0) - logratio, mask)
        clipfrac = masked_mean(((ratio - 1.0).abs() > args.clip_coef).float(), mask)
        ratio_max_deviation = ((ratio - 1.0).abs() * mask).max()

    # L^CLIP, eq. 7 of arXiv:1707.06347: the pessimistic (max of the negated) of the unclipped and
    # clipped surrogates. Once the ratio leaves [1 - eps, 1 + eps] in the direction the advantage
    # favours, the clipped term is constant and no gradient pushes it further.
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - args.clip_coef, 1.0 + args.clip_coef)
    policy_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)

    # Value loss, optionally clipped around the old prediction the same way (PPO2's baselines code).
    if new_values is None:
        value_loss = torch.zeros((), device=new_logprobs.device)
    else:
        value_loss_unclipped = (new_values - returns) ** 2
        if args.clip_vloss:
            values_clipped = old_values + torch.clamp(new_values - old_values, -args.clip_coef, args.clip_coef)
            value_loss_clipped = (values_clipped - returns) ** 2
            value_loss = 0.5 * masked_mean(torch.max(value_loss_unclipped, value_loss_clipped), mask)
        else:
            value_loss = 0.5 * masked_mean(value_loss_unclipped, mask)

    entropy_mean = masked_mean(entropy, mask)
    loss = policy_loss - args.ent_coef * entropy_mean + args.vf_coef * value_loss
    stats = {
        "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy_mean.detach(),
        "old_approx_kl": old_approx_kl, "approx_kl": approx_kl, "clipfrac": clipfrac, "loss": loss.detach(),
        "ratio_max_deviation": ratio_max_deviation,
    }  # fmt: skip
    return loss, stats


class AdaptiveKLController:
    """beta <- beta * (1 + e * n / horizon), e = clip(KL / target - 1, -0.2, 0.2), n = responses sampled.

    The proportional controller of Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2), as coded in OpenAI's
    lm-human-preferences (AdaptiveKLController): n / horizon is the controller's gain, so with the KL
    far above the target beta grows by a factor of about e^0.2 = 1.22 per `horizon` responses (and
    shrinks as fast far below it); there is no further K_beta factor.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, num_responses: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_responses / self.horizon


@dataclass
class Rollout:
    """One PPO batch: B = num_prompts * samples_per_prompt responses of at most R tokens."""

    query_responses: torch.Tensor  # (B, P + R) left-padded prompt, then response, PAD after EOS
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    logprobs: torch.Tensor  # (B, R) log pi_old(token), recomputed by a forward pass
    values: torch.Tensor | None  # (B, R) V(text before the token); None without a critic
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor | None  # (B, R) critic targets; None without a critic
    prompt_length: int


@torch.no_grad()
def collect_rollout(policy, reference, reward_model, prompts, args: Args, device) -> dict:
    """Sample one response per prompt and score it: everything a rollout or an evaluation needs.

    Returns a dict of tensors on device: query_responses (B, P+R), attention_mask (B, P+R),
    responses (B, R), response_mask (B, R), has_eos (B,), scores (B,) (proxy, with the missing-EOS
    penalty), raw_scores (B,), logprobs / ref_logprobs / exact_kl / entropy (B, R); and the time
    spent sampling and when collection ended (for the throughput the run logs).
    """
    query, query_mask = (t.to(device) for t in left_pad(prompts))
    check_policy(policy, query, query_mask)  # NaN or infinite outputs stop the run here, not in sampling
    start = time.perf_counter()
    responses, _ = generate(policy, query, query_mask, args.response_length, args.temperature)
    sampling_time = time.perf_counter() - start
    responses, response_mask, has_eos = truncate_after_eos(responses)
    query_responses = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    prompt_length = query.shape[1]
    # Recompute the log-probs with one full forward pass rather than keeping those of sampling:
    # the update recomputes them with the same function, so the first ratio is exactly 1.
    logits = response_logits(policy, query_responses, attention_mask, prompt_length, args.temperature)
    ref_logits = response_logits(reference, query_responses, attention_mask, prompt_length, args.temperature)
    raw_scores = reward_model_score(reward_model, query_responses, attention_mask)
    return {
        "query_responses": query_responses, "attention_mask": attention_mask, "prompt_length": prompt_length,
        "responses": responses, "response_mask": response_mask, "has_eos": has_eos, "raw_scores": raw_scores,
        "scores": apply_missing_eos_penalty(raw_scores, has_eos, args.missing_eos_penalty),
        "logprobs": logprobs_of(logits, responses), "ref_logprobs": logprobs_of(ref_logits, responses),
        "exact_kl": exact_kl(logits, ref_logits), "entropy": entropy_from_logits(logits),
        "sampling_time": sampling_time, "collected_at": time.perf_counter(),
    }  # fmt: skip


def compute_advantages(batch: dict, critic, kl_coef: float, args: Args) -> tuple[Rollout, dict]:
    """Per-token rewards and advantages for a sampled batch. Returns the rollout and its statistics."""
    mask = batch["response_mask"].float()
    kl = kl_per_token(batch["logprobs"], batch["ref_logprobs"], args.kl_estimator) * mask
    values = returns = None
    if args.advantage_estimator == "gae":
        with torch.no_grad():
            values = critic(batch["query_responses"], batch["attention_mask"])
            values = values[:, batch["prompt_length"] - 1 : -1] * mask
        rewards = per_token_rewards(batch["scores"], kl, mask, kl_coef)
        if args.whiten_rewards:
            # whiten(rewards, shift_mean=False) of lm-human-preferences: (r - mean) / std + mean. Not a
            # pure rescaling: every token gains mean * (1 - 1 / std), a constant per token that favours
            # long responses when positive and short ones when negative.
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.gae_lambda)
        # Whitened over the valid tokens of the whole rollout (arXiv:2403.17031): padding must not
        # shift the statistics.
        if args.norm_adv:
            advantages = masked_whiten(advantages, mask)
    else:
        # The KL-penalized reward summed per response, R = score - beta * sum_t KL_t, as in RLOO
        # (arXiv:2402.14740, sec. 3). GRPO puts a k3 KL term in the loss instead (eq. 3 of
        # arXiv:2402.03300); the toy keeps it in the reward for both, so the KL penalty means the same
        # for the three estimators (with grpo it is divided by the group's std along with the score).
        sequence_rewards = batch["scores"] - kl_coef * kl.sum(dim=1)
        sequence_advantages = group_advantages(sequence_rewards, args.samples_per_prompt, args.advantage_estimator)
        # Every token of a response gets its response's advantage, as the papers define it: no
        # whitening over tokens, whose token-weighted mean would shift the baseline by length.
        advantages = sequence_advantages[:, None] * mask
    rollout = Rollout(
        batch["query_responses"], batch["attention_mask"], mask, batch["logprobs"], values,
        advantages, returns, batch["prompt_length"],
    )  # fmt: skip
    stats = {
        "score": batch["scores"].mean().item(),
        "kl": (kl.sum(1)).mean().item(),
        "kl_exact": (batch["exact_kl"] * mask).sum(1).mean().item(),
        "non_score_reward": (-kl_coef * kl.sum(1)).mean().item(),
        "entropy": masked_mean(batch["entropy"], mask).item(),
    }
    return rollout, stats


def policy_forward(policy, critic, rollout: Rollout, idx, args: Args):
    """New log-probs, entropy (B, R) and values (B, R) or None for the rows idx of the rollout."""
    tokens, mask = rollout.query_responses[idx], rollout.attention_mask[idx]
    logits = response_logits(policy, tokens, mask, rollout.prompt_length, args.temperature)
    responses = tokens[:, rollout.prompt_length :]
    values = None
    if critic is not None:
        values = critic(tokens, mask)[:, rollout.prompt_length - 1 : -1]
    return logprobs_of(logits, responses), entropy_from_logits(logits), values


def update_policy(policy, critic, optimizer, rollout: Rollout, args: Args) -> dict:
    """update_epochs passes over the rollout in shuffled minibatches of responses; returns mean statistics.

    The statistics of every minibatch stay on the device until the update ends (no host sync per
    minibatch); they are also returned in order under "minibatches": the first one's ratio is exactly 1.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    for epoch in range(1, args.update_epochs + 1):  # noqa: B007 (epoch is reported below)
        # A fresh permutation each epoch: every response is used exactly once per epoch.
        permutation = torch.randperm(args.batch_size, device=rollout.logprobs.device)
        for start in range(0, args.batch_size, args.minibatch_size):
            idx = permutation[start : start + args.minibatch_size]
            new_logprobs, entropy, new_values = policy_forward(policy, critic, rollout, idx, args)
            loss, stats = ppo_loss(
                new_logprobs, rollout.logprobs[idx], entropy, new_values,
                None if rollout.values is None else rollout.values[idx],
                rollout.advantages[idx], None if rollout.returns is None else rollout.returns[idx],
                rollout.response_mask[idx], args,
            )  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # one global norm, all weights
            optimizer.step()
            history.append(stats)
        # Early stop on the KL of the last minibatch of the epoch (situational detail 3 of Huang et al. 2022).
        if args.target_kl is not None and stats["approx_kl"].item() > args.target_kl:
            break
    keys = list(history[0])
    table = torch.stack([torch.stack([stats[key] for key in keys]) for stats in history]).tolist()
    minibatches = [dict(zip(keys, row, strict=True)) for row in table]
    result = {key: sum(stats[key] for stats in minibatches) / len(minibatches) for key in keys}  # averages
    result["first_minibatch_ratio_deviation"] = minibatches[0]["ratio_max_deviation"]  # 0 unless they disagree
    result["minibatches"] = minibatches
    result["epochs"] = epoch
    result["learning_rate"] = optimizer.param_groups[0]["lr"]
    return result


def train(args: Args) -> dict:
    """SFT, the reward model, then PPO; returns the summary that is also written to <run>/summary.json."""
    with Run(args) as run:  # checks args and checkpoints; seeding, device, run folder, logs, Ctrl-C / SIGTERM
        sft, reward_model = build_models(args, run)  # stages 1 and 2 (after train()): trained, or loaded
        # The policy and the reference start as copies of the SFT model; the reference is a
        # distinct, frozen object, so updating the policy can never move it.
        policy, reference = copy.deepcopy(sft).train().requires_grad_(True), sft
        critic = None
        if args.advantage_estimator == "gae":
            # The critic: the SFT trunk with a zero-initialized value head, so V = 0 at the start
            # and the first advantages are the plain rewards (detail from lm-human-preferences).
            critic = ScalarModel(sft.config, head_std=0.0).to(run.device)
            critic.trunk.load_state_dict(sft.trunk.state_dict())
        params = list(policy.parameters()) + ([] if critic is None else list(critic.parameters()))
        optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
        # PPO starts from the same random state whether the stages were trained or loaded, so a
        # rerun with --sft-checkpoint / --reward-model-checkpoint reproduces the PPO numbers.
        torch.manual_seed(args.seed + 6)
        kl_controller = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
        prompt_rng = random.Random(args.seed + 4)
        run.begin_ppo(policy, reference, reward_model, kl_controller)  # evaluates the SFT policy first

        for iteration in range(1, args.num_iterations + 1):
            if args.anneal_lr:  # linear annealing (core detail 4 of Huang et al. 2022): lr first, lr / N last
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

            # COLLECT TRAJECTORIES: num_prompts prompts, each repeated samples_per_prompt times (rows of a
            # group are adjacent, as group_advantages expects)
            prompts = make_prompts(args.num_prompts, args.max_prompt_words, prompt_rng)
            prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
            batch = collect_rollout(policy, reference, reward_model, prompts, args, run.device)

            # CALCULATE ADVANTAGE
            rollout, rollout_stats = compute_advantages(batch, critic, kl_controller.value, args)

            # UPDATE NETWORK
            stats = update_policy(policy, critic, optimizer, rollout, args)
            if args.adaptive_kl:
                kl_controller.update(rollout_stats["kl"], args.batch_size)

            run.log(iteration, batch, rollout_stats, stats)  # TensorBoard, progress, evaluations; stops on NaN

        run.finish()  # policy.pt, the final evaluation, summary.json
    return run.summary


# STAGES 1 AND 2: THE SFT MODEL AND THE REWARD MODEL (train() runs them before PPO)


def build_models(args: Args, run: Run) -> tuple[LanguageModel, ScalarModel]:
    """Stages 1 and 2: the SFT model and the (normalized) reward model, trained or taken from the
    checkpoints given (run.given), saved into the run folder and frozen."""
    if "sft" in run.given:
        sft = run.given["sft"][0].to(run.device)
        print(f"SFT model loaded from {args.sft_checkpoint}")
    else:
        sft = train_sft(args, run.device, run.writer)
    save_checkpoint(run.dir / "sft.pt", sft, "sft")
    normalization = normalization_key(sft, args)
    if "reward_model" in run.given:
        reward_model, metadata = run.given["reward_model"]
        reward_model = reward_model.to(run.device)
        print(f"reward model loaded from {args.reward_model_checkpoint}")
        if metadata.get("normalized_on") != normalization:
            print("its score normalization was fitted on another SFT model or sampling setting: refitting it")
            fit_reward_normalization(reward_model, sft, args, run.device)
    else:
        reward_model = train_reward_model(args, sft, run.device, run.writer)
        fit_reward_normalization(reward_model, sft, args, run.device)
    save_checkpoint(run.dir / "reward_model.pt", reward_model, "reward_model", {"normalized_on": normalization})
    for model in (sft, reward_model):
        model.eval().requires_grad_(False)
    return sft, reward_model


def sentence_batch(sentences: list[list[str]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full sentences as BOS words EOS, left-padded: tokens (B, L), mask (B, L)."""
    tokens, mask = left_pad([[BOS, *encode(s), EOS] for s in sentences])
    return tokens.to(device), mask.to(device)


def sft_loss(model: LanguageModel, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over real transitions only. tokens, mask: (B, L).

    Position t predicts token t + 1 where both are real: left padding gives neither PAD targets nor
    PAD -> BOS targets (the first real token, BOS, is never predicted: every text starts with it).
    """
    logits, _ = model(tokens, mask)
    target_mask = (mask[:, 1:] * mask[:, :-1]).float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return masked_mean(losses, target_mask)


def train_sft(args: Args, device, writer: SummaryWriter) -> LanguageModel:
    """Next-token prediction on a corpus sampled from the grammar (AdamW, cosine learning rate)."""
    rng = random.Random(args.seed)
    corpus = [sample_sentence(rng) for _ in range(args.sft_corpus_size)]
    model = LanguageModel(ModelConfig.from_args(args)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(args.sft_steps, 1)))
    )
    start = time.time()
    for step in range(args.sft_steps):
        tokens, mask = sentence_batch(rng.sample(corpus, args.sft_batch_size), device)
        loss = sft_loss(model, tokens, mask)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.sft_steps - 1:
            writer.add_scalar("sft/loss", loss.item(), step)
    print(f"SFT: {args.sft_steps} steps in {time.time() - start:.1f}s, final loss {loss.item():.3f}")
    return model


def preference_pairs(num_pairs: int, rng: random.Random):
    """Pairs of grammar sentences; which one is "chosen" is drawn from the Bradley-Terry model
    P(a preferred to b) = sigmoid(gold(a) - gold(b)), so preferences are noisy like human ones.

    Only valid sentences are ever compared: the reward model has no data about broken text.
    Returns (chosen, rejected) word lists.
    """
    chosen, rejected = [], []
    for _ in range(num_pairs):
        a, b = sample_sentence(rng), sample_sentence(rng)
        p_a = 1.0 / (1.0 + math.exp(gold_score(b) - gold_score(a)))
        if rng.random() >= p_a:
            a, b = b, a
        chosen.append(a)
        rejected.append(b)
    return chosen, rejected


def train_reward_model(args: Args, sft: LanguageModel, device, writer) -> ScalarModel:
    """Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022, eq. 1).

    The trunk starts from the SFT model (as in InstructGPT); the head is a fresh scalar layer.
    Reports the accuracy against the noise-free gold order on held-out pairs.
    """
    rng = random.Random(args.seed + 1)
    chosen, rejected = preference_pairs(args.rm_num_pairs, rng)
    model = ScalarModel(sft.config, head_std=1.0 / math.sqrt(sft.config.n_embd + 1)).to(device)
    model.trunk.load_state_dict(sft.trunk.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rm_learning_rate, weight_decay=0.01)
    start, step = time.time(), 0
    for _ in range(args.rm_epochs):
        order = list(range(args.rm_num_pairs))
        rng.shuffle(order)
        for i in range(0, args.rm_num_pairs - args.rm_batch_size + 1, args.rm_batch_size):
            idx = order[i : i + args.rm_batch_size]
            tokens, mask = sentence_batch([chosen[j] for j in idx] + [rejected[j] for j in idx], device)
            scores = reward_model_score(model, tokens, mask, normalize=False)
            score_chosen, score_rejected = scores.chunk(2)
            loss = -F.logsigmoid(score_chosen - score_rejected).mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 20 == 0:
                writer.add_scalar("reward_model/loss", loss.item(), step)
            step += 1
    accuracy = reward_model_accuracy(model, random.Random(args.seed + 2), device)
    writer.add_scalar("reward_model/heldout_accuracy", accuracy, step)
    print(
        f"reward model: {step} steps in {time.time() - start:.1f}s, held-out accuracy "
        f"{accuracy:.1%} (pairs with different gold scores)"
    )
    return model


@torch.no_grad()
def fit_reward_normalization(reward_model: ScalarModel, sft: LanguageModel, args: Args, device) -> None:
    """Normalize on SFT samples so the SFT policy scores mean 0, std 1 (Ziegler et al.)."""
    reward_model.score_mean.zero_()
    reward_model.score_std.fill_(1.0)
    prompts = make_prompts(1024, args.max_prompt_words, random.Random(args.seed + 3))
    raw = collect_rollout(sft, sft, reward_model, prompts, args, device)["raw_scores"]
    reward_model.score_mean.copy_(raw.mean())
    reward_model.score_std.copy_(raw.std())


# ==== PLUMBING: below this line nothing changes what PPO computes ====


class ConfigError(ValueError):
    """Bad input (flags, checkpoint, a run folder that cannot be written): main() prints it as one line and
    exits with code 2."""


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the policy's outputs became NaN or infinite: the run stops (exit code 1) and keeps
    its last good checkpoint."""


class StorageError(RuntimeError):
    """Writing the checkpoint, summary.json or the TensorBoard events failed (disk full, folder gone): the run stops
    with one line and exit code 1 (a failed run, as a diverged one), keeping what was saved before."""


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
    """Everything around the pipeline for one training run, used as `with Run(args) as run:`.

    It owns the run folder, TensorBoard (and W&B with --track), the progress line, the time split,
    the checkpoints (sft.pt and reward_model.pt from the stages; policy.pt at the end, on Ctrl-C / SIGTERM /
    SIGHUP or a failed write, and the last good policy after a divergence), the evaluations and summary.json,
    the dict train() returns. A signal anywhere inside the block (or a closed stdout, as SIGPIPE) saves the
    policy (if PPO had begun and not finished), writes the summary and returns normally; signals that come during
    that save are held (see _on_signal). A failed write (StorageError) or a divergence (TrainingDiverged) writes
    the summary too and is raised again as one line.
    """

    def __init__(self, args: Args):
        validate_args(args)
        self.given = load_given_checkpoints(args)  # {stage: (model, metadata)}, checked before any stage trains
        self.args = args
        seed_everything(args.seed, args.torch_deterministic)
        self.device = select_device(args)
        self.dir = make_run_dir(args.runs_dir, f"{args.exp_name}__{args.seed}__{int(time.time())}")
        check_writable(self.dir)
        self.checkpoint_path = self.dir / "policy.pt"
        self.iteration = 0
        self.sampling_time = self.update_time = 0.0
        self.sampled_tokens = self.updated_tokens = 0
        self.status, self.stopped_by, self.training_done, self.summary = "completed", None, False, {}
        self.error = None  # the OSError or TrainingDiverged that stopped the run
        if args.track:
            start_wandb(args, self.dir)
        self.writer = SummaryWriter(str(self.dir))
        hyperparameters = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")

    def __enter__(self) -> Run:
        self.signals, self.stopping, self.saving_on_stop, self.previous_handlers = [], False, False, {}
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self.previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        self.previous_excepthook, threading.excepthook = threading.excepthook, self._on_thread_error
        self.start_time = self.last_print = time.time()
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

    def begin_ppo(self, policy, reference, reward_model, kl_controller) -> None:
        """Register what PPO trains and reads (policy.pt saves the policy); evaluate the SFT policy."""
        self.model = (policy, reference, reward_model, kl_controller)
        # The newest weights, and the newest that a rollout has sampled from without NaN: put back on a divergence.
        self.newest_policy = self.last_good_policy = copy.deepcopy(policy.state_dict())
        eval_rng = random.Random(self.args.seed + 5)
        self.eval_prompts = make_prompts(self.args.eval_prompts, self.args.max_prompt_words, eval_rng)
        evaluation = self.evaluate_policy(0)
        self.summary.update(history=[], sft={k: v for k, v in evaluation.items() if k != "texts"},
                            samples_before=evaluation["texts"][: self.args.num_sample_texts])  # fmt: skip
        print_eval("SFT policy (before PPO)", evaluation, self.args.num_sample_texts)
        self.ppo_start = time.time()

    def log(self, iteration: int, batch: dict, rollout_stats: dict, stats: dict) -> None:
        """Check the update, then log the iteration's scalars under the tags of the RLHF references
        (objective/, losses/, charts/); evaluate every --eval-interval iterations."""
        policy, _, _, kl_controller = self.model
        step = iteration * self.args.batch_size  # the x axis: responses sampled so far
        self.last_good_policy = self.newest_policy  # this iteration's rollout sampled from it without NaN
        if not math.isfinite(stats["loss"]) or not weights_are_finite(policy):
            raise TrainingDiverged(f"the loss became NaN or infinite at iteration {iteration} (episode {step:,})")
        self.newest_policy = copy.deepcopy(policy.state_dict())
        self.iteration = iteration
        # The time split: sampling is generate() itself; the update (advantages included) runs from the end
        # of the collection to now.
        self.sampling_time += batch["sampling_time"]
        self.update_time += time.perf_counter() - batch["collected_at"]
        self.sampled_tokens += self.args.batch_size * self.args.response_length
        self.updated_tokens += batch["query_responses"].numel() * stats["epochs"]
        quality = text_metrics(batch)
        record = {"iteration": iteration, "episode": step, **rollout_stats,
                  "gold": quality["gold"], "gold_valid": quality["gold_valid"], "validity": quality["validity"],
                  "eos_rate": quality["eos_rate"], "response_length": quality["response_length"],
                  "beta": kl_controller.value,
                  # max |ratio - 1| on the update's first minibatch: 0 unless rollout and update disagree
                  "first_minibatch_ratio_deviation": stats["first_minibatch_ratio_deviation"]}  # fmt: skip
        self.summary["history"].append(record)
        write = self.writer.add_scalar
        for key in ("score", "kl", "kl_exact", "non_score_reward", "entropy", "gold", "gold_valid", "validity"):
            if record[key] is not None:
                write(f"objective/{key}", record[key], step)
        write("objective/rlhf_reward", record["score"] + record["non_score_reward"], step)
        for key in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
            write(f"losses/{key}", stats[key], step)  # averages over all minibatches
        write("losses/first_minibatch_ratio_deviation", record["first_minibatch_ratio_deviation"], step)
        write("charts/beta", record["beta"], step)
        write("charts/learning_rate", stats["learning_rate"], step)
        write("charts/eos_rate", record["eos_rate"], step)
        write("charts/response_length", record["response_length"], step)
        write("charts/update_epochs", stats["epochs"], step)
        write("charts/sampling_tokens_per_s", self.sampled_tokens / self.sampling_time, step)
        write("charts/update_tokens_per_s", self.updated_tokens / self.update_time, step)
        first_or_last = self.last_print == self.start_time or iteration == self.args.num_iterations
        if first_or_last or time.time() - self.last_print >= 10:
            self.last_print = time.time()
            try:
                print(self.progress_line(record), flush=True)
            except BrokenPipeError:  # stdout's reader is gone (`| head`, a `less` that quit): stop as SIGHUP does
                self.stopping, self.stopped_by = True, "SIGPIPE"  # exit code 141, as a shell reports SIGPIPE's
                raise KeyboardInterrupt from None
        if iteration % self.args.eval_interval == 0 and iteration != self.args.num_iterations:
            self.evaluate_policy(step)

    def progress_line(self, record: dict) -> str:
        elapsed = time.time() - self.ppo_start
        eta = format_duration(elapsed / self.iteration * (self.args.num_iterations - self.iteration))
        return (
            f"iteration {self.iteration:>3}/{self.args.num_iterations} | {format_duration(elapsed)} ETA {eta} | "
            f"score {record['score']:+.2f} gold {record['gold']:+.2f} valid {record['validity']:.0%} | KL "
            f"{record['kl']:.2f} beta {record['beta']:.3f} | first-minibatch |ratio-1| "
            f"{record['first_minibatch_ratio_deviation']:.2g}"
        )

    def evaluate_policy(self, step: int) -> dict:
        """Evaluate the policy on the held-out prompts (one response each); log it under eval/ at x = step."""
        policy, reference, reward_model, _ = self.model
        evaluation = evaluate(policy, reference, reward_model, self.eval_prompts, self.args, self.device)
        for key, value in evaluation.items():
            if key != "texts" and value is not None:
                self.writer.add_scalar(f"eval/{key}", value, step)
        return evaluation

    def save(self) -> None:
        """Write policy.pt (with the run's settings, for --eval-checkpoint), never from NaN or infinite weights or
        next-token probabilities (TrainingDiverged): the probe is the held-out prompts' first forward pass."""
        policy = self.model[0]
        check_finite("the weights", *policy.parameters())
        check_policy(policy, *(t.to(self.device) for t in left_pad(self.eval_prompts)))
        save_checkpoint(self.checkpoint_path, policy, "policy", {"args": asdict(self.args)})

    def finish(self) -> None:
        """Save the final policy, then evaluate it on the held-out prompts."""
        self.save()
        self.training_done, self.training_end = True, time.time()  # wall time: training only
        evaluation = self.evaluate_policy(self.iteration * self.args.batch_size)
        self.summary.update(
            final={k: v for k, v in evaluation.items() if k != "texts"},
            samples_after=evaluation["texts"][: self.args.num_sample_texts], final_beta=self.model[3].value,
            sampling_tokens_per_s=self.sampled_tokens / self.sampling_time,
            update_tokens_per_s=self.updated_tokens / self.update_time, ppo_time_s=time.time() - self.ppo_start,
        )  # fmt: skip
        self.writer.add_text("samples/before", "\n\n".join(self.summary["samples_before"]), 0)
        self.writer.add_text("samples/after", "\n\n".join(self.summary["samples_after"]), self.iteration)
        print_eval("policy after PPO", evaluation, self.args.num_sample_texts)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.stopping = True  # from here on signals are held (_on_signal)
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
            where = "in the final evaluation" if self.training_done else f"at iteration {self.iteration}"
            aborted = f" ({self.summary['save_aborted']})" if "save_aborted" in self.summary else ""
            with contextlib.suppress(BrokenPipeError):  # no reader left (a `tee` ended by the Ctrl-C): dropped
                print(f"interrupted ({self.stopped_by}) {where}; checkpoint: {self.saved_checkpoint()}{aborted}")
        if isinstance(self.error, TrainingDiverged):
            raise TrainingDiverged(self.error_message()) from None
        if self.error is not None:
            raise StorageError(self.error_message()) from None
        if self.status == "completed" and exc_type is None:
            s, duration = self.summary, format_duration(self.summary["wall_time_s"])
            with contextlib.suppress(BrokenPipeError):  # the run is complete; a gone reader changes nothing
                print(f"done: {s['episodes']:,} responses in {duration}; "
                      f"sampling {s['sampling_tokens_per_s']:,.0f} tokens/s, "
                      f"update {s['update_tokens_per_s']:,.0f} tokens/s | {self.dir}")  # fmt: skip
        return exc_type is KeyboardInterrupt  # handled: train() returns the summary

    def save_on_stop(self) -> None:
        """After a signal, a divergence or a failed write, save the policy: after a divergence the last one a
        rollout sampled from without NaN. A third signal abandons this save, and the summary says so."""
        stop_saves = self.status in ("interrupted", "diverged") or isinstance(self.error, OSError)
        if not stop_saves or not hasattr(self, "model") or self.training_done:
            return
        if self.status == "diverged":
            self.model[0].load_state_dict(self.last_good_policy)
        self.saving_on_stop = True
        try:
            self.save()
        except KeyboardInterrupt:
            self.summary["save_aborted"] = "a third signal stopped saving the policy; kept: nothing"
        finally:
            self.saving_on_stop = False

    def flush_logs(self) -> None:
        """Write the TensorBoard events out; raises the error of TensorBoard's writer thread, if it had one."""
        self.writer.flush()

    def write_summary(self) -> None:
        """summary.json: the final figures (the dict train() returns), written atomically as the checkpoints."""
        wall_time = (self.training_end if self.training_done else time.time()) - self.start_time
        self.summary = {
            "script": SCRIPT_NAME, "seed": self.args.seed, "status": self.status,
            "advantage_estimator": self.args.advantage_estimator, "kl_coef": self.args.kl_coef,
            "iterations": self.iteration, "episodes": self.iteration * self.args.batch_size, "wall_time_s": wall_time,
            "run_dir": str(self.dir), "checkpoint": self.saved_checkpoint(), **self.summary,
        }  # fmt: skip
        if self.stopped_by:
            self.summary["stopped_by"] = self.stopped_by
        if self.error is not None:
            self.summary["error"] = self.error_message()
        write_atomically(self.dir / "summary.json", lambda f: f.write(json.dumps(self.summary, indent=2).encode()))

    def error_message(self) -> str:
        """One line: what went wrong, where, and which policy is kept."""
        saved = self.saved_checkpoint()
        if isinstance(self.error, OSError):  # the file the OS names, else the folder all the writes go to
            kept = f"the policy is kept in {saved}" if saved else "nothing saved"
            where = os.fsdecode(self.error.filename or self.dir)  # TensorBoard names its file in bytes
            return f"cannot write {where}: {self.error.strerror or self.error}; {kept}"
        kept = f"the policy before that update is kept in {saved}" if saved else "nothing saved"
        return f"{self.error}; stopped, {kept}"

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


def weights_are_finite(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())  # one host sync


def text_metrics(batch: dict) -> dict:
    """Exact quality of sampled text: validity, gold score, EOS rate, length, distinct-2, and texts.

    gold_valid is the gold score of the valid responses alone (None if there is none): every invalid
    text scores GOLD_INVALID, so "gold" mixes the quality of good text with how much text stops being good.
    """
    texts, valid, gold, bigrams, num_bigrams = [], [], [], set(), 0
    for row, ended in zip(batch["query_responses"].tolist(), batch["has_eos"].tolist(), strict=True):
        words = decode(row)
        texts.append(" ".join(words) + ("" if ended else " [no EOS]"))
        valid.append(ended and is_valid(words))
        gold.append(gold_score(words, ended))
        pairs = list(zip(words[:-1], words[1:], strict=True))
        bigrams.update(pairs)
        num_bigrams += len(pairs)
    n = len(texts)
    return {
        "validity": sum(valid) / n,
        "gold": sum(gold) / n,
        "gold_valid": sum(g for g, v in zip(gold, valid, strict=True) if v) / sum(valid) if any(valid) else None,
        "eos_rate": batch["has_eos"].float().mean().item(),
        "response_length": batch["response_mask"].sum(1).float().mean().item(),
        "distinct_2": len(bigrams) / max(num_bigrams, 1),
        "texts": texts,
    }


def evaluate(policy, reference, reward_model, prompts, args: Args, device) -> dict:
    """Proxy and gold reward, validity, EOS rate, length, distinct-2 and KL (k1, k3, exact) to the
    reference, on a fixed set of held-out prompts (one response each)."""
    batch = collect_rollout(policy, reference, reward_model, prompts, args, device)
    mask = batch["response_mask"]
    per_response = lambda x: (x * mask).sum(1).mean().item()  # noqa: E731 (nats per response)
    return {
        "proxy": batch["scores"].mean().item(),
        **text_metrics(batch),
        "kl_k1": per_response(kl_per_token(batch["logprobs"], batch["ref_logprobs"], "k1")),
        "kl_k3": per_response(kl_per_token(batch["logprobs"], batch["ref_logprobs"], "k3")),
        "kl_exact": per_response(batch["exact_kl"]),
    }


def print_eval(title: str, metrics: dict, num_texts: int) -> None:
    print(
        f"{title}: proxy {metrics['proxy']:+.2f} | gold {metrics['gold']:+.2f} (valid ones "
        f"{metrics['gold_valid'] if metrics['gold_valid'] is not None else float('nan'):+.2f}) | valid "
        f"{metrics['validity']:.1%} | EOS {metrics['eos_rate']:.1%} | length "
        f"{metrics['response_length']:.1f} | distinct-2 {metrics['distinct_2']:.2f} | KL k1 "
        f"{metrics['kl_k1']:.2f} k3 {metrics['kl_k3']:.2f} exact {metrics['kl_exact']:.2f}"
    )
    for text in metrics["texts"][:num_texts]:
        print(f"    {text}")


@torch.no_grad()
def reward_model_accuracy(model: ScalarModel, rng: random.Random, device, num_pairs: int = 1000):
    """The fraction of fresh pairs with different gold scores that the reward model orders right."""
    a = [sample_sentence(rng) for _ in range(num_pairs)]
    b = [sample_sentence(rng) for _ in range(num_pairs)]
    scores = reward_model_score(model, *sentence_batch(a + b, device), normalize=False)
    gold_diff = torch.tensor([gold_score(x) - gold_score(y) for x, y in zip(a, b, strict=True)], device=device)
    score_diff = scores[:num_pairs] - scores[num_pairs:]
    decided = gold_diff != 0
    return ((score_diff * gold_diff > 0) & decided).sum().item() / max(decided.sum().item(), 1)


def normalization_key(sft: LanguageModel, args: Args) -> dict:
    """What the reward model's normalization depends on: the SFT model (a hash of its weights) and
    the settings it samples with. Saved with the reward model, compared when it is reused."""
    digest = hashlib.sha256()
    for name, tensor in sft.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"sft_sha256": digest.hexdigest()[:16], "temperature": args.temperature,
            "response_length": args.response_length, "max_prompt_words": args.max_prompt_words}  # fmt: skip


def save_checkpoint(path: Path, model: nn.Module, stage: str, metadata: dict | None = None) -> None:
    """One stage's weights with the model shape (and metadata) in one file.

    Written to a temporary file and renamed, so an interrupted save never destroys the last one.
    """
    checkpoint = {"script": SCRIPT_NAME, "stage": stage, "config": asdict(model.config),
                  "model": model.state_dict(), "metadata": metadata or {}}  # fmt: skip
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


def check_policy(policy: LanguageModel, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """The first forward pass of each rollout, checked: the next-token probabilities after the prompts (B, P).
    Weights that exploded give NaN there even while they are finite, and torch.multinomial would fail on them."""
    with torch.no_grad():
        logits, _ = policy(tokens, mask)
    check_finite("the next-token probabilities", logits[:, -1].log_softmax(-1))


# What a checkpoint holds: the stage's model, its shape and the stage's name.
CHECKPOINT_KEYS = {"stage", "config", "model"}


def load_checkpoint(path: str, stage: str, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint of this script's `stage` into model (the flags' shape), or into a model of the shape
    saved with it (model None); returns the model and its metadata."""
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
    if checkpoint.get("stage") != stage:
        raise ConfigError(f"{path} holds the {checkpoint.get('stage')} model, not the {stage} model")
    if model is None:
        config = ModelConfig(**checkpoint["config"])
        model = ScalarModel(config, head_std=0.0) if stage == "reward_model" else LanguageModel(config)
    if checkpoint["config"] != asdict(model.config):
        raise ConfigError(
            f"{path} has model shape {checkpoint['config']}, but the flags ask for {asdict(model.config)}"
        )
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint.get("metadata", {})


def load_given_checkpoints(args: Args) -> dict:
    """Load every checkpoint given on the command line before any stage trains, so a bad one is
    rejected at once. Returns {stage: (model on the CPU, metadata)} for the given ones."""
    config = ModelConfig.from_args(args)
    given = {}
    if args.sft_checkpoint:
        given["sft"] = load_checkpoint(args.sft_checkpoint, "sft", LanguageModel(config))
    if args.reward_model_checkpoint:
        reward_model = ScalarModel(config, head_std=1.0 / math.sqrt(args.n_embd + 1))
        given["reward_model"] = load_checkpoint(args.reward_model_checkpoint, "reward_model", reward_model)
    return given


def evaluate_checkpoint(path: str, args: Args) -> dict:
    """--eval-checkpoint: a saved policy.pt sampled on the held-out prompts of its run (seed + 5) with the run's
    sampling settings, scored by the reward model and compared with the SFT model (the reference) of its run
    folder, or those given by --reward-model-checkpoint / --sft-checkpoint. Returns evaluate()'s metrics."""
    folder, device = Path(path).parent, select_device(args)
    policy, metadata = load_checkpoint(path, "policy")
    reference, _ = load_checkpoint(args.sft_checkpoint or str(folder / "sft.pt"), "sft")
    reward_model, _ = load_checkpoint(args.reward_model_checkpoint or str(folder / "reward_model.pt"), "reward_model")
    sampling = ("response_length", "temperature", "max_prompt_words", "missing_eos_penalty")
    run_args = replace(args, **{k: v for k, v in metadata.get("args", {}).items() if k in sampling})
    torch.manual_seed(args.seed)
    prompts = make_prompts(args.eval_prompts, run_args.max_prompt_words, random.Random(args.seed + 5))
    models = [model.to(device).eval().requires_grad_(False) for model in (policy, reference, reward_model)]
    return evaluate(*models, prompts, run_args, device)


def require_module(module: str, purpose: str) -> None:
    """Fail early with the install command when an optional package is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: pip install {module}") from None


def validate_args(args: Args) -> None:
    """Reject a setting from which nothing sensible can follow, with one line, before anything is built."""
    counts = (
        "total_episodes", "num_prompts", "samples_per_prompt", "max_prompt_words", "response_length",
        "num_minibatches", "update_epochs", "n_layer", "n_head", "n_embd", "block_size", "sft_corpus_size",
        "sft_batch_size", "rm_num_pairs", "rm_epochs", "rm_batch_size", "eval_interval", "eval_prompts",
    )  # fmt: skip
    for name in (*counts, "num_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    rollout = f"num_prompts * samples_per_prompt = {args.batch_size}"
    estimator, shortest, longest = (
        args.advantage_estimator,
        MIN_SENTENCE_WORDS,
        1 + args.max_prompt_words + args.response_length,
    )
    checks = [
        (args.learning_rate > 0, f"--learning-rate must be positive, got {args.learning_rate}"),
        (args.sft_learning_rate > 0, f"--sft-learning-rate must be positive, got {args.sft_learning_rate}"),
        (args.rm_learning_rate > 0, f"--rm-learning-rate must be positive, got {args.rm_learning_rate}"),
        (args.temperature > 0, f"--temperature must be positive, got {args.temperature}"),
        (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must lie in [0, 1]"),
        (args.clip_coef > 0, f"--clip-coef must be positive, got {args.clip_coef}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be positive (0 freezes the policy), got {args.max_grad_norm}"),
        (args.ent_coef >= 0 and args.vf_coef >= 0, "--ent-coef and --vf-coef must not be negative"),
        (args.target_kl is None or args.target_kl > 0, f"--target-kl must be positive when set, got {args.target_kl}"),
        (0 <= args.seed < 2**32, f"--seed must lie in [0, 2**32), got {args.seed}"),
        (args.batch_size % args.num_minibatches == 0,
         f"the rollout ({rollout}) does not divide into {args.num_minibatches} minibatches"),
        (args.total_episodes >= args.batch_size,
         f"--total-episodes {args.total_episodes} is smaller than one rollout ({rollout})"),
        (args.num_sample_texts >= 0, f"--num-sample-texts must not be negative, got {args.num_sample_texts}"),
        (args.sft_checkpoint or args.sft_steps >= 1, f"--sft-steps must be at least 1, got {args.sft_steps}"),
        (args.sft_checkpoint or args.sft_batch_size <= args.sft_corpus_size, f"--sft-batch-size {args.sft_batch_size} "
         f"is larger than the corpus (--sft-corpus-size {args.sft_corpus_size})"),
        (args.reward_model_checkpoint or args.rm_num_pairs >= args.rm_batch_size, f"--rm-num-pairs {args.rm_num_pairs} "
         f"is smaller than --rm-batch-size {args.rm_batch_size}: the reward model would train for 0 steps"),
        (args.n_embd % args.n_head == 0, f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}"),
        (args.max_prompt_words < shortest, f"--max-prompt-words {args.max_prompt_words} lets a prompt be a whole "
         f"sentence (the shortest has {shortest} words): use at most {shortest - 1}"),
        (args.response_length >= shortest, f"--response-length {args.response_length} is too short to finish a "
         f"sentence: after a 1-word prompt the shortest needs {shortest - 1} words and EOS ({shortest} tokens)"),
        (longest <= args.block_size, f"a prompt of up to {args.max_prompt_words} words plus BOS and a response of "
         f"{args.response_length} tokens ({longest} tokens) do not fit the context of --block-size {args.block_size}"),
        (args.block_size >= MAX_SENTENCE_TOKENS,
         f"the longest grammar sentence needs {MAX_SENTENCE_TOKENS} tokens, more than --block-size {args.block_size}"),
        (args.kl_coef >= 0, f"--kl-coef must not be negative, got {args.kl_coef}"),
        (estimator in ("gae", "grpo", "rloo"), f"unknown --advantage-estimator {estimator!r}: use gae, grpo or rloo"),
        (args.kl_estimator in ("k1", "k3"), f"unknown --kl-estimator {args.kl_estimator!r}: use k1 or k3"),
        (estimator == "gae" or args.samples_per_prompt >= 2, f"--advantage-estimator {estimator} needs "
         "--samples-per-prompt of at least 2 (its baseline is the other samples of the same prompt)"),
        (estimator == "gae" or not args.whiten_rewards,
         "--whiten-rewards whitens per-token rewards before GAE: use it with gae"),
        (not args.adaptive_kl or (args.kl_target > 0 and args.kl_horizon >= 1 and args.kl_coef > 0),
         "--adaptive-kl needs a positive --kl-target, --kl-horizon and starting --kl-coef"),
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
    torch.set_num_threads(args.num_threads)
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
    """tyro's command line, with a mistyped flag or a bad value as one line."""
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
            print_eval(args.eval_checkpoint, evaluate_checkpoint(args.eval_checkpoint, args), args.num_sample_texts)
            return
        summary = train(args)
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
