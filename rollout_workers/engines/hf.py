"""Hugging Face transformers engine: `model.generate` with sampling, for CPU and small GPUs.

Preemptive sampling (DASH, arXiv 2505.17218 Sec. 4) wants one engine call for a whole step's
prompts; `generate` then runs them in chunks that fit a token budget (prompts x G x (prompt +
max_new) <= gen_batch_tokens), and each chunk's groups are yielded as soon as the chunk ends.

Shared prefill: the G samples of a prompt share its KV cache. The engine runs the prompts (all but
their last token) through the model once, repeats each row's cache G times
(`DynamicCache.batch_repeat_interleave`), and lets `generate` continue from there; without this,
`num_return_sequences=G` recomputes every prompt G times, which dominates on CPU when prompts (a
chat template's system turn) are longer than the completions.

The logprobs are taken from the *processed* scores that `generate` samples from (after the
temperature and top-p warpers), so they are exactly the sampling distribution's logprobs, which
is what the PPO importance ratio's denominator must be. They are gathered step by step by a
logits processor placed after the warpers, instead of `output_scores=True`, which would keep
(B*G, T, V) floats: 13 GB for a 65k-token budget and a 49k vocabulary.

    PYTHONPATH=$PWD python -m pytest -q tests/test_engines.py
"""
from __future__ import annotations

import inspect
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, LogitsProcessor, LogitsProcessorList,
                          TemperatureLogitsWarper, TopPLogitsWarper)

from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import (TORCH_DTYPES, Engine, EngineOptions, GroupOutput, SamplingParamsSpec,
                                          check_weight_set, encode_prompts)
from rollout_workers.seeding import derive_seed
from rollout_workers.types import Completion, Prompt


class HFEngine(Engine):
    """A transformers causal LM that samples groups of completions. No optional capability: it
    cannot sleep, and takes weights only as named tensors (`update_weights`)."""

    @classmethod
    def from_config(cls, cfg: RolloutConfig, model_path: str, options: EngineOptions) -> "HFEngine":
        return cls(model_path, dtype=cfg.dtype, device=options.device, gen_batch_tokens=cfg.gen_batch_tokens,
                   seed=cfg.seed)

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu",
                 gen_batch_tokens: int = RolloutConfig.gen_batch_tokens, seed: int = 0, shared_prefill: bool = True) -> None:
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"HFEngine dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
        if gen_batch_tokens < 1:
            raise ValueError(f"HFEngine gen_batch_tokens must be >= 1, got {gen_batch_tokens}")
        self._device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[dtype]).to(self._device)
        self._model.eval()
        self._gen_batch_tokens = gen_batch_tokens
        self._seed = seed
        self._shared_prefill = shared_prefill
        """False: `num_return_sequences=G`, each prompt prefilled G times (launch.bench.prefill's baseline)."""
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self._model.forward).parameters else "past_key_values"
        """The model's name for its KV cache argument: transformers >= 5.20 renamed past_key_values
        to cache (5.19 is what the vLLM CPU build pins, so both must work)."""
        self._version = 0
        self.context = int(self._model.config.max_position_embeddings)
        eos = self._model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self._tokenizer.eos_token_id is not None:
            eos.append(self._tokenizer.eos_token_id)
        if not eos:
            raise ValueError(f"model at {model_path} defines no EOS token; completions could never stop")
        self._eos_ids = tuple(sorted(set(eos)))
        # Tied embeddings: `lm_head.weight` is the same tensor as the input embedding; accept it
        # in an update (optional) but do not require it.
        params = dict(self._model.named_parameters())
        self._expected = {n: tuple(p.shape) for n, p in params.items()}
        self._optional = {n: tuple(t.shape) for n, t in self._model.state_dict().items() if n not in params}

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> torch.nn.Module:
        """The underlying transformers model (the fake vLLM's workers load weights into it)."""
        return self._model

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self._model.named_parameters():
            yield name, p.detach()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        new = check_weight_set(named_tensors, self._expected, self._optional)
        state = self._model.state_dict()
        with torch.no_grad():
            for name, tensor in new.items():
                # copy_ casts to the engine's dtype/device (learner fp32 -> engine bf16, say).
                state[name].copy_(tensor)
        self._version = int(version)

    def chunks(self, prompt_lens: Sequence[int], n: int, max_new_tokens: int) -> list[range]:
        """Split prompt indices (in order) into generate() chunks within the token budget; a chunk
        holds at least one prompt, and its cost counts the left-padding to its longest prompt."""
        out: list[range] = []
        start, longest = 0, 0
        for i, plen in enumerate(prompt_lens):
            longest_with = max(longest, plen)
            if i > start and (i - start + 1) * n * (longest_with + max_new_tokens) > self._gen_batch_tokens:
                out.append(range(start, i))
                start, longest_with = i, plen
            longest = longest_with
        if start < len(prompt_lens):
            out.append(range(start, len(prompt_lens)))
        return out

    def generate(self, prompts: Sequence[Prompt], params: SamplingParamsSpec) -> Iterator[GroupOutput]:
        encoded = encode_prompts(self._tokenizer, prompts, params.max_new_tokens, self.context)
        version = self._version
        self.completed_prompts = 0
        for c, idx in enumerate(self.chunks([len(e) for e in encoded], params.n, params.max_new_tokens)):
            rows = self.sample_token_ids([encoded[i] for i in idx], params, seed=derive_seed(params.seed, "chunk", c))
            self.completed_prompts += len(idx)
            for j, i in enumerate(idx):
                group = tuple(rows[j * params.n:(j + 1) * params.n])
                yield GroupOutput(prompts[i], tuple(encoded[i]), group, version)

    @torch.no_grad()
    def sample_token_ids(self, encoded: list[list[int]], params: SamplingParamsSpec, seed: int) -> list[Completion]:
        """One generate() call on already tokenized prompts: B x G completions, prompt-major."""
        batch = self._tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt").to(self._device)
        width = batch["input_ids"].shape[1]
        # Sampling from the policy itself: every knob a checkpoint's generation_config may set
        # (Qwen sets top_k, top_p, temperature, repetition_penalty) is neutralised, and the
        # temperature/top-p warpers are passed as processors so the recorder can run after them.
        neutral = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, renormalize_logits=False)
        recorder = _SampledTokenLogprobs()
        processors = LogitsProcessorList()
        if params.greedy:
            # Argmax gives G identical completions: decode once, copy G times (generate refuses
            # num_return_sequences > 1 without sampling).
            sampling = dict(do_sample=False)
        else:
            sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_p=None, typical_p=1.0,
                            epsilon_cutoff=0.0, eta_cutoff=0.0)
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        processors.append(recorder)
        inputs, copies = dict(batch), 1
        if not params.greedy and self._shared_prefill:
            inputs = self._prefill_once(batch["input_ids"], batch["attention_mask"], params.n)
        elif not params.greedy:
            copies = params.n  # generate() repeats each prompt row, prefill included
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self._seed, seed))
            sequences = self._model.generate(
                **inputs, max_new_tokens=params.max_new_tokens, logits_processor=processors,
                eos_token_id=list(self._eos_ids), pad_token_id=self._tokenizer.pad_token_id,
                num_return_sequences=copies, return_dict_in_generate=False, **neutral, **sampling)
        new_tokens = sequences[:, width:]  # (B*G, T)
        logprobs_sampler = recorder.result(sequences)  # (B*G, T)
        completions = [Completion(token_ids=row.token_ids, logprobs_sampler=row.logprobs, finish_reason=row.finish_reason,
                                  text=self._tokenizer.decode(row.token_ids, skip_special_tokens=True))
                       for row in cut_at_eos(new_tokens, logprobs_sampler, self._eos_ids)]
        if params.greedy:
            completions = [c for c in completions for _ in range(params.n)]
        return completions

    def _prefill_once(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> dict:
        """generate() inputs for `n` samples per prompt whose prompt KV cache is computed once.

        `input_ids`/`attention_mask` are the left-padded prompts, (B, P). All but the last prompt
        token go through the model once, at the positions generate() itself would give them (its
        left-padding aware cumsum of the mask); the cache is then repeated `n` times per row, and
        generate() is handed the (B*n, P) prompts with that cache, so it runs only the last prompt
        token and the new ones. Rows are prompt-major, as with `num_return_sequences=n`.
        """
        if input_ids.shape[1] < 2:  # nothing to share but the token generate() must run anyway
            return dict(input_ids=input_ids.repeat_interleave(n, 0),
                        attention_mask=attention_mask.repeat_interleave(n, 0))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        cache = DynamicCache(config=self._model.config)
        # logits_to_keep=1: the prefill's logits are not used (generate recomputes the last
        # position), and all of them would be (B, P, V) floats.
        self._model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                    position_ids=position_ids[:, :-1], use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        cache.batch_repeat_interleave(n)
        return {"input_ids": input_ids.repeat_interleave(n, 0), "attention_mask": attention_mask.repeat_interleave(n, 0),
                self._cache_kwarg: cache}


class CutRow(NamedTuple):
    """One generated row up to and including its first EOS, as Python values."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    """"stop" (ended with an EOS, kept) or "length" (hit max_new_tokens)."""


def cut_at_eos(new_tokens: torch.Tensor, logprobs: torch.Tensor, eos_ids: Sequence[int]) -> list[CutRow]:
    """Cut each (B*G, T) row after its first EOS token. The lengths are found on the tensors' device
    (first EOS by argmax), and each tensor crosses to the CPU once: reading them element by element
    costs one device sync per token on a GPU (65k syncs at batch 1024 x 64 tokens)."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))  # (N, T)
    has_eos = is_eos.any(dim=1)  # (N,)
    # argmax returns the first maximal index; a row without EOS keeps all T tokens
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, new_tokens.shape[1])  # (N,)
    tokens, lps = new_tokens.tolist(), logprobs.tolist()
    return [CutRow(tuple(t[:n]), tuple(lp[:n]), "stop" if stop else "length")
            for t, lp, n, stop in zip(tokens, lps, lengths.tolist(), has_eos.tolist())]


class _SampledTokenLogprobs(LogitsProcessor):
    """Last logits processor of a generate() call: keeps the log-softmax of the final processed
    scores of the current step, and at the next step (or `result`) gathers the logprob of the token
    that was sampled from them. Memory: one (B*G, V) step, not the whole (B*G, T, V)."""

    def __init__(self) -> None:
        self._step_logprobs: torch.Tensor | None = None  # (B*G, V) of the step being sampled
        self._gathered: list[torch.Tensor] = []  # T x (B*G,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather(input_ids[:, -1])
        self._step_logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _gather(self, sampled: torch.Tensor) -> None:
        if self._step_logprobs is not None:
            self._gathered.append(self._step_logprobs.gather(-1, sampled[:, None])[:, 0])

    def result(self, sequences: torch.Tensor) -> torch.Tensor:
        """Logprobs of every sampled token, (B*G, T), given generate()'s output sequences."""
        self._gather(sequences[:, -1])
        self._step_logprobs = None
        return torch.stack(self._gathered, dim=1)
