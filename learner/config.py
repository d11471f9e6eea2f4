"""Configuration of the DASH learner (section `learner`). Defaults live here only."""
from __future__ import annotations

from dataclasses import dataclass

from learner.advantages import ESTIMATORS
from learner.losses import AGGREGATIONS, OFF_POLICY

OLD_LOGPROBS = ("auto", "recompute", "sampler")


@dataclass(frozen=True)
class LearnerConfig:
    """The DASH update: advantages, filter, loss, micro-batching and DeepSpeed (section `learner`)."""

    advantage: str = "grpo"
    """Advantage estimator: "grpo" ((r-mean)/(std+eps)), "drgrpo" (r-mean) or "rloo" (leave-one-out)."""
    filter_threshold: float = 0.1
    """Gradient filtering: drop samples with |A| <= this before any forward pass (negative = off is refused; 0 keeps all nonzero)."""
    filter: bool = True
    """Apply gradient filtering at all (standard GRPO turns it off)."""
    refill: bool = False
    """DAPO-style refill: a group the filter drops whole takes no slot of an optimizer batch, and the driver samples more prompts until every batch holds prompts_per_step kept groups."""
    refill_rounds: int = 4
    """With refill: at most this many extra sampling calls per sampled batch; the steps then run on the kept groups they have."""
    clip_eps_low: float = 0.2
    """PPO clip: lower bound of the ratio is 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """PPO clip: upper bound of the ratio is 1 + clip_eps_high (DAPO clip-higher when larger)."""
    kl_coef: float = 0.0
    """k3 KL penalty to a frozen reference model; 0 = off and no reference model is loaded."""
    loss_agg: str = "token_mean"
    """Loss aggregation: "token_mean" (over all tokens of the optimizer batch), "seq_mean" or "constant" (Dr.GRPO)."""
    constant_normalizer: int = 0
    """Token count that divides the summed loss when loss_agg="constant" (0 = max_new_tokens x samples)."""
    old_logprobs: str = "auto"
    """Where the proximal (old) logprobs of a batch's later optimizer steps come from: "recompute" (a no-grad pass with the pre-update weights), "sampler" (the engine's logprobs, always), or "auto": an exact engine's (fp32, top_p = 1) where they are the pre-update policy's (a group sampled with the learner's current version) or where learner.off_policy="none" (a stale group's PPO ratio is then to the policy that sampled it, as "sampler" takes it), else recomputed."""
    off_policy: str = "none"
    """Correction for samples whose behaviour policy (the engine that sampled them) is not the proximal policy (stale with train.overlap, or a bf16 engine): "none", "tis" (truncated importance sampling, weight min(pi_prox / pi_behav, is_cap)) or "decoupled" (decoupled PPO: the same weight, tokens above is_cap masked out). Needs old_logprobs != "sampler"."""
    is_cap: float = 2.0
    """Cap C of the off-policy importance weight pi_prox / pi_behav (tis truncates at C, decoupled masks above C); > 1."""
    max_staleness: int = 1
    """Learned batches (policy versions) a group may lag the learner; older groups are dropped before any pass (drop reason "stale") and counted. train.overlap samples 1 version stale."""
    prompts_per_step: int = 16
    """Optimizer batch, in prompts (groups) before filtering."""
    epochs_per_batch: int = 1
    """Passes over each sampled batch (PPO epochs); each pass takes its own optimizer steps."""
    micro_batch_tokens: int = 2048
    """Token budget of one backprop micro-batch (the small increment)."""
    share_prompts: bool = True
    """Run a micro-batch's shared prompts once (their K/V cache continued by each of the group's G completions) instead of once per sample: same gradient, fewer tokens forwarded (learner/packing.py). Used on the padded-attention path; varlen flash attention runs every sample whole."""
    lr: float = 1e-4
    """Peak learning rate."""
    lr_schedule: str = "constant"
    """"constant" or "cosine" (with linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup optimizer steps."""
    total_steps: int = 1000
    """Optimizer steps the cosine schedule decays over."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    bf16: bool = False
    """Train in bf16 (fp32 master weights); False = fp32 throughout."""
    num_ranks: int = 1
    """Data-parallel DeepSpeed ranks (one Ray actor each)."""
    cpus_per_rank: float = 1.0
    """CPUs reserved per learner rank actor."""
    torch_threads: int = 0
    """Intra-op torch threads per rank (0 = int(cpus_per_rank)). With train.thread_handover on a CPU placement this holds while the engines sample and the learner streams; the learn tail (and, with train.stream_learn=false, the whole learn phase) gets the job's reserved cores."""
    gpus_per_rank: float = 0.0
    """GPUs per learner rank: 0 with train.placement=cpu; > 0 in a GPU placement, which gives each rank one GPU bundle (a whole GPU disaggregated, half of one colocated) and runs DeepSpeed on CUDA. Anything else is refused by name."""
    max_bad_steps: int = 3
    """Abort after this many consecutive optimizer steps skipped for a NaN/inf loss or gradient."""
    seed: int = 0
    """Seed for model init and learner RNG."""

    @property
    def rank_threads(self) -> int:
        """A rank's own intra-op torch threads: torch_threads, or int(cpus_per_rank) (at least 1)."""
        return self.torch_threads or max(1, int(self.cpus_per_rank))

    def __post_init__(self) -> None:
        def one_of(key: str, allowed: tuple) -> None:
            if getattr(self, key) not in allowed:
                raise ValueError(f"learner.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")

        one_of("advantage", ESTIMATORS)
        if self.refill_rounds < 1:
            raise ValueError(f"learner.refill_rounds must be >= 1, got {self.refill_rounds}")
        one_of("loss_agg", AGGREGATIONS)
        one_of("old_logprobs", OLD_LOGPROBS)
        one_of("off_policy", OFF_POLICY)
        one_of("lr_schedule", ("constant", "cosine"))
        one_of("zero_stage", (0, 1, 2, 3))
        if self.filter_threshold < 0:
            raise ValueError(f"learner.filter_threshold must be >= 0, got {self.filter_threshold}")
        for key in ("clip_eps_low", "clip_eps_high", "kl_coef", "weight_decay",
                    "grad_clip", "constant_normalizer", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"learner.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("prompts_per_step", "epochs_per_batch", "micro_batch_tokens", "num_ranks",
                    "max_bad_steps", "total_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"learner.{key} must be >= 1, got {getattr(self, key)}")
        if self.off_policy != "none" and self.old_logprobs == "sampler":
            raise ValueError(f"learner.off_policy={self.off_policy!r} needs learner.old_logprobs='auto' or 'recompute' "
                             "(with 'sampler' the proximal policy is the behaviour policy, so the weight would be 1)")
        if not self.is_cap > 1:
            raise ValueError(f"learner.is_cap must be > 1, got {self.is_cap}")
        if self.max_staleness < 0:
            raise ValueError(f"learner.max_staleness must be >= 0, got {self.max_staleness}")
        if not self.lr > 0:
            raise ValueError(f"learner.lr must be > 0, got {self.lr}")
        if self.torch_threads < 0:
            raise ValueError(f"learner.torch_threads must be >= 0, got {self.torch_threads}")
        if not self.cpus_per_rank > 0:
            raise ValueError(f"learner.cpus_per_rank must be > 0, got {self.cpus_per_rank}")
