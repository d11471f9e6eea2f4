"""The DASH policy loss (arXiv 2505.17218, Eq. 1-2): per-token PPO clip, optional k3 KL to a reference
model, the off-policy correction weights (truncated IS or decoupled PPO: `behaviour_weights`), and
the three aggregations, all in SUM form.

Why SUM form: the token-mean normaliser (tokens of the whole optimizer batch, after filtering) is
only known once the last group of the batch has arrived, but backward must start earlier
(streaming). So every micro-batch backprops  sum_t w_t * l_t  (w_t = `token_weights`), and the
learner divides the accumulated gradient by `step_normaliser(...)` right before the optimizer
step. Gradients are linear, so the result equals the gradient of the aggregated loss of the whole
batch in one pass, for any micro-batch split.

Pure tensor math, no Ray/DeepSpeed. Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

AGGREGATIONS = ("token_mean", "seq_mean", "constant")


class LossOut(NamedTuple):
    """Sum-form loss of some tokens and sums for the step statistics (divide by `num_tokens`)."""

    loss_sum: torch.Tensor
    """Scalar: sum_t w_t * l_t (differentiable). Divide by the step normaliser for the loss."""
    num_tokens: int
    """Tokens in this call."""
    clipped_tokens: torch.Tensor
    """Scalar: tokens where the clipped branch was taken (no gradient flows through rho)."""
    kl_sum: torch.Tensor
    """Scalar: sum over tokens of the k3 KL estimate (0 when no reference logprobs)."""
    ratio_sum: torch.Tensor
    """Scalar: sum over tokens of rho (mean rho = ratio_sum / num_tokens; 1.0 when on-policy)."""


def token_weights(seq_lens: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weight w_t of the sum-form loss, for sequences of completion lengths `seq_lens` (S,).

    token_mean: 1 (normaliser = completion tokens of the step); seq_mean: 1/len of the token's
    sequence (normaliser = sequences of the step); constant: 1 (normaliser = a constant, Dr.GRPO).
    Returns (sum(seq_lens),), tokens of sequence 0 first.
    """
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {list(AGGREGATIONS)}, got {loss_agg!r}")
    if (seq_lens < 1).any():
        raise ValueError(f"every sequence needs >= 1 completion token, got lengths {seq_lens.tolist()}")
    per_seq = 1.0 / seq_lens.double() if loss_agg == "seq_mean" else torch.ones(len(seq_lens), dtype=torch.float64)
    return torch.repeat_interleave(per_seq, seq_lens).float()


def step_normaliser(loss_agg: str, num_tokens: int, num_sequences: int, constant: float) -> float:
    """What divides the summed loss of an optimizer step (see `token_weights`)."""
    if loss_agg == "token_mean":
        value = float(num_tokens)
    elif loss_agg == "seq_mean":
        value = float(num_sequences)
    elif loss_agg == "constant":
        value = float(constant)
    else:
        raise ValueError(f"loss_agg must be one of {list(AGGREGATIONS)}, got {loss_agg!r}")
    if not value > 0:
        raise ValueError(f"step normaliser for {loss_agg} must be > 0, got {value} (an empty optimizer batch?)")
    return value


def ppo_clip_loss_sum(logprobs: torch.Tensor, logprobs_old: torch.Tensor, advantages: torch.Tensor,
                      weights: torch.Tensor, clip_eps_low: float, clip_eps_high: float,
                      logprobs_ref: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                      is_weights: Optional[torch.Tensor] = None) -> LossOut:
    """Sum-form PPO-clip policy loss over K tokens (all inputs (K,), one entry per completion token).

    l_t = is_t * -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t) + kl_coef * k3_t
    with rho_t = exp(logprobs - logprobs_old) and k3_t = exp(ref - logp) - (ref - logp) - 1 (Schulman's
    k3, unbiased and >= 0). When logprobs_old == logprobs.detach(), rho = 1 and the gradient is the
    vanilla policy gradient -A * grad logp. `is_weights` (detached, `behaviour_weights`) multiplies the
    policy term only. Returns sum_t weights_t * l_t.
    """
    ratio = torch.exp(logprobs - logprobs_old)  # (K,)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)  # (K,)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl_sum = logprobs.new_zeros(())
    if logprobs_ref is not None and kl_coef > 0:
        delta = logprobs_ref - logprobs
        kl = torch.exp(delta) - delta - 1.0  # (K,)
        per_token = per_token + kl_coef * kl
        kl_sum = kl.detach().sum()
    with torch.no_grad():
        clipped_tokens = (clipped < unclipped).sum()
    return LossOut((per_token * weights).sum(), int(logprobs.numel()), clipped_tokens, kl_sum, ratio.detach().sum())


OFF_POLICY = ("none", "tis", "decoupled")


class ISStats(NamedTuple):
    """Sums over tokens of the behaviour importance weights w_t = pi_prox / pi_behav, so that
    micro-batches and ranks add up (max: take the max)."""

    raw_sum: float
    """sum_t w_t (mean = raw_sum / num_tokens; 1.0 when the sampler holds the proximal weights)."""
    raw_max: float
    """max_t w_t; 0.0 over no tokens."""
    capped: int
    """Tokens with w_t > cap: truncated to cap (tis) or masked out (decoupled); counted in every mode."""
    applied_sum: float
    """sum_t a_t of the weights applied to the policy term (a_t = 1 with off_policy="none")."""
    applied_sq_sum: float
    """sum_t a_t^2: with applied_sum, the effective sample size (sum a)^2 / (K sum a^2)."""
    num_tokens: int

    def plus(self, other: "ISStats") -> "ISStats":
        """The statistics of both token sets (sums add, the max is the larger)."""
        return ISStats(self.raw_sum + other.raw_sum, max(self.raw_max, other.raw_max), self.capped + other.capped,
                       self.applied_sum + other.applied_sum, self.applied_sq_sum + other.applied_sq_sum,
                       self.num_tokens + other.num_tokens)


NO_IS_STATS = ISStats(0.0, 0.0, 0, 0.0, 0.0, 0)
"""The statistics over no token (a dummy or no-grad pass; the start of a sum)."""


def effective_sample_size(applied_sum: float, applied_sq_sum: float, num_tokens: int) -> float:
    """Normalised ESS of the applied weights, (sum a)^2 / (K sum a^2) in (0, 1]: 1 when every token
    weighs the same, ~1/K when one token carries all the weight; 0.0 when nothing is weighted."""
    if num_tokens == 0 or applied_sq_sum == 0:
        return 0.0
    return applied_sum ** 2 / (num_tokens * applied_sq_sum)


def behaviour_weights(logprobs_prox: torch.Tensor, logprobs_behav: torch.Tensor, mode: str,
                      cap: float) -> tuple[torch.Tensor, ISStats]:
    """Off-policy correction weights of the policy term, (K,) detached, and their statistics.

    w_t = exp(logprobs_prox - logprobs_behav): the proximal policy (the learner's weights when the
    batch began: the PPO ratio's denominator) over the behaviour policy (the engine that sampled,
    possibly versions stale or in another precision).
      none:      a_t = 1 (the PPO ratio alone; biased when the sampler is not the proximal policy)
      tis:       a_t = min(w_t, cap)                      (truncated IS, Yao et al. 2025)
      decoupled: a_t = w_t if w_t <= cap else 0           (decoupled PPO, AReaL, arXiv 2505.24298:
                 tokens whose weight exceeds the cap are masked out, not truncated)
    """
    if mode not in OFF_POLICY:
        raise ValueError(f"off-policy mode must be one of {list(OFF_POLICY)}, got {mode!r}")
    w = torch.exp(logprobs_prox.detach().double() - logprobs_behav.double())  # (K,)
    over = w > cap
    if mode == "tis":
        applied = torch.clamp(w, max=cap)
    elif mode == "decoupled":
        applied = torch.where(over, torch.zeros_like(w), w)
    else:
        applied = torch.ones_like(w)
    stats = ISStats(float(w.sum()), float(w.max()) if w.numel() else 0.0, int(over.sum()), float(applied.sum()),
                    float((applied * applied).sum()), int(w.numel()))
    return applied.to(logprobs_prox.dtype), stats


class LogprobMismatch(NamedTuple):
    """How far the learner's logprobs are from the sampler's on the same tokens (the engine/learner
    drift check of verl and TRL). Sums, so that micro-batches and ranks add up."""

    abs_diff_sum: float
    """sum_t |logprob_learner_t - logprob_sampler_t| (divide by num_tokens for the mean)."""
    ratio_max: float
    """max_t exp(logprob_learner_t - logprob_sampler_t); 0.0 over no tokens (neutral for a max of ratios)."""
    num_tokens: int
    """Tokens compared."""


def logprob_mismatch(logprobs_learner: torch.Tensor, logprobs_sampler: torch.Tensor) -> LogprobMismatch:
    """Compare (K,) learner logprobs with the (K,) sampler logprobs of the same completion tokens.
    Meaningful when the learner holds the weights that sampled them (before the batch's first step)."""
    delta = (logprobs_learner.detach() - logprobs_sampler).double()  # (K,)
    if delta.numel() == 0:
        return LogprobMismatch(0.0, 0.0, 0)
    return LogprobMismatch(float(delta.abs().sum()), float(torch.exp(delta.max())), int(delta.numel()))
