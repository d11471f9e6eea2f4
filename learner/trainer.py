"""One data-parallel learner rank: `RankTrainer` runs the DASH loss on length-bucketed micro-batches
through DeepSpeed (ZeRO 0-3, fp32/bf16), with the exact gradient normalisation,
non-finite step skipping, checkpoints and Hugging Face export. Ray-free:
`learner.actor.LearnerRank` wraps it in an actor, and tests run it in-process.

Attention: in bf16 on a GPU with the `flash_attn` package, a micro-batch runs as one padding-free row
through varlen flash attention (`packing.varlen_inputs`); otherwise as its right-padded (B, L)
block with plain causal sdpa attention (`packing` explains why that needs no mask), after the
micro-batch's shared prompt heads when learner.share_prompts (`packing`, "Shared prompts").

Exactness (the accumulated gradient equals the one-pass gradient of the whole optimizer batch).
Every micro-batch backprops the SUM-form loss sum_t w_t l_t (`losses.ppo_clip_loss_sum`), with
the gradient-accumulation boundary set by hand
(DeepSpeed config gradient_accumulation_steps = 1, `scale_wrt_gas=False`, so DeepSpeed neither
divides by a micro-step count nor steps early). DeepSpeed then holds  (1/W) sum_ranks sum_mb grad
(it AVERAGES over the W data-parallel ranks). Right before the optimizer step we multiply by
W / normaliser, where the normaliser (tokens / sequences / constant of the whole optimizer batch,
`losses.step_normaliser`) is computed by the driver, which sees every kept sample before it
packs them, so no extra all-reduce is needed. The factor is applied
  - ZeRO 1/2/3: through the ZeRO optimizer's static loss scale (set to normaliser / W for the
    step only): DeepSpeed divides the gradient by it, and computes the clipping norm on the
    divided gradient, so `grad_clip` clips the true normalised gradient;
  - ZeRO 0: by scaling `param.grad` in place (DeepSpeed clips after that, in `DeepSpeedEngine.step`).
Result: the optimizer sees exactly grad(sum_t w_t l_t / normaliser) over the whole batch.

Run its tests:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_deepspeed.py
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch

from learner.config import LearnerConfig
from learner.losses import NO_IS_STATS, ISStats, LogprobMismatch, behaviour_weights, logprob_mismatch, ppo_clip_loss_sum
from learner.packing import MicroBatch, shared_suffix_inputs, varlen_inputs


class MicroResult(NamedTuple):
    """What one rank reports for one micro-batch pass (sums; the driver divides)."""

    loss_sum: float
    """sum_t w_t l_t of the micro-batch (NaN/inf when non-finite)."""
    tokens: int
    """Completion tokens in it."""
    clipped_tokens: int
    kl_sum: float
    ratio_sum: float
    mismatch: LogprobMismatch
    """Learner vs sampler logprobs on the micro-batch's tokens (with the weights of this pass)."""
    is_stats: ISStats
    """Off-policy weights pi_prox / pi_behav of the micro-batch's tokens (backprop passes; zeros otherwise)."""
    seconds_forward: float
    """Forward pass and loss wall time on the rank."""
    seconds_backward: float
    """Backward pass wall time on the rank (0 for a no-grad pass)."""
    logprobs: dict[int, torch.Tensor]
    """Sample.uid -> (C,) detached learner logprobs, when asked for (old logprobs for later steps)."""


class StepResult(NamedTuple):
    """One optimizer step on one rank."""

    grad_norm: float
    """Global L2 norm of the normalised gradient before clipping (NaN when skipped)."""
    lr: float
    """Learning rate the step used."""
    skipped: bool
    """True when a non-finite loss on any rank made every rank drop the gradient instead."""
    seconds: float
    """Wall time of the step on the rank (normalisation, clipping, optimizer, or the skip)."""


def deepspeed_config(cfg: LearnerConfig) -> dict:
    """The DeepSpeed config for `cfg` (optimizer built by DeepSpeed, AdamW via torch: no JIT build)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class LrSchedule:
    """Multiplier of the peak lr at optimizer step s: linear warmup over `warmup_steps`, then constant
    or cosine decay to 0 at `total_steps`. A callable object, so LambdaLR checkpoints it."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int) -> None:
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


STALE_BUILD_LOCK_S = 600.0
"""A JIT build lock older than this is left by a killed process (the shm op compiles in ~1 min on 2 cores)."""


def clear_stale_build_lock(older_than_s: float) -> list[Path]:
    """Remove the JIT build lock of DeepSpeed's CPU shm comm op if it is older than `older_than_s`.

    torch's cpp_extension build holds `<TORCH_EXTENSIONS_DIR>/deepspeed_shm_comm/lock` while it
    compiles. A process killed mid-build never removes it, and every later learner then waits on
    it without end. A fresh lock (a build in progress on this node) is left alone.
    Returns the locks removed."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    locks = [Path(root) / "deepspeed_shm_comm" / "lock"] if root else \
        list(Path(get_default_build_root()).glob("*/deepspeed_shm_comm/lock"))
    removed = []
    for lock in locks:
        try:
            if time.time() - lock.stat().st_mtime > older_than_s:
                lock.unlink()
                removed.append(lock)
                print(f"removed a stale DeepSpeed JIT build lock {lock} (left by a killed run)", flush=True)
        except FileNotFoundError:
            pass
    return removed


def attention_kind(bf16: bool) -> str:
    """"flash_varlen" for bf16 training on a CUDA device with the flash_attn package installed
    (flash attention has no fp32 kernels), else "padded_sdpa"."""
    import importlib.util

    if bf16 and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_varlen"
    return "padded_sdpa"


def forward_logprobs(module: torch.nn.Module, mb: MicroBatch, attention: str,
                     device: torch.device, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of `module` over `mb` ("flash_varlen" or "padded_sdpa", `attention_kind`):
    the (K,) logprobs of the completion tokens (on the CPU), and the logits. No KV cache (it would
    only hold memory in a training pass), except the shared prompt heads' that the rows continue.

    `temperature`: the sampler's. The policy that generated the samples is softmax(logits / T), so
    the ratio rho and the policy gradient (the paper's Eq. 1-2) are taken on that same
    distribution; with T != 1 and undivided logits, learner and sampler logprobs would disagree
    on every token (verl and OpenRLHF divide the same way)."""
    if attention == "flash_varlen":
        row = varlen_inputs(mb)
        logits = module(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                        use_cache=False).logits  # (1, T, V)
        pred_index = row.pred_index
    elif mb.prompt_heads.numel():  # shared prompt heads (learner.packing): run once, continued by every row
        cache = module(input_ids=mb.prompt_heads.to(device), use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_select_indices(mb.row_head.to(device))  # (N, ..., H, d) -> (B, ..., H, d); backward sums rows into N
        rows = shared_suffix_inputs(mb)
        logits = module(input_ids=mb.input_ids.to(device), position_ids=rows.position_ids.to(device),
                        attention_mask=rows.attention_mask.to(device), past_key_values=cache,
                        use_cache=True).logits  # (B, L, V)
        pred_index = mb.pred_index
    else:  # right padding + the causal mask: exact without an attention mask (learner.packing)
        logits = module(input_ids=mb.input_ids.to(device), use_cache=False).logits  # (B, L, V)
        pred_index = mb.pred_index
    picked = logits.reshape(-1, logits.shape[-1])[pred_index.to(device)].float() / temperature  # (K, V)
    logprobs = torch.log_softmax(picked, dim=-1).gather(1, mb.target_ids.to(device)[:, None])[:, 0]  # (K,)
    return logprobs.cpu(), logits


class CollectiveBackends(NamedTuple):
    """torch.distributed backends of one learner rank."""

    default: str
    """Backend of the default group: DeepSpeed's gradient reductions and ZeRO gathers, which run on
    the accelerator's tensors ("nccl" for CUDA, "gloo" for CPU)."""
    flag_group_needed: bool
    """True when CPU tensors (the non-finite-loss flag, barriers) need a gloo side group because
    the default backend cannot reduce them."""


def collective_backends(device_type: str) -> CollectiveBackends:
    """The backends for DeepSpeed's accelerator `device_type` ("cuda" or "cpu"): NCCL for CUDA
    tensors plus a gloo group for the CPU flags; gloo alone on CPU (one group for everything).
    gloo on CUDA would stage every gradient reduction and ZeRO gather through host memory."""
    if device_type == "cuda":
        return CollectiveBackends("nccl", True)
    if device_type == "cpu":
        return CollectiveBackends("gloo", False)
    raise ValueError(f"learner accelerator {device_type!r} is not supported (DS_ACCELERATOR: cuda or cpu)")


class RankTrainer:
    """The DASH loss and optimizer on one rank. `self.ds` is the DeepSpeedEngine and
    `self.ds.module` the transformers model (weight sync reads it from here).

    Distributed set-up: if torch.distributed is not initialised yet, this sets the rendezvous env
    (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, DS_ACCELERATOR=cpu unless set) and calls
    `deepspeed.init_distributed` with the backend `collective_backends` picks for DeepSpeed's
    accelerator (NCCL on CUDA, gloo on CPU) and `timeout_s` on every collective. On CUDA a gloo
    side group (`self.flag_group`) carries the CPU-side flags and barriers.
    """

    def __init__(self, cfg: LearnerConfig, model_path: str, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, timeout_s: float = 300.0,
                 sampling_temperature: float = 1.0) -> None:
        if cfg.bf16 and cfg.zero_stage == 0:
            raise ValueError("learner.bf16 needs learner.zero_stage >= 1 (the exact gradient normalisation goes "
                             "through the ZeRO optimizer's loss scale; ZeRO 0 is fp32 only)")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        clear_stale_build_lock(STALE_BUILD_LOCK_S)
        import deepspeed
        import torch.distributed as dist

        backends = collective_backends(deepspeed.get_accelerator().device_name())
        if not dist.is_initialized():
            os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                               "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})
            deepspeed.init_distributed(dist_backend=backends.default, timeout=timedelta(seconds=timeout_s))
        self.flag_group = None
        """Process group of the CPU flags and barriers: None means the default group (gloo on CPU);
        on CUDA a gloo group over the same ranks, because NCCL only reduces CUDA tensors. Creating
        it is a collective: every rank builds its trainer."""
        if backends.flag_group_needed or dist.get_backend() != "gloo":
            self.flag_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        if deepspeed.get_accelerator().device_name() == "cpu":
            # Bit-exact runs on CPU: with more than one intra-op thread, the backward of an index
            # with repeated entries (index_put with accumulate: the shared prompt heads' KV rows,
            # `batch_select_indices` in `forward_logprobs`) sums in thread order, so two runs of one
            # config drifted apart in the 9th digit after the first optimizer step. The
            # deterministic kernels cost nothing measurable on the tiny default's batches (README,
            # "Reliability"). On CUDA this would need CUBLAS_WORKSPACE_CONFIG and cost speed.
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.model_path = model_path
        torch.manual_seed(cfg.seed)
        from transformers import AutoModelForCausalLM

        self.attention = attention_kind(cfg.bf16)
        """How micro-batches run: "flash_varlen" or "padded_sdpa" (module docstring)."""
        attn_implementation = "flash_attention_2" if self.attention == "flash_varlen" else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        self.ds, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, LrSchedule(cfg.lr_schedule, cfg.warmup_steps, cfg.total_steps)))
        # Frozen reference model for the k3 KL: loaded only when the KL is on (paper finding 3).
        self.ref_model = None
        if cfg.kl_coef > 0:
            ref_dtype = torch.bfloat16 if self.attention == "flash_varlen" else torch.float32
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=ref_dtype, attn_implementation=attn_implementation).to(self.ds.device).eval()
            self.ref_model.requires_grad_(False)
        self.sampling_temperature = sampling_temperature
        """The engines' sampling temperature: logprobs are those of softmax(logits / T) (`forward_logprobs`)."""
        self.forward_calls = 0
        """Model forward passes on this rank (dummy passes included); a filtered sample adds none."""
        self.forward_uids: set[int] = set()
        """Sample.uid of every sample this rank ran a forward pass on."""
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.consecutive_bad_steps = 0
        self._bad_since_step = False

    # ---- forward passes ------------------------------------------------------------------
    def _logprobs(self, module: torch.nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward_logprobs`, counted (the logits serve the dummy's zero loss)."""
        self.forward_calls += 1
        self.forward_uids.update(mb.uids)
        return forward_logprobs(module, mb, self.attention, self.ds.device, self.sampling_temperature)

    def forward_backward(self, mb: MicroBatch, boundary: bool, return_logprobs: bool) -> MicroResult:
        """Backprop the sum-form loss of one micro-batch (no optimizer step). `boundary` marks the last
        pass before the next `step` (DeepSpeed reduces deferred gradients there, as with its own
        gradient accumulation). `mb.logprobs_old` None means the current weights are the old ones
        (rho = 1: vanilla policy gradient)."""
        t0 = time.perf_counter()
        self.ds.set_gradient_accumulation_boundary(boundary)
        logprobs, logits = self._logprobs(self.ds, mb)
        if mb.target_ids.numel() == 0:  # dummy: joins the round's collectives with an exact zero gradient
            loss = logits.float().sum() * 0.0
            t1 = time.perf_counter()
            self.ds.backward(loss, scale_wrt_gas=False)
            return MicroResult(0.0, 0, 0, 0.0, 0.0, LogprobMismatch(0.0, 0.0, 0), NO_IS_STATS, t1 - t0,
                               time.perf_counter() - t1, {})
        if self.cfg.old_logprobs == "sampler":
            logprobs_old = mb.logprobs_sampler  # (K,) the engine's distribution is the behaviour policy
        else:  # the batcher's (recomputed or, where exact, the sampler's), or before any step the detached current ones
            logprobs_old = mb.logprobs_old if mb.logprobs_old is not None else logprobs.detach()  # (K,)
        # logprobs_old is the proximal policy; the engine's is the behaviour policy (stale, or another precision)
        is_weights, is_stats = behaviour_weights(logprobs_old, mb.logprobs_sampler, self.cfg.off_policy, self.cfg.is_cap)
        logprobs_ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                logprobs_ref, _ = self._logprobs(self.ref_model, mb)  # (K,)
        out = ppo_clip_loss_sum(logprobs, logprobs_old, mb.advantages, mb.weights, self.cfg.clip_eps_low,
                                self.cfg.clip_eps_high, logprobs_ref, self.cfg.kl_coef,
                                is_weights if self.cfg.off_policy != "none" else None)
        if not torch.isfinite(out.loss_sum):
            self._bad_since_step = True
        t1 = time.perf_counter()
        self.ds.backward(out.loss_sum, scale_wrt_gas=False)
        return MicroResult(float(out.loss_sum.detach()), out.num_tokens, int(out.clipped_tokens), float(out.kl_sum),
                           float(out.ratio_sum), logprob_mismatch(logprobs, mb.logprobs_sampler), is_stats, t1 - t0,
                           time.perf_counter() - t1, self._split(logprobs.detach(), mb) if return_logprobs else {})

    @torch.no_grad()
    def old_logprobs(self, mb: MicroBatch) -> MicroResult:
        """No-grad pass with the current (pre-update) weights: Sample.uid -> (C,) logprobs_old."""
        t0 = time.perf_counter()
        logprobs, _ = self._logprobs(self.ds, mb)
        return MicroResult(0.0, 0, 0, 0.0, 0.0, logprob_mismatch(logprobs, mb.logprobs_sampler), NO_IS_STATS,
                           time.perf_counter() - t0, 0.0, self._split(logprobs, mb))

    @staticmethod
    def _split(logprobs: torch.Tensor, mb: MicroBatch) -> dict[int, torch.Tensor]:
        return {uid: lp.clone() for uid, lp in zip(mb.uids, torch.split(logprobs, mb.seq_lens.tolist()))}

    # ---- optimizer step ------------------------------------------------------------------
    def _any_rank_bad(self) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._bad_since_step else 0.0])  # CPU: the flag group's gloo
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(flag.item() > 0)

    def step(self, normaliser: float) -> StepResult:
        """Normalise the accumulated gradient (module docstring) and take one optimizer step, or skip it
        (gradient dropped on every rank, counted) when any rank saw a non-finite loss since the last
        step, or the global gradient norm is non-finite (checked at ZeRO 0, and by DeepSpeed itself
        at fp32 ZeRO 1/2; ZeRO 3 and bf16 rely on the loss check). Raises RuntimeError after
        `max_bad_steps` skipped steps in a row. Collective."""
        t0 = time.perf_counter()
        lr = float(self.ds.get_lr()[0])
        if self._any_rank_bad():
            self.discard_gradients()
            return self._count_skip(lr, t0)
        factor = self.world_size / normaliser
        if self.cfg.zero_stage == 0:
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            for g in grads:
                g.mul_(factor)
            # grads are all-reduced already, so every rank sees the same norm and takes the same branch
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if not math.isfinite(grad_norm):
                self.discard_gradients()
                return self._count_skip(lr, t0)
            self.ds.step()
        else:
            self.ds.optimizer.loss_scale = 1.0 / factor
            try:
                self.ds.step()
            finally:
                self.ds.optimizer.loss_scale = 1.0
            if getattr(self.ds.optimizer, "overflow", False):  # DeepSpeed found a NaN/inf gradient and skipped
                return self._count_skip(lr, t0)
            grad_norm = float(self.ds.get_global_grad_norm())
        self.optimizer_steps += 1
        self.consecutive_bad_steps = 0
        return StepResult(grad_norm, lr, False, time.perf_counter() - t0)

    def _count_skip(self, lr: float, t0: float) -> StepResult:
        self.skipped_steps += 1
        self.consecutive_bad_steps += 1
        if self.consecutive_bad_steps >= self.cfg.max_bad_steps:
            raise RuntimeError(f"learner rank {self.rank}: {self.consecutive_bad_steps} optimizer steps in a row "
                               f"had a non-finite loss or gradient (max_bad_steps={self.cfg.max_bad_steps}); aborting")
        return StepResult(float("nan"), lr, True, time.perf_counter() - t0)

    def discard_gradients(self) -> None:
        """Drop the accumulated gradient without stepping (a skipped step). DeepSpeed has no public
        call for this outside fp16 overflow handling, so this mirrors its overflow clean-up."""
        self._bad_since_step = False
        opt = self.ds.optimizer
        if self.cfg.zero_stage == 0:
            self.ds.zero_grad()
        elif self.cfg.zero_stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            for k in opt.averaged_gradients.keys():
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None
            opt.micro_step_id = INITIAL_MICRO_STEP_ID
        else:
            opt._overflow_clean_up(opt.loss_scale)

    def full_gradients(self, normaliser: float) -> dict[str, torch.Tensor]:
        """The full normalised gradient the next `step(normaliser)` would use (before clipping), by
        parameter name (fp32 copies). Collective under ZeRO-3 (every rank must call it)."""
        from deepspeed.utils import safe_get_full_grad

        factor = self.world_size / normaliser
        out = {}
        for name, p in self.ds.module.named_parameters():
            g = safe_get_full_grad(p)
            out[name] = (g.detach().float() * factor).clone() if g is not None else torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        return out

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 copies of the weights by name (gathered under ZeRO-3; collective there)."""
        import deepspeed

        params = list(self.ds.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=self.cfg.zero_stage == 3):
            return {name: p.detach().float().clone() for name, p in params}

    # ---- checkpoints and export ------------------------------------------------------------
    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """DeepSpeed state (model, optimizer, scheduler) + this rank's RNG into `path` (a directory
        every rank can reach; the caller makes it atomic). Collective."""
        self.ds.save_checkpoint(path, tag="ds", client_state=client_state)
        torch.save({"torch_rng": torch.get_rng_state(), "optimizer_steps": self.optimizer_steps,
                    "skipped_steps": self.skipped_steps}, Path(path) / f"rank{self.rank}_rng.pt")

    def load_checkpoint(self, path: str) -> dict:
        """Restore what `save_checkpoint` wrote; returns its client_state. Collective."""
        _, client_state = self.ds.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        extra = torch.load(Path(path) / f"rank{self.rank}_rng.pt", weights_only=False)
        torch.set_rng_state(extra["torch_rng"])
        self.optimizer_steps, self.skipped_steps = extra["optimizer_steps"], extra["skipped_steps"]
        self.consecutive_bad_steps, self._bad_since_step = 0, False
        return client_state or {}

    def export_hf(self, path: str) -> None:
        """Save the current weights as a transformers model directory (safetensors + config +
        tokenizer) at `path`, atomically (temp dir then rename, by rank 0). Collective."""
        import deepspeed
        import torch.distributed as dist
        from transformers import AutoTokenizer

        module = self.ds.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.rank == 0:
                tmp = Path(f"{path}.tmp-export")
                shutil.rmtree(tmp, ignore_errors=True)
                state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                AutoTokenizer.from_pretrained(self.model_path).save_pretrained(tmp)
                with open(tmp / "dash_export.json", "w") as f:
                    json.dump({"optimizer_steps": self.optimizer_steps}, f)
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
        dist.barrier(group=self.flag_group)  # gloo: an NCCL barrier would have to guess each rank's device
