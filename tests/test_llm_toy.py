"""Tests of ppo_llm_toy.py: the toy language, padding, KL, rewards, GAE, the PPO update, the whole
pipeline on a quick configuration, and bad input. All on CPU, tiny models."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ppo_llm_toy as toy  # noqa: E402

TINY = toy.ModelConfig(len(toy.VOCAB), block_size=24, n_layer=2, n_head=2, n_embd=32)


def words(text: str) -> list[str]:
    return text.split()


def quick_args(tmp_path: Path, **overrides) -> toy.Args:
    """A configuration that runs all three stages in seconds."""
    base = toy.Args(
        runs_dir=str(tmp_path), sft_steps=500, sft_corpus_size=4000, rm_num_pairs=2000,
        total_episodes=2560, num_prompts=16, samples_per_prompt=4, eval_prompts=128,
        eval_interval=10, num_sample_texts=2, cuda=False,
    )  # fmt: skip
    return replace(base, **overrides)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# THE TOY LANGUAGE


def test_validity_checker_on_hand_written_sentences():
    assert toy.is_valid(words("the cat sees the dog ."))
    assert toy.is_valid(words("the good happy cat loves the old red king ."))
    assert not toy.is_valid(words("the good good good cat loves the dog ."))  # 3 adjectives
    assert not toy.is_valid(words("the cat sees the dog"))  # no full stop
    assert not toy.is_valid(words("cat sees the dog ."))  # no article
    assert not toy.is_valid(words("the cat the dog ."))  # no verb
    assert not toy.is_valid(words("the cat sees the dog . the"))  # trailing words
    assert not toy.is_valid(words("the good good good cat good good cat ."))  # the hacked text
    assert not toy.is_valid([])


def test_gold_scorer_on_hand_written_sentences():
    assert toy.gold_score(words("the cat sees the dog .")) == 0.0
    assert toy.gold_score(words("the good happy cat loves the kind dog .")) == 4.0
    assert toy.gold_score(words("the sad cat hates the good dog .")) == -1.0
    assert toy.gold_score(words("the good good good cat loves the dog .")) == toy.GOLD_INVALID
    # a valid sentence that never ended (no EOS) is not a finished answer
    assert toy.gold_score(words("the cat sees the dog ."), ended=False) == toy.GOLD_INVALID


def test_grammar_samples_are_valid_and_tokenizer_round_trips():
    rng = random.Random(0)
    for _ in range(200):
        sentence = toy.sample_sentence(rng)
        assert toy.is_valid(sentence)
        ids = [toy.BOS, *toy.encode(sentence), toy.EOS, toy.PAD]
        assert toy.decode(ids) == sentence
    assert len({toy.PAD, toy.BOS, toy.EOS}) == 3
    # special tokens inside the text are not silently dropped: they make it invalid
    the, cat = toy.TOKEN_ID["the"], toy.TOKEN_ID["cat"]
    decoded = toy.decode([toy.PAD, toy.BOS, the, toy.BOS, cat, toy.PAD, toy.EOS, toy.PAD])
    assert decoded == ["the", "<bos>", "cat", "<pad>"]
    assert not toy.is_valid(decoded)


def test_text_metrics_report_the_gold_score_of_valid_responses_apart():
    texts = ["the kind cat loves the dog .", "the sad cat sees the dog .", "the good good good cat loves the dog ."]
    tokens, mask = toy.left_pad([[toy.BOS, *toy.encode(words(text)), toy.EOS] for text in texts])
    batch = {"query_responses": tokens, "response_mask": mask, "has_eos": torch.tensor([True, True, True])}
    metrics = toy.text_metrics(batch)
    assert metrics["validity"] == pytest.approx(2 / 3)
    assert metrics["gold"] == pytest.approx((2.0 - 1.0 + toy.GOLD_INVALID) / 3)
    assert metrics["gold_valid"] == pytest.approx(0.5)  # the invalid text does not count
    batch["has_eos"] = torch.tensor([False, False, False])  # nothing finished: no valid response
    assert toy.text_metrics(batch)["gold_valid"] is None


# PADDING, POSITIONS, KV CACHE


def test_left_pad_positions_and_masks():
    tokens, mask = toy.left_pad([[1, 5, 6], [1, 7]])
    assert tokens.tolist() == [[1, 5, 6], [toy.PAD, 1, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert toy.position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 1]]


def test_left_padded_batch_gives_the_same_logprobs_and_values_as_each_sequence_alone():
    policy, critic = toy.LanguageModel(TINY).eval(), toy.ScalarModel(TINY, head_std=1.0).eval()
    prompts = [[toy.BOS, 3], [toy.BOS, 3, 5, 6, 20]]
    responses = [[8, 9, toy.EOS], [10, toy.EOS, toy.PAD]]  # second response ends early
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    query, query_mask = toy.left_pad(prompts)
    tokens = torch.cat([query, torch.tensor(responses)], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    P = query.shape[1]
    temperature = 0.7
    with torch.no_grad():
        batch_logprobs = toy.logprobs_of(toy.response_logits(policy, tokens, mask, P, temperature), tokens[:, P:])
        batch_values = critic(tokens, mask)[:, P - 1 : -1]
    for i in range(2):
        n = int(response_mask[i].sum())
        alone = torch.tensor([prompts[i] + responses[i][:n]])
        alone_mask = torch.ones_like(alone)
        p = len(prompts[i])
        with torch.no_grad():
            logprobs = toy.logprobs_of(toy.response_logits(policy, alone, alone_mask, p, temperature), alone[:, p:])[0]
            values = critic(alone, alone_mask)[0, p - 1 : -1]
        torch.testing.assert_close(batch_logprobs[i, :n], logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch_values[i, :n], values, atol=1e-5, rtol=0)
    # and the padding really is there: without the mask the padded row's numbers change
    with torch.no_grad():
        unmasked = toy.logprobs_of(
            toy.response_logits(policy, tokens, torch.ones_like(mask), P, temperature),
            tokens[:, P:],
        )
    assert not torch.allclose(unmasked[0, :3], batch_logprobs[0, :3], atol=1e-6)  # row 0 is padded


def test_kv_cache_sampling_matches_full_forward_with_the_same_temperature():
    policy = toy.LanguageModel(TINY).eval()
    query, query_mask = toy.left_pad([[toy.BOS, 3], [toy.BOS, 3, 5, 6], [toy.BOS]])
    temperature = 0.6
    responses, sampling_logits = toy.generate(policy, query, query_mask, 6, temperature)
    tokens = torch.cat([query, responses], dim=1)
    mask = torch.ones_like(tokens)
    mask[:, : query.shape[1]] = query_mask
    with torch.no_grad():
        logits = toy.response_logits(policy, tokens, mask, query.shape[1], temperature)
    torch.testing.assert_close(logits, sampling_logits, atol=1e-5, rtol=0)


def test_sft_loss_counts_real_next_tokens_only():
    model = toy.LanguageModel(TINY).eval()
    sentences = [words("the cat sees the dog ."), words("the good happy cat loves the old red king .")]
    tokens, mask = toy.sentence_batch(sentences, "cpu")
    assert (mask == 0).any()  # the short sentence is left-padded
    losses = []
    for sentence in sentences:  # each sentence alone: predict every token after BOS, EOS included
        alone = torch.tensor([[toy.BOS, *toy.encode(sentence), toy.EOS]])
        logits, _ = model(alone, torch.ones_like(alone))
        losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], alone[0, 1:], reduction="none"))
    with torch.no_grad():
        torch.testing.assert_close(toy.sft_loss(model, tokens, mask), torch.cat(losses).mean())


# KL


def test_exact_kl_is_nonnegative_and_zero_against_itself():
    logits = torch.randn(4, 5, len(toy.VOCAB))
    other = torch.randn(4, 5, len(toy.VOCAB))
    assert (toy.exact_kl(logits, other) >= 0).all()
    assert toy.exact_kl(logits, logits).abs().max() == 0
    # a frozen copy of the policy (the reference at the start of PPO) is at KL 0
    policy = toy.LanguageModel(TINY).eval()
    reference = toy.LanguageModel(TINY).eval()
    reference.load_state_dict(policy.state_dict())
    tokens, mask = toy.left_pad([[toy.BOS, 3, 5, 6, 7], [toy.BOS, 3, 8]])
    with torch.no_grad():
        kl = toy.exact_kl(
            toy.response_logits(policy, tokens, mask, 2, 1.3),
            toy.response_logits(reference, tokens, mask, 2, 1.3),
        )
    assert kl.abs().max() == 0


def test_k3_is_nonnegative_while_k1_is_not():
    logprobs, ref_logprobs = -torch.rand(1000) * 3, -torch.rand(1000) * 3
    k1 = toy.kl_per_token(logprobs, ref_logprobs, "k1")
    k3 = toy.kl_per_token(logprobs, ref_logprobs, "k3")
    assert (k3 >= 0).all()
    assert (k1 < 0).any()
    assert toy.kl_per_token(logprobs, logprobs, "k3").abs().max() == 0


# PER-TOKEN REWARDS, TRUNCATION, EOS PENALTY


def test_truncation_after_the_first_eos():
    E, P = toy.EOS, toy.PAD
    responses = torch.tensor([[5, E, 6, E], [E, 7, 8, 9], [5, 6, 7, 8]])
    cut, mask, has_eos = toy.truncate_after_eos(responses)
    assert cut.tolist() == [[5, E, P, P], [E, P, P, P], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_missing_eos_penalty_only_without_eos():
    scores = torch.tensor([1.0, 2.0, 3.0])
    has_eos = torch.tensor([True, False, True])
    assert toy.apply_missing_eos_penalty(scores, has_eos, 0.5).tolist() == [1.0, 1.5, 3.0]


def test_score_lands_on_the_last_real_token_and_nothing_on_padding():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])  # 9.0 = garbage on padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards = toy.per_token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_reward_model_reads_the_last_real_token():
    reward_model = toy.ScalarModel(TINY, head_std=1.0).eval()
    sentence = [toy.BOS, *toy.encode(words("the cat sees the dog .")), toy.EOS]
    alone = torch.tensor([sentence])
    padded = torch.tensor([[toy.PAD, toy.PAD, *sentence, toy.PAD]])  # left and right padding
    padded_mask = (torch.arange(padded.shape[1]) >= 2) & (torch.arange(padded.shape[1]) < 2 + len(sentence))
    with torch.no_grad():
        score_alone = toy.reward_model_score(reward_model, alone, torch.ones_like(alone))
        score_padded = toy.reward_model_score(reward_model, padded, padded_mask.long()[None])
        per_position = reward_model(alone, torch.ones_like(alone))
    torch.testing.assert_close(score_padded, score_alone, atol=1e-5, rtol=0)
    assert score_alone.item() == per_position[0, -1].item()


# ADVANTAGES


def test_gae_gamma_one_against_a_hand_computed_case():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after 2 tokens
    advantages, returns = toy.compute_gae(rewards, values, mask, gamma=1.0, gae_lambda=0.95)
    # row 1: delta = (-0.3, -0.1, 0.9); A2 = 0.9, A1 = -0.1 + 0.95 * 0.9, A0 = -0.3 + 0.95 * A1
    a1 = -0.1 + 0.95 * 0.9
    # row 2: delta = (0.1, 1.6); the padded token is outside the episode
    expected = torch.tensor([[-0.3 + 0.95 * a1, a1, 0.9], [0.1 + 0.95 * 1.6, 1.6, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    # lambda = 1: the advantage is the sum of the remaining rewards minus V
    advantages, _ = toy.compute_gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.9], [1.7, 1.6, 0.0]]), atol=1e-6, rtol=0)


def test_masked_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    garbage = x.clone()
    garbage[mask == 0] = 1000.0
    whitened = toy.masked_whiten(x, mask)
    torch.testing.assert_close(toy.masked_whiten(garbage, mask), whitened)
    valid = whitened[mask == 1]
    assert abs(valid.mean().item()) < 1e-6
    assert abs(valid.var(unbiased=False).item() - 1.0) < 1e-4
    assert (whitened[mask == 0] == 0).all()
    # shift_mean=False (--whiten-rewards) keeps the mean and brings the std to 1: (x - mean) / std + mean
    kept = toy.masked_whiten(x, mask, shift_mean=False)[mask == 1]
    assert abs(kept.mean().item() - x[mask == 1].mean().item()) < 1e-5
    assert abs(kept.var(unbiased=False).item() - 1.0) < 1e-4


def test_group_relative_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 10.0, 10.0])  # 2 prompts x 4 samples
    rloo = toy.group_advantages(rewards, 4, "rloo")
    # R_i minus the mean of the 3 others: 1 - (2 + 3 + 6) / 3, ...
    torch.testing.assert_close(rloo[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))
    assert (rloo[4:] == 0).all()  # identical samples: no signal
    grpo = toy.group_advantages(rewards, 4, "grpo")
    group = rewards[:4]
    torch.testing.assert_close(grpo[:4], (group - group.mean()) / (group.std() + 1e-8))
    assert (grpo[4:] == 0).all()


def group_batch(scores: list[float], lengths: list[int], max_length: int = 10) -> dict:
    """A sampled batch as collect_rollout returns it, with the given scores and response lengths
    and the policy equal to the reference (KL 0)."""
    batch_size = len(scores)
    response_mask = (torch.arange(max_length)[None] < torch.tensor(lengths)[:, None]).long()
    responses = torch.where(response_mask == 1, toy.TOKEN_ID["cat"], toy.PAD)
    query = torch.full((batch_size, 2), toy.BOS)
    logprobs = -torch.rand(batch_size, max_length)
    return {
        "query_responses": torch.cat([query, responses], dim=1),
        "attention_mask": torch.cat([torch.ones_like(query), response_mask], dim=1),
        "prompt_length": 2, "responses": responses, "response_mask": response_mask,
        "scores": torch.tensor(scores), "logprobs": logprobs, "ref_logprobs": logprobs.clone(),
        "exact_kl": torch.zeros(batch_size, max_length), "entropy": torch.zeros(batch_size, max_length),
    }  # fmt: skip


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantage_is_the_same_on_every_token_and_its_sign_ignores_length(estimator):
    args = toy.Args(num_prompts=2, samples_per_prompt=4, advantage_estimator=estimator)
    # group 1 is tied: no signal whatever the lengths; in group 2 the better responses are the short
    # ones in one pair and the long ones in the other
    scores = [1.0, 1.0, 1.0, 1.0, 2.0, -1.0, 0.5, -0.5]
    lengths = [1, 10, 3, 10, 1, 10, 10, 1]
    rollout, _ = toy.compute_advantages(group_batch(scores, lengths), None, 0.1, args)
    expected = toy.group_advantages(torch.tensor(scores), 4, estimator)
    mask = rollout.response_mask
    assert (rollout.advantages[:4] == 0).all()  # a tied group: advantage 0 on every token
    assert (rollout.advantages[mask == 0] == 0).all()
    for i in range(8):
        torch.testing.assert_close(rollout.advantages[i, : lengths[i]], expected[i].expand(lengths[i]))
    signs = torch.sign(rollout.advantages[4:, 0]).tolist()
    assert signs == [1.0, -1.0, 1.0, -1.0]  # the sign follows R_i - mean(R), not the length


# THE PPO UPDATE


def tiny_rollout(estimator: str):
    args = toy.Args(
        num_prompts=8, samples_per_prompt=2, num_minibatches=4, update_epochs=2,
        advantage_estimator=estimator, temperature=0.8, learning_rate=1e-3,
    )  # fmt: skip
    policy = toy.LanguageModel(TINY)
    reference = toy.LanguageModel(TINY).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    reward_model = toy.ScalarModel(TINY, head_std=1.0).requires_grad_(False)
    critic = toy.ScalarModel(TINY, head_std=0.0) if estimator == "gae" else None
    prompts = toy.make_prompts(args.num_prompts, 3, random.Random(0))
    prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
    batch = toy.collect_rollout(policy, reference, reward_model, prompts, args, "cpu")
    rollout, _ = toy.compute_advantages(batch, critic, 0.1, args)
    return args, policy, critic, reference, rollout


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
def test_ratio_is_exactly_one_on_the_first_minibatch(estimator):
    args, policy, critic, reference, rollout = tiny_rollout(estimator)
    params = list(policy.parameters()) + ([] if critic is None else list(critic.parameters()))
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    reference_before = {k: v.clone() for k, v in reference.state_dict().items()}
    stats = toy.update_policy(policy, critic, optimizer, rollout, args)
    history = stats["minibatches"]
    # the update moved the policy but not the frozen reference
    for key, value in reference.state_dict().items():
        assert torch.equal(value, reference_before[key])
    assert not torch.equal(policy.lm_head.weight, reference.lm_head.weight)
    assert len(history) == args.update_epochs * args.num_minibatches
    first = history[0]
    assert first["ratio_max_deviation"] == 0.0
    assert first["approx_kl"] == 0.0 and first["old_approx_kl"] == 0.0
    assert first["clipfrac"] == 0.0
    # the later minibatches see a policy that has moved
    assert max(h["ratio_max_deviation"] for h in history[1:]) > 0
    assert stats["first_minibatch_ratio_deviation"] == 0.0 and stats["epochs"] == args.update_epochs


def test_value_head_starts_at_zero():
    critic = toy.ScalarModel(TINY, head_std=0.0)
    tokens, mask = toy.left_pad([[toy.BOS, 3, 5], [toy.BOS, 3]])
    assert critic(tokens, mask).abs().max() == 0


def test_clipped_loss_has_no_gradient_outside_the_clip_range():
    args = toy.Args(clip_coef=0.2, ent_coef=0.0, vf_coef=0.5)
    mask = torch.ones(1, 2)
    # token 0: ratio 1.5 with positive advantage (clipped, no gradient); token 1: ratio 1.0
    new = torch.tensor([[math_log(1.5), 0.0]], requires_grad=True)
    loss, stats = toy.ppo_loss(
        new, torch.zeros(1, 2), torch.zeros(1, 2), None, None, torch.ones(1, 2), None, mask, args
    )
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0
    assert stats["clipfrac"] == 0.5 and stats["value_loss"] == 0


def math_log(x: float) -> float:
    return float(torch.log(torch.tensor(x)))


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    controller = toy.AdaptiveKLController(0.2, target=1.0, horizon=100)
    # beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n = 10 responses:
    # KL 5.0 -> error +0.2 (clipped), 1.1 -> +0.1, 0.5 -> -0.2 (clipped), 0.0 -> -0.2, 1.0 -> 0
    expected = [0.2 * 1.02, 0.2 * 1.02 * 1.01, 0.2 * 1.02 * 1.01 * 0.98, 0.2 * 1.02 * 1.01 * 0.98 * 0.98]
    expected.append(expected[-1])
    betas = []
    for kl in (5.0, 1.1, 0.5, 0.0, 1.0):
        controller.update(current_kl=kl, num_responses=10)
        betas.append(controller.value)
    assert betas == pytest.approx(expected, rel=1e-12)
    # the case: KL at 10x the target for 100 iterations of 128 responses, horizon 10000
    controller = toy.AdaptiveKLController(0.2, target=1.0, horizon=10000)
    for _ in range(100):
        controller.update(current_kl=10.0, num_responses=128)
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 128 / 10000) ** 100) == pytest.approx(0.258, abs=1e-3)


# END TO END


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    return toy.train(quick_args(tmp_path)), tmp_path


def test_end_to_end_quick_run_learns_stays_valid_and_writes_everything(quick_run):
    summary, tmp_path = quick_run
    assert summary["status"] == "completed"
    sft, final = summary["sft"], summary["final"]
    assert sft["validity"] >= 0.9
    assert final["proxy"] > sft["proxy"] + 0.5  # the proxy reward rises
    assert final["gold"] > sft["gold"]  # and the gold reward with it
    assert final["validity"] >= 0.85  # the KL penalty keeps the text grammatical
    assert final["kl_exact"] > 0
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path
    for name in ("sft.pt", "reward_model.pt", "policy.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert len(summary["history"]) == summary["iterations"] == 2560 // 64
    assert summary["sampling_tokens_per_s"] > 0 and summary["update_tokens_per_s"] > 0


def test_tensorboard_tags(quick_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(quick_run[0]["run_dir"])
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for tag in (
        "objective/score", "objective/kl", "objective/kl_exact", "objective/gold",
        "objective/validity", "objective/gold_valid", "eval/gold_valid", "losses/policy_loss",
        "losses/value_loss", "losses/entropy",
        "losses/approx_kl", "losses/clipfrac", "charts/eos_rate", "charts/response_length",
        "eval/kl_k3", "eval/distinct_2", "charts/sampling_tokens_per_s", "losses/first_minibatch_ratio_deviation",
    ):  # fmt: skip
        assert tag in tags, tag
    deviations = [event.value for event in accumulator.Scalars("losses/first_minibatch_ratio_deviation")]
    assert len(deviations) == quick_run[0]["iterations"] and all(value == 0.0 for value in deviations)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_each_estimator_runs_from_saved_stages(quick_run, tmp_path, estimator):
    run_dir = Path(quick_run[0]["run_dir"])
    args = quick_args(
        tmp_path, advantage_estimator=estimator, total_episodes=512, eval_prompts=32,
        sft_checkpoint=str(run_dir / "sft.pt"),
        reward_model_checkpoint=str(run_dir / "reward_model.pt"),
    )  # fmt: skip
    summary = toy.train(args)
    assert summary["status"] == "completed" and summary["advantage_estimator"] == estimator
    # the reloaded SFT model and reward model evaluate as before on the same prompts
    assert summary["sft"]["validity"] >= 0.9
    assert all(row["kl"] == row["kl"] for row in summary["history"])  # no NaN
    assert summary["final"]["proxy"] > summary["sft"]["proxy"]


def test_adaptive_kl_with_k3_and_reward_whitening_runs(quick_run, tmp_path):
    run_dir = Path(quick_run[0]["run_dir"])
    args = quick_args(
        tmp_path, total_episodes=512, eval_prompts=32, adaptive_kl=True, kl_target=0.05,
        kl_horizon=100, kl_estimator="k3", whiten_rewards=True,
        sft_checkpoint=str(run_dir / "sft.pt"),
        reward_model_checkpoint=str(run_dir / "reward_model.pt"),
    )  # fmt: skip
    summary = toy.train(args)
    betas = [row["beta"] for row in summary["history"]]
    assert summary["status"] == "completed"
    # KL above the small target: the controller raises beta, by at most 20% * n / horizon a step
    assert betas[-1] > args.kl_coef
    assert all(b2 <= b1 * (1 + 0.2 * 64 / 100) + 1e-12 for b1, b2 in zip(betas[:-1], betas[1:], strict=True))
    assert all(row["kl"] >= 0 for row in summary["history"])  # k3 is never negative


def test_rerun_from_saved_stages_reproduces_the_ppo_numbers(quick_run, tmp_path, capsys):
    summary, _ = quick_run
    run_dir = Path(summary["run_dir"])
    args = quick_args(
        tmp_path, sft_checkpoint=str(run_dir / "sft.pt"),
        reward_model_checkpoint=str(run_dir / "reward_model.pt"),
    )  # fmt: skip
    rerun = toy.train(args)
    assert "refitting" not in capsys.readouterr().out  # the same SFT model and settings: normalization kept
    assert rerun["history"] == summary["history"]
    assert rerun["sft"] == summary["sft"] and rerun["final"] == summary["final"]


# BAD INPUT


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"response_length": 40}, "do not fit the context"),
        ({"num_minibatches": 3}, "does not divide"),
        ({"advantage_estimator": "ppo"}, "unknown --advantage-estimator"),
        ({"advantage_estimator": "grpo", "samples_per_prompt": 1}, "samples-per-prompt"),
        ({"n_head": 3}, "not divisible"),
        ({"clip_coef": -1.0}, "--clip-coef must be positive"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be positive"),
        ({"vf_coef": -3.0}, "--vf-coef must not be negative"),
        ({"target_kl": -1.0}, "--target-kl must be positive"),
        ({"response_length": 3}, "too short to finish a sentence"),
        ({"max_prompt_words": 9}, "a prompt be a whole sentence"),
        ({"clip_coef": -0.1}, "--clip-coef must be positive"),
        ({"learning_rate": -1.0}, "--learning-rate must be positive"),
        ({"ent_coef": -1.0}, "--ent-coef and --vf-coef must not be negative"),
        ({"seed": -1}, "--seed must lie in"),
        ({"kl_estimator": "k2"}, "unknown --kl-estimator"),
        ({"runs_dir": "/etc/hostname/runs"}, "cannot create the run folder"),
        ({"sft_steps": 0}, "--sft-steps must be at least 1, got 0"),
        (
            {"rm_num_pairs": 32, "rm_batch_size": 64},
            "smaller than --rm-batch-size 64: the reward model would train for 0",
        ),
        ({"sft_batch_size": 5000}, "--sft-batch-size 5000 is larger than the corpus"),
    ],
)
def test_bad_config_raises_config_error(tmp_path, overrides, message):
    with pytest.raises(toy.ConfigError, match=message):
        toy.train(quick_args(tmp_path, **overrides))
    assert not list(tmp_path.iterdir())  # rejected before anything was written


def test_reused_reward_model_is_renormalized_for_another_sampling_temperature(quick_run, tmp_path, capsys):
    run_dir = Path(quick_run[0]["run_dir"])
    stages = {"sft_checkpoint": str(run_dir / "sft.pt"), "reward_model_checkpoint": str(run_dir / "reward_model.pt")}
    saved = torch.load(run_dir / "reward_model.pt", weights_only=True)
    assert saved["metadata"]["normalized_on"]["temperature"] == 1.0
    summary = toy.train(quick_args(tmp_path, total_episodes=64, eval_prompts=16, temperature=0.5, **stages))
    assert "refitting" in capsys.readouterr().out
    refit = torch.load(Path(summary["run_dir"]) / "reward_model.pt", weights_only=True)
    assert refit["metadata"]["normalized_on"]["temperature"] == 0.5
    assert refit["metadata"]["normalized_on"]["sft_sha256"] == saved["metadata"]["normalized_on"]["sft_sha256"]
    assert refit["model"]["score_mean"] != saved["model"]["score_mean"]
    torch.testing.assert_close(refit["model"]["head.weight"], saved["model"]["head.weight"])  # same weights


def test_checkpoint_of_the_wrong_stage_is_rejected(quick_run, tmp_path):
    run_dir = Path(quick_run[0]["run_dir"])
    args = quick_args(tmp_path, sft_checkpoint=str(run_dir / "reward_model.pt"))
    with pytest.raises(toy.ConfigError, match="not the sft model"):
        toy.train(args)
    assert not list(tmp_path.iterdir())  # no empty run folder left behind


def test_bad_reward_model_checkpoint_is_rejected_before_sft_trains(quick_run, tmp_path, capsys):
    run_dir = Path(quick_run[0]["run_dir"])
    args = quick_args(tmp_path, reward_model_checkpoint=str(run_dir / "sft.pt"))  # SFT would be trained first
    with pytest.raises(toy.ConfigError, match="not the reward_model model"):
        toy.train(args)
    assert "SFT:" not in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_policy(quick_run, tmp_path):
    run_dir = Path(quick_run[0]["run_dir"])
    command = [
        sys.executable, str(REPO / "ppo_llm_toy.py"), "--runs-dir", str(tmp_path),
        "--sft-checkpoint", str(run_dir / "sft.pt"), "--reward-model-checkpoint", str(run_dir / "reward_model.pt"),
        "--learning-rate", "1e6", "--max-grad-norm", "1e9", "--total-episodes", "512", "--eval-prompts", "16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the loss became NaN or infinite"), result.stderr
    assert "the policy before that update is kept in" in lines[0] and lines[0].endswith("policy.pt")
    (new_run,) = tmp_path.iterdir()
    assert json.loads((new_run / "summary.json").read_text())["status"] == "diverged"
    policy = torch.load(new_run / "policy.pt", weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in policy.values())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--response-length", "40"], "do not fit the context"),
        (["--advantage-estimator", "foo"], "unknown --advantage-estimator 'foo': use gae, grpo or rloo"),
        (["--bad-flag"], "unrecognized argument --bad-flag"),
        (["--kl-cof", "0"], "unrecognized argument --kl-cof (did you mean --kl-coef?)"),
        (["--sft-checkpoint", "/nonexistent/sft.pt"], "checkpoint /nonexistent/sft.pt does not exist"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be positive (0 freezes the policy), got 0.0"),
        (["--clip-coef", "-0.1"], "--clip-coef must be positive, got -0.1"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32), got -1"),
        (["--runs-dir", "/etc/hostname/runs"], "cannot create the run folder /etc/hostname/runs/"),
        (["--seed", "abc"], "--seed expects an integer, got 'abc'"),
        (["--kl-coef"], "--kl-coef needs a value"),
        (["--sft-steps", "0"], "--sft-steps must be at least 1, got 0"),
    ],
)
def test_bad_command_line_gives_one_error_line_and_exit_code_2(tmp_path, flags, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "ppo_llm_toy.py"), "--runs-dir", str(tmp_path), *flags],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not list(tmp_path.iterdir())  # no empty run folder left behind
    assert message in lines[0]
    if flags[0] == "--kl-cof":  # the suggestion survives in the one line
        assert "did you mean --kl-coef?" in lines[0]


def test_track_without_a_wandb_key_is_one_line(tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "no-netrc"), OMP_NUM_THREADS="1")  # no `wandb login` either
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(REPO / "ppo_llm_toy.py"), "--track", "--runs-dir", str(runs)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --track needs a W&B API key"), result.stderr
    assert not runs.exists()  # rejected before the run folder exists


def test_track_without_wandb_asks_to_install_it(tmp_path, monkeypatch):
    real_import = toy.importlib.import_module

    def fake_import(name, *args):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args)

    monkeypatch.setattr(toy.importlib, "import_module", fake_import)
    with pytest.raises(toy.ConfigError, match="pip install wandb"):
        toy.train(quick_args(tmp_path, track=True))


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_saves_the_policy_and_the_summary(quick_run, tmp_path, signum, exit_code):
    run_dir = Path(quick_run[0]["run_dir"])
    command = [
        sys.executable, str(REPO / "ppo_llm_toy.py"), "--runs-dir", str(tmp_path),
        "--sft-checkpoint", str(run_dir / "sft.pt"),
        "--reward-model-checkpoint", str(run_dir / "reward_model.pt"),
        "--total-episodes", "1000000", "--eval-prompts", "32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:  # wait until PPO runs
        if line.startswith("iteration"):
            break
    process.send_signal(signum)
    output = process.stdout.read()
    assert process.wait(timeout=60) == exit_code  # 128 + the signal's number, as ppo_continuous.py
    assert "Traceback" not in output
    (new_run,) = tmp_path.iterdir()
    summary = json.loads((new_run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and len(summary["history"]) >= 1
    assert summary["stopped_by"] == ("SIGTERM" if signum == signal.SIGTERM else "SIGINT")
    assert (new_run / "policy.pt").is_file() and summary["checkpoint"] == str(new_run / "policy.pt")


def test_sigterm_in_the_final_evaluation_keeps_the_policy_and_the_logs(quick_run, tmp_path, monkeypatch):
    run_dir = Path(quick_run[0]["run_dir"])
    real_evaluate, calls = toy.evaluate, []

    def evaluate_until_sigterm(*args, **kwargs):  # a scheduler stops the job during the final evaluation
        calls.append(1)
        if len(calls) == 2:  # 1: the SFT policy before PPO, 2: the final evaluation (eval_interval > iterations)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("SIGTERM was not handled")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(toy, "evaluate", evaluate_until_sigterm)
    args = quick_args(
        tmp_path, total_episodes=128, eval_prompts=16, sft_checkpoint=str(run_dir / "sft.pt"),
        reward_model_checkpoint=str(run_dir / "reward_model.pt"),
    )  # fmt: skip
    summary = toy.train(args)
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGTERM" and "final" not in summary
    new_run = Path(summary["run_dir"])
    assert json.loads((new_run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["iterations"] == 2 and (new_run / "policy.pt").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(new_run))
    events.Reload()
    assert len(events.Scalars("losses/policy_loss")) == summary["iterations"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


def test_track_logs_to_wandb_offline(quick_run, tmp_path):
    pytest.importorskip("wandb")
    run_dir = Path(quick_run[0]["run_dir"])
    command = [
        sys.executable, str(REPO / "ppo_llm_toy.py"), "--runs-dir", str(tmp_path), "--track",
        "--sft-checkpoint", str(run_dir / "sft.pt"),
        "--reward-model-checkpoint", str(run_dir / "reward_model.pt"),
        "--total-episodes", "128", "--eval-prompts", "16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (new_run,) = tmp_path.iterdir()
    assert list((new_run / "wandb").glob("offline-run-*"))


# HOW A RUN STOPS, AND THE SAVED POLICY USED AGAIN (issue 19)


def stages_of(quick_run) -> list[str]:
    run_dir = Path(quick_run[0]["run_dir"])
    return ["--sft-checkpoint", str(run_dir / "sft.pt"), "--reward-model-checkpoint", str(run_dir / "reward_model.pt")]


def wrapped_command(*flags, setup: str = "") -> list[str]:
    """The script's command line in a wrapper that first runs `setup` (test-only changes); the script is unchanged."""
    code = f"import sys, time, torch, ppo_llm_toy as toy\n{setup}\nsys.argv = ['ppo_llm_toy.py', *{list(flags)!r}]\ntoy.main()\n"
    return [sys.executable, "-c", code]


def start_ppo(command) -> subprocess.Popen:
    """Start the command (one torch thread) and return once PPO runs: after its first progress line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    for line in process.stdout:
        if line.startswith("iteration"):
            return process
    raise AssertionError(f"the run ended before PPO: {process.stderr.read()}")


def test_a_second_signal_during_the_save_is_held_until_policy_and_summary_are_written(quick_run, tmp_path):
    slow_save = "real_save = torch.save\ntorch.save = lambda obj, f: (real_save(obj, f), time.sleep(3))"
    command = wrapped_command("--runs-dir", str(tmp_path), *stages_of(quick_run), "--total-episodes", "1000000",
                              "--eval-prompts", "32", setup=slow_save)  # fmt: skip
    process = start_ppo(command)
    process.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while not list(tmp_path.glob("*/policy.tmp")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # held until the save is done
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    (new_run,) = tmp_path.iterdir()
    summary = json.loads((new_run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGINT"
    policy = torch.load(new_run / "policy.pt", weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in policy.values()) and not list(new_run.glob("*.tmp"))


@pytest.mark.parametrize(
    ("ctrl_c", "exit_code", "stopped_by"),
    [(False, 141, "SIGPIPE"), (True, 130, "SIGINT")],  # `| head` or a `less` that quit; `| tee log` and Ctrl-C
)
def test_a_closed_stdout_stops_the_run_as_a_closed_terminal_does(quick_run, tmp_path, ctrl_c, exit_code, stopped_by):
    command = [sys.executable, str(REPO / "ppo_llm_toy.py"), "--runs-dir", str(tmp_path), *stages_of(quick_run),
               "--total-episodes", "1000000", "--eval-prompts", "32"]  # fmt: skip
    process = start_ppo(command)
    process.stdout.close()  # the reader is gone: the next progress line (within 10 s) has nowhere to go
    if ctrl_c:
        process.send_signal(signal.SIGINT)  # the same Ctrl-C ended the `tee`: the closing line has nowhere to go
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == exit_code, stderr  # not 1 (a failed run), nor 120 (Python's failed flush at exit)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "error" not in stderr, stderr
    (new_run,) = tmp_path.iterdir()
    summary = json.loads((new_run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == stopped_by
    policy = torch.load(new_run / "policy.pt", weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in policy.values()) and not list(new_run.glob("*.tmp"))


def test_help_into_a_pipe_that_is_already_closed_ends_quietly():
    process = subprocess.Popen([sys.executable, str(REPO / "ppo_llm_toy.py"), "--help"], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    process.stdout.close()  # `--help | head -1`, with head gone before the help is printed
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 141 and stderr == "", stderr


def test_a_full_disk_for_the_summary_is_one_line_and_keeps_the_policy(quick_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.tmp").symlink_to("/dev/full")  # a real ENOSPC when summary.json is written
    command = wrapped_command("--runs-dir", str(tmp_path), *stages_of(quick_run), "--total-episodes", "128",
                              "--eval-prompts", "16", setup=f"toy.make_run_dir = lambda *_: toy.Path({str(run_dir)!r})")  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write {run_dir / 'summary.tmp'}: No space left on device; the policy is kept in {run_dir / 'policy.pt'}"
    ]
    assert toy.load_checkpoint(str(run_dir / "policy.pt"), "policy")[1]["args"]["total_episodes"] == 128


def test_non_finite_probabilities_in_the_rollout_stop_the_run_and_keep_the_last_good_policy(
    quick_run, tmp_path, monkeypatch
):
    real_update, calls = toy.update_policy, []

    def update(policy, *rest):  # the update of iteration 2 leaves finite weights whose logits overflow
        stats = real_update(policy, *rest)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                policy.lm_head.weight.fill_(1e38)
        return stats

    monkeypatch.setattr(toy, "update_policy", update)
    args = quick_args(
        tmp_path,
        total_episodes=256,
        eval_prompts=16,
        **dict(zip(["sft_checkpoint", "reward_model_checkpoint"], stages_of(quick_run)[1::2], strict=True)),
    )
    with pytest.raises(
        toy.TrainingDiverged, match="^the next-token probabilities became NaN or infinite; stopped, the policy before"
    ):
        toy.train(args)
    (new_run,) = tmp_path.iterdir()
    assert json.loads((new_run / "summary.json").read_text())["status"] == "diverged"
    policy, _ = toy.load_checkpoint(str(new_run / "policy.pt"), "policy")
    assert policy.lm_head.weight.abs().max() < 1e3  # the weights before the broken update


def test_eval_checkpoint_evaluates_the_saved_policy_and_prints_samples(quick_run, tmp_path):
    summary = quick_run[0]
    policy_path = Path(summary["run_dir"]) / "policy.pt"
    command = [sys.executable, str(REPO / "ppo_llm_toy.py"), "--eval-checkpoint", str(policy_path),
               "--eval-prompts", "128", "--num-sample-texts", "3"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    line, *samples = result.stdout.strip().splitlines()
    assert (
        line.startswith(f"{policy_path}: proxy ")
        and len(samples) == 3
        and all(s.startswith("    the ") for s in samples)
    )
    validity = float(line.split("| valid ")[1].split("%")[0]) / 100
    assert (
        validity >= 0.8 and abs(validity - summary["final"]["validity"]) < 0.15
    )  # the trained policy, not the SFT one
    # Without the run's other stages, or with a damaged file: one line.
    alone = tmp_path / "policy.pt"
    alone.write_bytes(policy_path.read_bytes())
    broken = torch.load(policy_path, weights_only=True)
    del broken["config"]
    torch.save(broken, tmp_path / "broken.pt")
    for path, message in ((alone, f"checkpoint {tmp_path / 'sft.pt'} does not exist"),
                          (tmp_path / "broken.pt", "is not a complete checkpoint of ppo_llm_toy: it lacks config")):  # fmt: skip
        result = subprocess.run([*command[:2], "--eval-checkpoint", str(path)], capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
