"""Hand-computed tests of the learner's pure math (advantages, filtering, losses, packing).

    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import group_advantages
from learner.filtering import filter_mask, select_samples
from learner.losses import (behaviour_weights, effective_sample_size, logprob_mismatch, ppo_clip_loss_sum,
                            step_normaliser, token_weights)
from learner.filtering import Sample
from learner.packing import (bin_cost, collate, pack_by_length, pack_samples, padded_cost, shared_suffix_inputs,
                             split_across_ranks, varlen_inputs)
from rollout_workers.types import Completion, Prompt, ScoredGroup


def group(rewards, lens=None, prompt=(5, 6), advantages=None, uid="p"):
    lens = lens or [2] * len(rewards)
    comps = tuple(Completion(tuple(range(10, 10 + n)), tuple([-0.5] * n), "stop", "x") for n in lens)
    return ScoredGroup(Prompt(uid, "q", "1"), prompt, comps, tuple(rewards), 0, 0, advantages)


def test_grpo_uses_population_std():
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "grpo", eps=0.0)
    # mean 0.25, population std sqrt(0.25*0.75) = 0.4330127 (sample std would be 0.5)
    assert torch.allclose(a, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / math.sqrt(0.1875), atol=1e-7)


def test_drgrpo_and_rloo_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    assert torch.allclose(group_advantages(r, "drgrpo"), torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0]]))
    # rloo: r_i - mean(others): 1 - 0 = 1, 0 - 1/3; 3 - 5/3 = 4/3, 1 - 7/3 = -4/3, 2 - 2 = 0
    assert torch.allclose(group_advantages(r, "rloo"),
                          torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3], [4 / 3, -4 / 3, 0.0, 0.0]]), atol=1e-6)


def test_all_equal_group_has_zero_advantage_and_eps_avoids_nan():
    a = group_advantages(torch.tensor([[1.0, 1.0, 1.0]]), "grpo")
    assert torch.equal(a, torch.zeros(1, 3))


def test_nan_reward_names_group_and_bad_estimator():
    with pytest.raises(ValueError, match="group 1"):
        group_advantages(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), "grpo")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(1, 2), "ppo")
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(torch.zeros(2, 1), "rloo")


def test_filter_mask_is_strict():
    a = torch.tensor([0.1, -0.1, 0.2, -0.3, 0.0])
    assert filter_mask(a, 0.1).tolist() == [False, False, True, True, False]


def test_select_samples_reasons_and_kept():
    groups = [group([1, 1]), group([0, 0]), group([1, 0], lens=[3, 1]), group([0.55, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5][:2], advantages=(0.05, -0.05))]
    res = select_samples(groups, "grpo", 0.1, apply_filter=True)
    assert res.samples_in == 8
    assert dict(res.drop_reasons) == {"all_correct": 2, "all_wrong": 2, "small_advantage": 2}
    assert [s.uid for s in res.samples] == [4, 5]
    assert res.samples[0].completion_token_ids == (10, 11, 12) and res.samples[0].num_tokens == 5
    assert res.samples[0].advantage == pytest.approx(1.0, abs=1e-5)
    assert res.samples[1].advantage == pytest.approx(-1.0, abs=1e-5)
    off = select_samples(groups, "grpo", 0.1, apply_filter=False)
    assert len(off.samples) == 8 and not off.drop_reasons


def test_select_samples_bad_groups():
    with pytest.raises(ValueError, match="3 completions, expected group_size=2"):
        select_samples([group([1, 0]), group([1, 0, 1])], "grpo", 0.1, True)
    with pytest.raises(ValueError, match="non-finite reward in group 0"):
        select_samples([group([float("nan"), 0])], "grpo", 0.1, True)


def test_vanilla_pg_gradient_when_old_equals_current():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    out = ppo_clip_loss_sum(logp, logp.detach(), adv, torch.ones(3), 0.2, 0.2)
    out.loss_sum.backward()
    assert torch.allclose(logp.grad, -adv)
    assert out.loss_sum.item() == pytest.approx(-1.5)
    assert int(out.clipped_tokens) == 0 and out.ratio_sum.item() == pytest.approx(3.0)


def test_clipping_hand_values():
    # rho = e^{0.5} = 1.6487 > 1.2 with A > 0 -> clipped to 1.2*A, no gradient;
    # rho = e^{-0.5} = 0.6065 < 0.8 with A > 0 -> min picks rho*A (unclipped), gradient -A*rho
    logp = torch.tensor([0.5, -0.5], requires_grad=True)
    out = ppo_clip_loss_sum(logp, torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]), 0.2, 0.2)
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(-1.2 - 2 * math.exp(-0.5), rel=1e-6)
    assert torch.allclose(logp.grad, torch.tensor([0.0, -2 * math.exp(-0.5)]))
    assert int(out.clipped_tokens) == 1
    # asymmetric (DAPO clip-higher): eps_high 0.7 leaves rho = 1.6487 unclipped
    out = ppo_clip_loss_sum(torch.tensor([0.5]), torch.zeros(1), torch.ones(1), torch.ones(1), 0.2, 0.7)
    assert out.loss_sum.item() == pytest.approx(-math.exp(0.5), rel=1e-6)


def test_k3_kl_and_tis():
    logp = torch.tensor([-1.0, -1.0])
    ref = torch.tensor([-1.0, -2.0])
    out = ppo_clip_loss_sum(logp, logp, torch.zeros(2), torch.ones(2), 0.2, 0.2, logprobs_ref=ref, kl_coef=0.5)
    k3 = math.exp(-1.0) + 1.0 - 1.0  # delta = -1: e^-1 - (-1) - 1
    assert out.kl_sum.item() == pytest.approx(k3, rel=1e-6)
    assert out.loss_sum.item() == pytest.approx(0.5 * k3, rel=1e-6)
    w, _ = behaviour_weights(torch.tensor([0.0, 0.0]), torch.tensor([-0.1, -5.0]), "tis", cap=2.0)
    assert torch.allclose(w, torch.tensor([math.exp(0.1), 2.0]))
    out = ppo_clip_loss_sum(logp, logp, torch.ones(2), torch.ones(2), 0.2, 0.2, is_weights=w)
    assert out.loss_sum.item() == pytest.approx(-(math.exp(0.1) + 2.0), rel=1e-6)


def test_behaviour_weights_by_mode_hand_computed():
    # prox - behav = [0, ln 1.5, ln 3, -ln 2]: w = [1, 1.5, 3, 0.5], cap 2 -> only token 2 exceeds it
    prox = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    behav = prox - torch.tensor([0.0, math.log(1.5), math.log(3.0), -math.log(2.0)], dtype=torch.float64)
    expected = {"none": [1.0, 1.0, 1.0, 1.0], "tis": [1.0, 1.5, 2.0, 0.5], "decoupled": [1.0, 1.5, 0.0, 0.5]}
    for mode, applied in expected.items():
        w, st = behaviour_weights(prox, behav, mode, cap=2.0)
        assert w.tolist() == pytest.approx(applied, abs=1e-12), mode
        assert st.raw_sum == pytest.approx(6.0, abs=1e-9) and st.raw_max == pytest.approx(3.0, abs=1e-9)
        assert st.capped == 1 and st.num_tokens == 4
        assert st.applied_sum == pytest.approx(sum(applied), abs=1e-9)
        assert st.applied_sq_sum == pytest.approx(sum(a * a for a in applied), abs=1e-9)
    # ESS: tis (1 + 1.5 + 2 + 0.5)^2 / (4 * (1 + 2.25 + 4 + 0.25)) = 25 / 30
    assert effective_sample_size(5.0, 7.5, 4) == pytest.approx(25 / 30, abs=1e-12)
    assert effective_sample_size(4.0, 4.0, 4) == 1.0 and effective_sample_size(0.0, 0.0, 0) == 0.0
    with pytest.raises(ValueError, match="off-policy mode"):
        behaviour_weights(prox, behav, "naive", cap=2.0)


def test_decoupled_loss_gradient_is_ratio_to_prox_times_weight():
    # d/dlogp of -min(rho A, clip(rho) A) * a at rho = exp(logp - prox) inside the clip range is -rho * A * a:
    # the ratio is to the proximal policy, the behaviour policy only enters through the detached weight a.
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    prox = torch.tensor([-1.1, -2.0])
    behav = torch.tensor([-1.5, -2.0 - math.log(4.0)])  # w = [exp(0.4), 4.0]: token 1 above the cap of 2
    a, _ = behaviour_weights(prox, behav, "decoupled", cap=2.0)
    out = ppo_clip_loss_sum(logp, prox, torch.tensor([1.0, 1.0]), torch.ones(2), 0.2, 0.2, is_weights=a)
    out.loss_sum.backward()
    rho0 = math.exp(0.1)
    assert logp.grad.tolist() == pytest.approx([-rho0 * math.exp(0.4), 0.0], abs=1e-6)


def test_scored_group_satisfies_the_learner_protocol():
    """The learner reads groups through `learner.groups` Protocols (it imports nothing of the
    workers): every attribute they declare exists on the worker's record, with the same meaning."""
    import dataclasses
    import typing

    from learner import groups as protocols
    from rollout_workers.types import Completion as C, Prompt as P, ScoredGroup as SG

    for proto, record in ((protocols.ScoredGroupLike, SG), (protocols.CompletionLike, C), (protocols.PromptLike, P)):
        declared = {n for n, v in vars(proto).items() if isinstance(v, property)}
        assert declared and declared <= {f.name for f in dataclasses.fields(record)}, (proto, record)
    g = group([1.0, 0.0])
    assert isinstance(g.prompt.uid, str) and isinstance(g.policy_version, int) and isinstance(g.batch_id, int)
    assert typing.get_type_hints(protocols.CompletionLike.token_ids.fget)["return"] is not None


def test_aggregation_weights_and_normaliser():
    lens = torch.tensor([2, 1])
    assert token_weights(lens, "token_mean").tolist() == [1.0, 1.0, 1.0]
    assert token_weights(lens, "seq_mean").tolist() == [0.5, 0.5, 1.0]
    assert step_normaliser("token_mean", 3, 2, 0) == 3.0
    assert step_normaliser("seq_mean", 3, 2, 0) == 2.0
    assert step_normaliser("constant", 3, 2, 100) == 100.0
    with pytest.raises(ValueError, match="> 0"):
        step_normaliser("token_mean", 0, 0, 0)
    # seq_mean over per-token losses [1, 3 | 5]: ((1+3)/2 + 5) / 2 = 3.5
    per_tok = torch.tensor([1.0, 3.0, 5.0])
    assert (per_tok * token_weights(lens, "seq_mean")).sum().item() / 2 == pytest.approx(3.5)


def test_length_bucketed_packing_and_too_long():
    # sorted longest first (6, 5, 4, 3, 2), cut where rows x longest row would pass the budget
    assert pack_by_length([5, 3, 4, 2, 6], 10) == [[4], [0, 2], [1, 3]]
    assert [padded_cost([[5, 3, 4, 2, 6][i] for i in b]) for b in pack_by_length([5, 3, 4, 2, 6], 10)] == [6, 10, 6]
    assert pack_by_length([2, 2, 2, 2], 8) == [[0, 1, 2, 3]]  # ties keep input order
    assert pack_by_length([], 8) == [] and padded_cost([]) == 0
    with pytest.raises(ValueError, match="9 tokens.*micro_batch_tokens=8"):
        pack_by_length([3, 9], 8)


def test_split_across_ranks_balances_count_and_tokens():
    split = split_across_ranks([8, 7, 6, 1, 1], 2)
    assert sorted(len(r) for r in split) == [2, 3]
    assert split == [[0, 3, 4], [1, 2]]  # tokens 10 vs 13; counts 3 vs 2
    assert split_across_ranks([4], 3) == [[0], [], []]


def test_collate_layout():
    res = select_samples([group([1, 0], lens=[2, 1], prompt=(7, 8, 9))], "drgrpo", 0.1, True)
    mb = collate(res.samples, "seq_mean")
    # right-padded rows: prompt + completion, then token 0
    assert mb.input_ids.tolist() == [[7, 8, 9, 10, 11], [7, 8, 9, 10, 0]]
    assert mb.lengths.tolist() == [5, 4] and mb.num_tokens == 9
    # flat indices into the 2 x 5 positions: row 0 predicts from positions 2, 3; row 1 from 5 + 2
    assert mb.pred_index.tolist() == [2, 3, 7] and mb.target_ids.tolist() == [10, 11, 10]
    assert mb.advantages.tolist() == [0.5, 0.5, -0.5] and mb.weights.tolist() == [0.5, 0.5, 1.0]
    assert mb.seq_lens.tolist() == [2, 1] and mb.logprobs_old is None
    row = varlen_inputs(mb)
    assert row.input_ids.tolist() == [[7, 8, 9, 10, 11, 7, 8, 9, 10]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert row.pred_index.tolist() == [2, 3, 7]
    assert row.input_ids[0, row.pred_index + 1].tolist() == mb.target_ids.tolist()  # next token = the target
    dummy = collate([], "token_mean")
    assert dummy.num_tokens == 1 and dummy.target_ids.numel() == 0 and dummy.input_ids.shape == (1, 1)


def test_collate_shared_prompt_heads():
    res = select_samples([group([1, 0], lens=[2, 1], prompt=(7, 8, 9)), group([0, 1], lens=[3, 1], prompt=(4, 5), uid="q")],
                         "drgrpo", 0.1, True)
    mb = collate(res.samples, "seq_mean", share_prompts=True)
    # each distinct prompt's first P - 1 tokens once, right-padded; a row is its last prompt token + completion
    assert mb.prompt_heads.tolist() == [[7, 8], [4, 0]] and mb.head_lengths.tolist() == [2, 1]
    assert mb.row_head.tolist() == [0, 0, 1, 1]
    assert mb.input_ids.tolist() == [[9, 10, 11, 0], [9, 10, 0, 0], [5, 10, 11, 12], [5, 10, 0, 0]]
    assert mb.lengths.tolist() == [3, 2, 4, 2]
    assert mb.num_tokens == 3 + 11 and collate(res.samples, "seq_mean").num_tokens == 5 + 4 + 5 + 3
    # position k of a row predicts completion token k (its first position is the last prompt token)
    assert mb.pred_index.tolist() == [0, 1, 4, 8, 9, 10, 12] and mb.target_ids.tolist() == [10, 11, 10, 10, 11, 12, 10]
    rows = shared_suffix_inputs(mb)
    assert rows.position_ids.tolist() == [[2, 3, 4, 5]] * 2 + [[1, 2, 3, 4]] * 2  # positions in the whole sample
    T, F = True, False
    assert rows.attention_mask.shape == (4, 1, 4, 6)
    # row 2 sees the one real token of its head (not the head's padding), then its own tokens causally
    assert rows.attention_mask[2, 0].tolist() == [[T, F, T, F, F, F], [T, F, T, T, F, F], [T, F, T, T, T, F], [T, F, T, T, T, T]]
    assert rows.attention_mask[0, 0, 0].tolist() == [T, T, T, F, F, F]
    # 2 heads x 2 tokens + 4 rows x 4 + ceil(4 rows x 2 head tokens / 8) for the rows' cache copies
    assert bin_cost(res.samples, True) == 4 + 16 + 1 and bin_cost(res.samples, False) == padded_cost([5, 4, 5, 3]) == 20
    with pytest.raises(ValueError, match="varlen_inputs needs a micro-batch without shared prompt heads"):
        varlen_inputs(mb)
    dummy = collate([], "token_mean", share_prompts=True)  # a head pass too: every pass of a round has one shape
    assert dummy.prompt_heads.shape == (1, 1) and dummy.row_head.tolist() == [0] and dummy.target_ids.numel() == 0


def test_pack_samples_sorts_by_completion_and_counts_shared_cost():
    def sample(uid, prompt, c):
        return Sample(uid, prompt, tuple(range(c)), (-1.0,) * c, 1.0)

    samples = [sample(0, (1, 2, 3), 2), sample(1, (4, 5), 3), sample(2, (1, 2, 3), 4), sample(3, (6, 7, 8), 4),
               sample(4, (4, 5), 1)]
    # sorted by completion: 2 and 3 (c 4; 2's prompt first seen at 0), 1 (c 3), 0 (c 2), 4 (c 1). [2, 3] costs 2 heads x 2
    # + 2 rows x 5 + ceil(2 x 2 / 8) = 15; adding 1 would cost 3 x 2 + 3 x 5 + 1 = 22 > 17.
    # [1, 0, 4]: 2 distinct heads x 2 + 3 rows x 4 + ceil(3 x 2 / 8) = 17. Prompts kept together cost the same
    # 32 in 3 bins ([2, 0], [3, 1], [4]), so this cut wins.
    bins = pack_samples(samples, 17, share_prompts=True)
    assert bins == [[2, 3], [1, 0, 4]]
    assert [bin_cost([samples[i] for i in b], True) for b in bins] == [15, 17]
    # two 9-token prompts, completions of 4 and 3 tokens: sorted by completion, bins mix the prompts (4 bins
    # costing 20 + 20 + 31 + 13); a prompt's samples together make 2 bins of 8 + 4 x 5 + 4 = 32 each
    long_prompts = [sample(k, (1,) * 9 if k < 4 else (2,) * 9, 4 - k % 2) for k in range(8)]
    assert pack_samples(long_prompts, 32, share_prompts=True) == [[0, 2, 1, 3], [4, 6, 5, 7]]
    assert pack_samples(samples, 16, share_prompts=False) == pack_by_length([s.num_tokens for s in samples], 16)
    assert pack_samples([sample(0, (1, 2, 3), 13)], 16, True) == [[0]]  # alone, a sample always gets a bin
    with pytest.raises(ValueError, match="17 tokens.*micro_batch_tokens=16"):
        pack_samples([sample(0, (1, 2, 3), 14)], 16, True)


def test_logprob_mismatch_hand_values():
    learner = torch.tensor([-1.0, -2.0, -0.5])
    sampler = torch.tensor([-1.5, -2.0, -0.25])
    m = logprob_mismatch(learner, sampler)
    assert m.num_tokens == 3
    assert m.abs_diff_sum == pytest.approx(0.5 + 0.0 + 0.25)
    assert m.ratio_max == pytest.approx(math.exp(0.5))  # the largest learner/sampler probability ratio
    assert logprob_mismatch(sampler, sampler) == (0.0, 1.0, 3)
    assert logprob_mismatch(torch.zeros(0), torch.zeros(0)) == (0.0, 0.0, 0)
