"""What every transport shares: the send plan (names, full shapes, tied aliases, buckets), the
bucket-by-bucket ZeRO-3 gather, dtype casting, flat packing of a bucket and the JSON header.

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py -k "bucket or pack or header or plan"

A bucket is the unit of one collective: its tensors are gathered together (never the whole model
at once under ZeRO-3), cast to the wire dtype and copied into one contiguous uint8 buffer, so one
broadcast moves the whole bucket. The plan is a pure function of names and full shapes, so every
learner rank derives the same buckets and their ZeRO-3 gathers line up without any exchange.
"""
from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

NameMap = Callable[[str], str]


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a wire/engine dtype name; a clear error for anything else."""
    if name not in WIRE_DTYPES:
        raise ValueError(f"unsupported weight dtype {name!r}; expected one of {sorted(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of `dtype_from_name`."""
    for name, value in WIRE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported weight dtype {dtype}; expected one of {sorted(WIRE_DTYPES)}")


def strip_module_prefix(name: str) -> str:
    """Default training-name -> engine-name map: DeepSpeedEngine (and DDP) wrap the model as
    `.module`, so its parameter names start with "module."; the engine's HF model has none."""
    return name[len("module."):] if name.startswith("module.") else name


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full (unpartitioned) shape: ZeRO-3 leaves an empty local tensor and keeps the real
    shape in `ds_shape`."""
    return tuple(param.ds_shape) if hasattr(param, "ds_id") else tuple(param.shape)


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Materialise the full values of `params` for the duration of the block.

    ZeRO-3 partitions each parameter across the learner ranks; `GatheredParameters` all-gathers
    exactly these (one bucket), read-only (`modifier_rank=None`), and re-partitions on exit. It is
    a collective: every learner rank must enter it with the same list. Other params: no-op."""
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield


class SendPlan(NamedTuple):
    """Everything a sender needs per round, derived from names and full shapes only."""

    names: list[str]                       # engine names, send order
    params: list[torch.nn.Parameter]       # same order; tied duplicates removed
    shapes: list[tuple[int, ...]]          # full shapes
    aliases: dict[str, str]                # dropped tied engine name -> the engine name that is sent
    buckets: list[list[int]]               # indices into names, in order


def plan_buckets(nbytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Greedy, order-preserving split: a bucket closes before the tensor that would push it over
    `bucket_bytes`; a tensor larger than `bucket_bytes` travels alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(nbytes):
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


def make_plan(named_params: Iterable[tuple[str, torch.nn.Parameter]], wire_dtype: torch.dtype,
              bucket_bytes: int, name_map: NameMap = strip_module_prefix) -> SendPlan:
    """Map names, drop tied duplicates (a parameter object seen twice, e.g. `lm_head.weight`
    tied to `embed_tokens.weight`, is sent once and re-tied by the receiver) and bucket."""
    names: list[str] = []
    params: list[torch.nn.Parameter] = []
    shapes: list[tuple[int, ...]] = []
    aliases: dict[str, str] = {}
    shapes_by_name: dict[str, tuple[int, ...]] = {}
    first_name: dict[int, str] = {}
    for train_name, param in named_params:
        name = name_map(train_name)
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
            continue
        if name in aliases or name in shapes_by_name:
            raise ValueError(f"two parameters map to the engine name {name!r} (last: {train_name!r})")
        first_name[id(param)] = name
        shapes_by_name[name] = full_shape(param)
        names.append(name)
        params.append(param)
        shapes.append(shapes_by_name[name])
    if not names:
        raise ValueError("no parameters to send")
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    nbytes = [itemsize * _numel(s) for s in shapes]
    return SendPlan(names, params, shapes, aliases, plan_buckets(nbytes, bucket_bytes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bucket_nbytes(shapes: list[tuple[int, ...]], wire_dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    return sum(itemsize * _numel(s) for s in shapes)


def pack_bucket(tensors: list[torch.Tensor], wire_dtype: torch.dtype, staging: torch.Tensor | None = None
                ) -> torch.Tensor:
    """One contiguous uint8 buffer holding every tensor cast to `wire_dtype`, back to back.
    The cast happens inside the single copy into the buffer (no intermediate tensor). With
    `staging` (a uint8 buffer at least that large) the result is a prefix view of it: reusing one
    buffer avoids the page faults of a fresh allocation, which cost ~4x the copy itself on CPU."""
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    total = sum(t.numel() for t in tensors) * itemsize
    if staging is None:
        flat = torch.empty(total, dtype=torch.uint8)
    elif staging.numel() < total:
        raise ValueError(f"staging buffer holds {staging.numel()} bytes, the bucket needs {total}")
    else:
        flat = staging[:total]
    typed = flat.view(wire_dtype)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            typed[offset:offset + n].copy_(t.detach().reshape(-1))
            offset += n
    return flat


def unpack_bucket(flat: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]],
                  wire_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack_bucket`: views into `flat` (no copy), one per name."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"packed bucket must be a 1-D uint8 tensor, got {flat.dtype} {tuple(flat.shape)}")
    expected = bucket_nbytes(shapes, wire_dtype)
    if flat.numel() != expected:
        raise ValueError(f"packed bucket holds {flat.numel()} bytes, its header says {expected}")
    typed = flat.view(wire_dtype)
    out = []
    offset = 0
    for name, shape in zip(names, shapes):
        n = _numel(shape)
        out.append((name, typed[offset:offset + n].view(shape)))
        offset += n
    return out


def max_bucket_nbytes(plan: SendPlan, wire_dtype: torch.dtype) -> int:
    return max(bucket_nbytes([plan.shapes[i] for i in idx], wire_dtype) for idx in plan.buckets)


def packed_buffer_bytes(plan: SendPlan, wire_dtype: torch.dtype, bucket_bytes: int) -> int:
    """Size of vLLM's packed transfer buffer (`packed_buffer_size_bytes`) for this plan: the bucket
    size, or the largest single tensor when that is bigger. vLLM's IPC producer allocates exactly
    this much and raises for any tensor larger than it (packed_tensor.py l.305-350 in vLLM 0.33.0),
    while our plan lets an oversized tensor travel alone (e.g. Qwen2.5-0.5B's bf16 embedding,
    ~260 MiB, against the default 64 MiB bucket). A pure function of names and full shapes, so
    every learner rank computes the same size (ZeRO-3 ranks hold only a partition)."""
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    return max(bucket_bytes, max(itemsize * _numel(s) for s in plan.shapes))


def params_off_device(plan: SendPlan, device_type: str) -> list[str]:
    """Names of the plan's parameters that do not live on `device_type` (e.g. "cuda"): a GPU
    transport must refuse these before any engine is told to receive (a learner that fell back to
    CPU would otherwise leave the engines waiting inside a NCCL receive for ever)."""
    return [name for name, p in zip(plan.names, plan.params) if p.device.type != device_type]


def iter_packed_buckets(plan: SendPlan, wire_dtype: torch.dtype, staging: list[torch.Tensor] | None = None
                        ) -> Iterator[torch.Tensor]:
    """Gather (ZeRO-3), cast and pack one bucket at a time. Every learner rank must drive this
    to the end, in step, because each gather is a collective among them. With `staging`, bucket
    k is a view of `staging[k % len(staging)]`: with two buffers the consumer can still be sending
    bucket k-1 while bucket k is packed, but must be done with k-1 before asking for k+1."""
    for k, idx in enumerate(plan.buckets):
        params = [plan.params[i] for i in idx]
        with gathered(params):
            flat = pack_bucket([p.data for p in params], wire_dtype, None if staging is None else staging[k % len(staging)])
        yield flat


def iter_cast_tensors(plan: SendPlan, wire_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-tensor form of `iter_packed_buckets` (for vLLM's `WeightSource.iter_full`): gathers a
    bucket, then yields each tensor cast to `wire_dtype` as a private copy, because the gathered
    storage is released when the bucket's gather closes and the consumer may still hold it."""
    for idx in plan.buckets:
        params = [plan.params[i] for i in idx]
        with gathered(params):
            copies = [p.data.detach().to(wire_dtype, copy=True) for p in params]
        for i, t in zip(idx, copies):
            yield plan.names[i], t


def encode_header(header: dict) -> torch.Tensor:
    """A JSON header as a uint8 tensor (never pickle: the receiver only parses data)."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode_header(buf: torch.Tensor) -> dict:
    return json.loads(bytes(buf.numpy().tobytes()).decode("utf-8"))


def plan_header(plan: SendPlan, version: int, wire_dtype: torch.dtype) -> dict:
    """Metadata the receivers need to size buffers and name tensors, stamped with the version."""
    return {
        "version": int(version),
        "dtype": dtype_name(wire_dtype),
        "aliases": plan.aliases,
        "buckets": [{"names": [plan.names[i] for i in idx], "shapes": [list(plan.shapes[i]) for i in idx]}
                    for idx in plan.buckets],
    }
