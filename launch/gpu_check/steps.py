"""The GPU check's measurements, one step per process (the driver, `python -m launch.gpu_check`,
runs each under its own time cap so that a crash or a hang costs one step, not the device time):

    python -m launch.gpu_check.steps learner --profile gpu --json /tmp/learner.json
    python -m launch.gpu_check.steps engine  --profile cpu-rehearsal --json /tmp/engine.json
    python -m launch.gpu_check.steps sync|e2e --profile ... --json ...

- learner: DeepSpeed ZeRO-2 bf16 (the learner's own DeepSpeed config, `learner.trainer.deepspeed_config`)
  on a Qwen2.5-0.5B-shaped model (random init from a config: no hub), the learner's PPO-clip loss
  on full-length rows, at two micro-batch token budgets: tokens/s and MFU against the card's
  dense bf16 peak.
- engine: the transformers engine (`rollout_workers.engines.hf.HFEngine`) tokens/s against batch
  size on the same shape; vLLM's too when `import vllm` works on the machine.
- sync: moving the 0.5B shape's bf16 weights learner -> engine on one device, against a device
  memcpy of the same bytes: in-process (colocated engine in the learner's process: a copy per
  tensor) and across processes through CUDA IPC (torch.multiprocessing shares one device buffer;
  the sender packs into it, the receiver copies out: the mechanism of a colocated IPC sync; on
  CPU the same code goes through shared memory).
- e2e: the embedded default through `python -m launch.train` (placement and iterations from the
  profile): held-out accuracy before/after RL and wall time, from the run's summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import torch

QWEN25_05B_SHAPE = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
"""Qwen/Qwen2.5-0.5B's config.json (Hugging Face model card), minus the hub: weights are random."""
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=512, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
"""The CPU rehearsal's model: the same architecture, small enough for 2 cores."""

BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    # (substring of torch.cuda.get_device_name, dense bf16 tensor TFLOPS, source). NVIDIA quotes
    # "with sparsity" figures; dense is half of them. Checked most specific first.
    ("H200 NVL", 835.0, "NVIDIA H200 datasheet: H200 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H200", 989.0, "NVIDIA H200 datasheet: H200 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet: H100 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    ("H100", 989.0, "NVIDIA H100 datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
)


class Peak(NamedTuple):
    tflops: float
    source: str


def bf16_peak(card_name: str) -> Peak | None:
    """The card's dense bf16 peak from BF16_DENSE_PEAK_TFLOPS, or None for a card not in it (MFU
    is then not computed rather than guessed)."""
    for key, tflops, source in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in card_name.lower():
            return Peak(tflops, source)
    return None


def train_flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per trained token, forward + backward: 6 N + 12 L H T (Chowdhery et al. 2022,
    PaLM, Appendix B: the matmul FLOPs of the weights plus those of attention scores and values;
    no recomputation counted). N counts every parameter that multiplies activations: with tied
    embeddings the (vocab x hidden) matrix is counted once, as the LM head."""
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


@dataclass(frozen=True)
class Profile:
    """Shapes and sizes of one run of the check ("gpu" on the lent machine, "cpu-rehearsal" here)."""

    name: str
    """"gpu" or "cpu-rehearsal"."""
    device: str
    """torch device every step runs on ("cuda" or "cpu")."""
    model_shape: Mapping[str, object]
    """Qwen2Config keyword arguments of the measured model."""
    learner_budgets: tuple[int, ...]
    """Micro-batch token budgets measured (each micro-batch is budget // learner_seq_len full rows)."""
    learner_seq_len: int
    """Tokens per row (a prompt + completion of that length)."""
    learner_micro_per_step: int
    """Micro-batches accumulated per optimizer step (DASH's small backprop increments)."""
    learner_steps: int
    """Timed optimizer steps per budget, after one untimed warm-up step."""
    engine_batch_sizes: tuple[int, ...]
    """Prompts per engine call (G = 1), smallest first."""
    engine_max_new_tokens: int
    """Tokens generated per prompt."""
    sync_repeats: int
    """Timed weight syncs (after one untimed)."""
    e2e_overrides: tuple[str, ...]
    """`python -m launch.train` overrides of the end-to-end run (run.dir is added)."""
    caps_s: Mapping[str, float]
    """Time cap of each step in seconds (the driver kills a step at its cap and goes on)."""


GPU = Profile(
    name="gpu", device="cuda", model_shape=QWEN25_05B_SHAPE,
    learner_budgets=(4096, 16384), learner_seq_len=1024, learner_micro_per_step=2, learner_steps=3,
    engine_batch_sizes=(1, 4, 16, 64, 256, 1024), engine_max_new_tokens=64, sync_repeats=5,
    # One GPU: the engine and the learner share it (colocated, half a GPU each in Ray's books);
    # the HF engine and the gloo sync are what runs without vLLM.
    e2e_overrides=("train.placement=colocated", "train.num_gpus=1", "train.iterations=10", "eval.every=0",
                   "train.actor_timeout_s=150"),
    caps_s={"learner": 150, "engine": 150, "sync": 90, "e2e": 240},
)
CPU_REHEARSAL = Profile(
    name="cpu-rehearsal", device="cpu", model_shape=TINY_SHAPE,
    learner_budgets=(256, 512), learner_seq_len=64, learner_micro_per_step=2, learner_steps=2,
    engine_batch_sizes=(1, 4, 16), engine_max_new_tokens=8, sync_repeats=3,
    # No SFT warm-up (on a shared 2-core machine it alone passed 10 minutes), so every reward is 0:
    # the filter is off so that the learner still backprops the batch.
    e2e_overrides=("train.placement=cpu", "train.iterations=1", "eval.every=0", "eval.size=16", "data.eval_size=16",
                   "model.sft_steps=0", "rollout.prompts_per_generation=16", "learner.prompts_per_step=16",
                   "learner.filter=false", "train.actor_timeout_s=300"),
    caps_s={"learner": 400, "engine": 200, "sync": 200, "e2e": 600},
)
PROFILES = {p.name: p for p in (GPU, CPU_REHEARSAL)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _tokenizer():
    from launch.tiny_model import train_tokenizer

    return train_tokenizer([f"Q: {a} + {3 * a + 7} = ?\nA: \\boxed{{{4 * a + 7}}}" for a in range(400)])


def build_model(p: Profile, eos_id: int, pad_id: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of the profile's shape, built on the profile's device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**p.model_shape, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(p.device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model.to(dtype)


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters, a tied one once (Qwen2.5-0.5B ties the LM head to the embedding):
    `nn.Module.parameters()` removes duplicates."""
    return list(model.parameters())


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_learner(p: Profile) -> dict:
    """ZeRO-2 bf16 optimizer steps on the profile's model at each token budget."""
    cuda = p.device == "cuda"
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from learner.config import LearnerConfig
    from learner.trainer import deepspeed_config
    from learner.losses import ppo_clip_loss_sum

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    model = build_model(p, eos_id=1, pad_id=0, dtype=torch.float32)
    n_params = sum(t.numel() for t in _params(model))
    cfg = LearnerConfig(zero_stage=2, bf16=True, micro_batch_tokens=max(p.learner_budgets), lr=1e-6)
    ds_config = {**deepspeed_config(cfg), "gradient_accumulation_steps": p.learner_micro_per_step}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    shape = p.model_shape
    flops_token = train_flops_per_token(n_params, shape["num_hidden_layers"], shape["hidden_size"], p.learner_seq_len)
    name = device_name(p.device)
    peak = bf16_peak(name) if cuda else None
    gen = torch.Generator(device=p.device).manual_seed(0)
    out = {"device_name": name, "model_params": n_params, "zero_stage": 2, "dtype": "bfloat16",
           "seq_len": p.learner_seq_len, "micro_batches_per_step": p.learner_micro_per_step,
           "flops_per_token": flops_token, "peak_tflops": peak.tflops if peak else None,
           "peak_source": peak.source if peak else "no bf16 peak known for this device: MFU not computed",
           "budgets": {}}
    for budget in p.learner_budgets:
        rows = budget // p.learner_seq_len
        ids = torch.randint(shape["vocab_size"], (rows, p.learner_seq_len), device=p.device, generator=gen)  # (R, T)
        advantages = torch.where(torch.rand(rows, p.learner_seq_len - 1, device=p.device, generator=gen) < 0.5, -1.0, 1.0)
        tokens_per_step = rows * p.learner_seq_len * p.learner_micro_per_step
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for step in range(1 + p.learner_steps):  # step 0 warms up kernels and the allocator
            _sync(p.device)
            t0 = time.perf_counter()
            for _ in range(p.learner_micro_per_step):
                logits = engine(input_ids=ids).logits  # (R, T, V)
                logprobs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # (R, T-1)
                flat = logprobs.reshape(-1)
                loss = ppo_clip_loss_sum(flat, flat.detach(), advantages.reshape(-1), torch.ones_like(flat),
                                         cfg.clip_eps_low, cfg.clip_eps_high).loss_sum / tokens_per_step
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
                del logits, logprobs, flat, loss
            _sync(p.device)
            if step:
                seconds.append(time.perf_counter() - t0)
        tps = tokens_per_step / statistics.median(seconds)
        entry = {"rows": rows, "tokens_per_step": tokens_per_step, "step_seconds_median": statistics.median(seconds),
                 "tokens_per_second": tps, "model_tflops": tps * flops_token / 1e12,
                 "mfu": tps * flops_token / (peak.tflops * 1e12) if peak else None}
        if cuda:
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["budgets"][str(budget)] = entry
        print(f"learner budget {budget}: {tps:,.0f} tok/s" + (f", MFU {entry['mfu']:.1%}" if peak else ""), flush=True)
    return out


def _engine_prompts(n: int) -> list:
    from rollout_workers.types import Prompt

    return [Prompt(f"b-{i}", f"Q: {i} + {3 * i + 7} = ?\nA:", "") for i in range(n)]


def _rate_curve(batch_sizes: tuple[int, ...], max_new_tokens: int, run: Callable[[int], int], deadline: float) -> dict:
    """tokens/s of `run(batch)` (it returns the tokens generated) for each batch size; a batch
    predicted (from the last rate: throughput only grows with batch) to end past `deadline` is skipped."""
    sizes, rates, skipped = [], [], []
    for b in batch_sizes:
        predicted = b * max_new_tokens / rates[-1] if rates else 0.0
        if time.monotonic() + predicted > deadline:
            skipped.append(b)
            continue
        t0 = time.perf_counter()
        tokens = run(b)
        rates.append(tokens / (time.perf_counter() - t0))
        sizes.append(b)
        print(f"  batch {b:5d}: {tokens:7d} tokens, {rates[-1]:10,.0f} tok/s", flush=True)
    return {"batch_sizes": sizes, "tokens_per_second": rates, "skipped_batch_sizes": skipped}


def measure_engine(p: Profile, cap_s: float) -> dict:
    """Generation tokens/s against batch size: the transformers engine, then vLLM if importable."""
    import tempfile

    from rollout_workers.engines.base import SamplingParamsSpec
    from rollout_workers.engines.hf import HFEngine

    started = time.monotonic()
    dtype = "bfloat16" if p.device == "cuda" else "float32"
    tokenizer = _tokenizer()
    out: dict = {"device_name": device_name(p.device), "dtype": dtype, "max_new_tokens": p.engine_max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(p, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.bfloat16 if p.device == "cuda" else torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        engine = HFEngine(tmp, dtype=dtype, device=p.device, gen_batch_tokens=10**9)  # one generate() per call
        out["model_params"] = sum(t.numel() for _, t in engine.named_weights())

        def hf_run(batch: int) -> int:
            params = SamplingParamsSpec(n=1, max_new_tokens=p.engine_max_new_tokens, seed=0)
            return sum(len(c.token_ids) for g in engine.generate(_engine_prompts(batch), params) for c in g.completions)

        hf_run(2)  # warm-up
        # vLLM gets the last third of the cap (when it is importable at all)
        out["transformers"] = _rate_curve(p.engine_batch_sizes, p.engine_max_new_tokens, hf_run,
                                          started + 0.6 * cap_s)
        del engine
        if p.device == "cuda":
            torch.cuda.empty_cache()
        try:
            import vllm
        except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
            out["vllm"] = {"available": False, "reason": f"import vllm failed: {type(e).__name__}: {e}"}
            return out
        if p.device != "cuda":
            out["vllm"] = {"available": False, "reason": f"vllm {vllm.__version__} is importable but this profile runs on CPU"}
            return out
        try:  # never run anywhere yet: its failure must not cost the transformers figures above
            # eager mode: CUDA-graph capture would eat the step's cap before the first token
            llm = vllm.LLM(model=tmp, dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True, seed=0)
            sampling = vllm.SamplingParams(max_tokens=p.engine_max_new_tokens, ignore_eos=True, temperature=1.0)

            def vllm_run(batch: int) -> int:
                texts = [q.text for q in _engine_prompts(batch)]
                return sum(len(o.outputs[0].token_ids) for o in llm.generate(texts, sampling, use_tqdm=False))

            vllm_run(2)
            out["vllm"] = {"available": True, "version": vllm.__version__, "enforce_eager": True,
                           **_rate_curve(p.engine_batch_sizes, p.engine_max_new_tokens, vllm_run, started + cap_s - 10)}
        except Exception as e:  # noqa: BLE001 - recorded in the table, with the type and message
            out["vllm"] = {"available": False, "reason": f"vllm {vllm.__version__} failed: {type(e).__name__}: {e}"}
    return out


def _pack(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in params:
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()


def _unpack(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in params:
            t.view(-1).copy_(flat[offset:offset + t.numel()])
            offset += t.numel()


def _ipc_receiver(p: Profile, to_receiver, to_sender) -> None:
    """The engine side of the IPC sync (a spawned process): map the shared buffer once, then for
    every version copy it into its own model and report the seconds and per-tensor sums."""
    flat = to_receiver.get(timeout=120)  # opened through CUDA IPC (or shared memory on CPU)
    model = build_model(p, eos_id=1, pad_id=0, dtype=torch.bfloat16, seed=1)
    params = [t.detach() for t in _params(model)]
    to_sender.put("ready")
    while (version := to_receiver.get(timeout=120)) is not None:
        t0 = time.perf_counter()
        _unpack(flat, params)
        _sync(p.device)
        to_sender.put((version, time.perf_counter() - t0, [float(t.double().sum()) for t in params]))


def _median_seconds(fn: Callable[[], None], device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_sync(p: Profile) -> dict:
    """Learner -> engine weight copy on one device (in-process and through IPC) vs a memcpy."""
    import torch.multiprocessing as mp

    learner_model = build_model(p, eos_id=1, pad_id=0, dtype=torch.bfloat16, seed=0)
    learner_params = [t.detach() for t in _params(learner_model)]
    nbytes = sum(t.numel() * t.element_size() for t in learner_params)
    numel = sum(t.numel() for t in learner_params)
    src = torch.empty(nbytes, dtype=torch.uint8, device=p.device)
    dst = torch.empty_like(src)
    memcpy_s = _median_seconds(lambda: dst.copy_(src), p.device, p.sync_repeats)
    del src, dst
    engine_params = [t.detach() for t in _params(build_model(p, eos_id=1, pad_id=0, dtype=torch.bfloat16, seed=1))]

    def copy_in_process() -> None:
        for e, l in zip(engine_params, learner_params):
            e.copy_(l)

    in_process_s = _median_seconds(copy_in_process, p.device, p.sync_repeats)
    in_process_diff = max(float((e.float() - l.float()).abs().max()) for e, l in zip(engine_params, learner_params))
    del engine_params

    ctx = mp.get_context("spawn")
    to_receiver, to_sender = ctx.Queue(), ctx.Queue()
    flat = torch.empty(numel, dtype=torch.bfloat16, device=p.device)
    if p.device == "cpu":
        flat.share_memory_()
    receiver = ctx.Process(target=_ipc_receiver, args=(p, to_receiver, to_sender), daemon=True)
    receiver.start()
    try:
        to_receiver.put(flat)
        if to_sender.get(timeout=120) != "ready":
            raise RuntimeError("IPC receiver did not start")
        rounds, receive_s = [], []
        for version in range(1 + p.sync_repeats):
            with torch.no_grad():  # a new version: the learner's weights change between syncs
                learner_params[version % len(learner_params)].add_(1.0)
            _sync(p.device)
            t0 = time.perf_counter()
            _pack(learner_params, flat)
            _sync(p.device)
            to_receiver.put(version)
            got_version, seconds, sums = to_sender.get(timeout=120)
            if version:
                rounds.append(time.perf_counter() - t0)
                receive_s.append(seconds)
        if got_version != version:
            raise RuntimeError(f"IPC receiver answered version {got_version}, expected {version}")
        ipc_diff = max(abs(s - float(t.double().sum())) for s, t in zip(sums, learner_params))
        to_receiver.put(None)
        receiver.join(timeout=60)
    finally:
        if receiver.is_alive():
            receiver.terminate()
    ipc_s = statistics.median(rounds)
    out = {"device_name": device_name(p.device), "bytes": nbytes, "tensors": len(learner_params), "dtype": "bfloat16",
           "memcpy_seconds": memcpy_s, "memcpy_gb_per_s": nbytes / memcpy_s / 1e9,
           "in_process_seconds": in_process_s, "in_process_vs_memcpy": in_process_s / memcpy_s,
           "in_process_max_abs_diff": in_process_diff,
           "ipc_seconds": ipc_s, "ipc_receiver_copy_seconds": statistics.median(receive_s),
           "ipc_vs_memcpy": ipc_s / memcpy_s, "ipc_max_abs_sum_diff": ipc_diff,
           "ipc_mechanism": "CUDA IPC (torch.multiprocessing)" if p.device == "cuda" else "shared memory (CPU rehearsal)"}
    print(f"sync {nbytes / 1e6:.2f} MB: memcpy {memcpy_s * 1e3:.2f} ms, in-process {in_process_s * 1e3:.2f} ms, "
          f"IPC {ipc_s * 1e3:.2f} ms", flush=True)
    return out


def e2e_command(p: Profile, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launch.train", *p.e2e_overrides, f"run.dir={run_dir}"]


def measure_e2e(p: Profile, cap_s: float, run_dir: Path) -> dict:
    """The embedded default through `python -m launch.train`; figures from its summary.json.
    A run that wrote its summary and then failed (e.g. no matplotlib for the plots on a bare GPU
    machine) still gives its figures, with the exit status and last line recorded."""
    cmd = e2e_command(p, run_dir)
    train_log = run_dir.parent / "e2e-train.log"
    t0 = time.perf_counter()
    with train_log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(1.0, cap_s - 40))
        except subprocess.TimeoutExpired:
            proc.terminate()  # launch.train's SIGTERM handler stops what the run started (Ray actors, pools)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()  # Ray's own processes die with it (they fate-share with their parent)
                proc.wait(timeout=30)
            rc = None
    wall = time.perf_counter() - t0
    output = train_log.read_text(errors="replace")
    print(output, flush=True)  # into this step's log
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    summary_path = run_dir / "summary.json"
    if rc is None:
        raise RuntimeError(f"launch.train stopped at the step's cap ({cap_s:.0f} s); last line: {last}")
    if not summary_path.exists():
        raise RuntimeError(f"launch.train exited {rc} without a summary.json: {last}")
    summary = json.loads(summary_path.read_text())
    return {"command": " ".join(["python", "-m", "launch.train", *p.e2e_overrides]),
            "accuracy_before_rl": summary["eval_accuracy_before_rl"], "accuracy_after_rl": summary["eval_accuracy_after_rl"],
            "iterations": summary["iterations"], "run_wall_seconds": summary["wall_seconds"], "command_wall_seconds": wall,
            "exit_code": rc, "exit_note": last if rc else ""}


STEPS = ("learner", "engine", "sync", "e2e")


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m launch.gpu_check.steps", description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--profile", choices=list(PROFILES), required=True)
    ap.add_argument("--json", required=True, help="write the step's figures here")
    ap.add_argument("--cap-s", type=float, default=0.0, help="the step's time cap (0 = the profile's)")
    args = ap.parse_args(argv)
    p = PROFILES[args.profile]
    cap = args.cap_s or p.caps_s[args.step]
    if p.device == "cpu":
        # The sync step's copies run single-threaded (as launch.bench's sync does): a 2-thread
        # OpenMP copy on a shared 2-core machine mostly measures thread wake-ups.
        torch.set_num_threads(1 if args.step == "sync" else min(2, os.cpu_count() or 1))
    elif not torch.cuda.is_available():
        raise SystemExit(f"profile {p.name} needs CUDA, and torch {torch.__version__} sees no GPU")
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.step == "learner":
        result = measure_learner(p)
    elif args.step == "engine":
        result = measure_engine(p, cap)
    elif args.step == "sync":
        result = measure_sync(p)
    else:
        result = measure_e2e(p, cap, out_path.parent / "e2e-run")
    out_path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
