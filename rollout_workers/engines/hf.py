"""Hugging Face transformers engine: a transformers causal LM sampled by our decode loop, for CPU and small GPUs.

Preemptive sampling (DASH, arXiv 2505.17218 Sec. 4) wants one engine call for a whole step's
prompts; the engine runs them in chunks that fit a token budget (prompts x G x (prompt +
max_new) <= gen_batch_tokens), and each chunk's groups are yielded as soon as the chunk ends.

Shared prefill: the G samples of a prompt share its KV cache. The engine runs the prompts (all but
their last token) through the model once, repeats each row's cache G times
(`DynamicCache.batch_repeat_interleave`) and decodes from there; `model.generate` with
`num_return_sequences=G` recomputes every prompt G times, which dominates on CPU when prompts (a
chat template's system turn) are longer than the completions.

The decode loop (`HFEngine._decode`) replaces `model.generate` because generate keeps computing
every finished row until the longest row of the batch ends; here rows that ended leave the batch
and the KV cache (`DynamicCache.batch_select_indices`), and the cache is reserved for the whole
decode (`ReservedLayer`) instead of grown by `torch.cat`, which copies all of it at every token.
Its logprobs are those of the distribution each token was drawn from (after the temperature and
top-p warpers), which is what the PPO importance ratio's denominator must be, taken one (N, V)
step at a time: keeping the scores of all steps would be (N, T, V) floats, 13 GB for a 65k-token
budget and a 49k vocabulary.

    PYTHONPATH=$PWD python -m pytest -q tests/test_engines.py
"""
from __future__ import annotations

import inspect
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

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
                 gen_batch_tokens: int = RolloutConfig.gen_batch_tokens, seed: int = 0, shared_prefill: bool = True,
                 compact_at: float = 0.125, reserve_cache: bool = True) -> None:
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
        """False: each prompt prefilled G times, as `model.generate(num_return_sequences=G)` does (launch.bench.prefill's baseline)."""
        if not compact_at > 0:
            raise ValueError(f"HFEngine compact_at must be > 0, got {compact_at}")
        self._compact_at = compact_at
        """Fraction of a decode batch whose rows have ended at which they leave it (`_decode`); > 1 = never
        (what `model.generate` does: launch.bench.decode's baseline). 1/8 measured best of 1/32-1/2 on
        the reasoning task (README, "Sampling speed")."""
        self._reserve_cache = reserve_cache
        """False: transformers' `DynamicLayer`, grown by `torch.cat` at every token (launch.bench.decode's baseline)."""
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
        """Split prompt indices (in order) into decode chunks within the token budget; a chunk
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
        """One decode of already tokenized prompts: B x G completions, prompt-major."""
        batch = self._tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt").to(self._device)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, P)
        # Argmax gives G identical completions: decode once, copy G times.
        copies = 1 if params.greedy else params.n
        # The cache holds the prompt and every new token but the last (never run through the model).
        capacity = input_ids.shape[1] + params.max_new_tokens - 1
        if self._shared_prefill:
            cache = self._prefill(input_ids, attention_mask, capacity)
            cache.batch_repeat_interleave(copies)
        input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        if not self._shared_prefill:
            cache = self._prefill(input_ids, attention_mask, capacity)
        # Sampling from the policy itself: none of the knobs a checkpoint's generation_config may
        # set (Qwen sets top_k and repetition_penalty) applies; only the requested temperature and top-p.
        warpers = []
        if not params.greedy and params.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
        if not params.greedy and params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self._seed, seed))
            new_tokens, logprobs_sampler = self._decode(input_ids, attention_mask, cache, warpers, params)  # (B*G, T)
        completions = [Completion(token_ids=row.token_ids, logprobs_sampler=row.logprobs, finish_reason=row.finish_reason,
                                  text=self._tokenizer.decode(row.token_ids, skip_special_tokens=True))
                       for row in cut_at_eos(new_tokens, logprobs_sampler, self._eos_ids)]
        if params.greedy:
            completions = [c for c in completions for _ in range(params.n)]
        return completions

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int) -> DynamicCache:
        """The KV cache of all but the last token of the left-padded prompts `input_ids` (B, P), at
        the positions of their unpadded tokens; the decode runs the last token. Sampling calls it
        for the B distinct prompts and repeats the cache G times (shared prefill). Its full-attention
        layers reserve `capacity` positions (sliding-window layers keep transformers' own)."""
        cache = DynamicCache(config=self._model.config)
        if self._reserve_cache:
            cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
        if input_ids.shape[1] > 1:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
            # logits_to_keep=1: the prefill's logits are not used, and all of them would be (B, P, V) floats.
            self._model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                        position_ids=position_ids[:, :-1], use_cache=True, logits_to_keep=1,
                        **{self._cache_kwarg: cache})
        return cache

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache,
                warpers: list, params: SamplingParamsSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample up to max_new_tokens per row after prompts whose cache `_prefill` holds; returns
        the new tokens (N, T), padded after a row's EOS, and the logprob of each under the
        distribution it was drawn from (after the temperature and top-p warpers: the PPO ratio's
        denominator must be the sampling distribution's).

        Rows that ended leave the batch, and the KV cache, once they are `compact_at` of it:
        `model.generate` keeps computing every finished row until the longest ends, a quarter of
        the decode's row-steps on the reasoning task (72 of 96 tokens on average). Compacting at
        every single EOS would copy the whole cache at most steps."""
        n, max_new = input_ids.shape[0], params.max_new_tokens
        device = input_ids.device
        tokens = torch.full((n, max_new), self._tokenizer.pad_token_id, dtype=torch.long, device=device)  # (N, T)
        logprobs = torch.zeros((n, max_new), dtype=torch.float32, device=device)  # (N, T)
        rows = torch.arange(n, device=device)  # batch row -> output row
        running = torch.ones(n, dtype=torch.bool, device=device)  # batch rows that have not ended
        eos = torch.tensor(self._eos_ids, device=device)
        mask = attention_mask  # (N', P + t): left padding, cached tokens, the token being run
        position = attention_mask.long().sum(-1, keepdim=True) - 1  # (N', 1): the last prompt token's
        step_ids = input_ids[:, -1:]  # (N', 1)
        for t in range(max_new):
            logits = self._model(input_ids=step_ids, attention_mask=mask, position_ids=position, use_cache=True,
                                 **{self._cache_kwarg: cache}).logits[:, -1].float()  # (N', V)
            for warp in warpers:
                logits = warp(step_ids, logits)
            step_logprobs = torch.log_softmax(logits, -1)  # (N', V)
            sampled = logits.argmax(-1) if params.greedy else torch.multinomial(step_logprobs.exp(), 1)[:, 0]  # (N',)
            out = rows[running]
            tokens[out, t] = sampled[running]
            logprobs[out, t] = step_logprobs.gather(-1, sampled[:, None])[running, 0]
            running &= ~torch.isin(sampled, eos)
            if not running.any():
                return tokens[:, :t + 1], logprobs[:, :t + 1]
            if (~running).sum() >= self._compact_at * len(running):
                keep = running.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, running, mask, sampled, position = rows[keep], running[keep], mask[keep], sampled[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], -1)
            step_ids, position = sampled[:, None], position + 1
        return tokens, logprobs


class ReservedLayer(DynamicLayer):
    """One layer's KV cache in buffers reserved for the whole decode, (N, H, capacity, D) each:
    a step writes its token's keys and values in place and attention reads a view of the filled
    positions. transformers' `DynamicLayer` grows by `torch.cat`, which copies the whole cache at
    every token: the reasoning bench's decode (512 rows, up to 96 new tokens) took 2.93 s that way
    and 2.22 s with this layer (`python -m launch.bench decode --cache reserved dynamic`, README
    "Sampling speed (third round)"). Past `capacity` it grows by doubling, so a wrong estimate
    costs time, never tokens."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"ReservedLayer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self._keys_buffer = self._values_buffer = None  # (N, H, capacity, D)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        n, heads, _, dim = key_states.shape
        self._keys_buffer = key_states.new_empty(n, heads, self.capacity, dim)
        self._values_buffer = value_states.new_empty(n, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys_buffer.shape[-2]:
            grow = max(end, 2 * self._keys_buffer.shape[-2]) - self._keys_buffer.shape[-2]
            self._keys_buffer = torch.nn.functional.pad(self._keys_buffer, (0, 0, 0, grow))
            self._values_buffer = torch.nn.functional.pad(self._values_buffer, (0, 0, 0, grow))
        self._keys_buffer[:, :, self.length:end] = key_states
        self._values_buffer[:, :, self.length:end] = value_states
        self.length = end
        return self._view()

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self._keys_buffer[:, :, :self.length], self._values_buffer[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._keys_buffer = self._keys_buffer.repeat_interleave(repeats, dim=0)
            self._values_buffer = self._values_buffer.repeat_interleave(repeats, dim=0)
            self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._keys_buffer, self._values_buffer = self._keys_buffer[indices], self._values_buffer[indices]
            self._view()


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
