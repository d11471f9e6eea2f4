"""Weight-sync benchmark: the gloo CPU transport between two processes, against a memcpy.

    python -m launch.bench.sync --json /tmp/bench_sync.json [--repeats 5] [--bucket-mb 64]

For the ~5M (hidden 256, 4 layers) and ~30M (hidden 512, 8 layers) tiny Qwen2 models: `bytes`
on the wire (fp32), `seconds` (median learner-side `WeightSender.sync`, the rendezvous excluded),
`receive_seconds` (median engine-side `WeightReceiver.receive`), `memcpy_seconds` (median
in-process `copy_` of the same number of bytes, same run), `ratio` = seconds / memcpy_seconds
(goal: <= 10), `raw_gloo_seconds` (median bare gloo broadcast of the same buckets between the
same two processes: the transport's floor, so `overhead_vs_raw_gloo` isolates what the sync
adds) and `max_abs_diff` between what the engine received and the learner's weights (must be 0). Numbers taken on a shared 2-core machine are indicative only.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from datetime import timedelta

import torch
import torch.distributed as dist

from launch.bench.output import write_json
from weight_sync.buckets import bucket_nbytes, make_plan
from weight_sync.config import SyncConfig
from weight_sync.endpoint import SyncEndpoint, free_port, make_endpoint
from weight_sync.sync import WeightReceiver, WeightSender

SIZES = {"5M": (256, 4), "30M": (512, 8)}
TIMEOUT = timedelta(seconds=120)


def _raw_group(port: int, rank: int) -> tuple[dist.TCPStore, dist.ProcessGroupGloo]:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    return store, dist.ProcessGroupGloo(store, rank, 2, TIMEOUT)


def _raw_broadcasts(pg: dist.ProcessGroupGloo, buffers: list[torch.Tensor]) -> float:
    """The transport's floor: bare gloo broadcasts of the same buckets, no gather/pack/header/ack."""
    t0 = time.perf_counter()
    for work in [pg.broadcast(b, 0, TIMEOUT) for b in buffers]:
        work.wait(TIMEOUT)
    return time.perf_counter() - t0


def _engine_process(endpoint: SyncEndpoint, raw_port: int, reference_path: str, repeats: int, out: mp.Queue) -> None:
    """Receive `repeats` + 1 versions (report receive times and the last one's max |received - reference|),
    then take part in `repeats` bare broadcasts of the same bucket sizes."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    reference = load_file(reference_path)
    receiver = WeightReceiver(endpoint, "engine-0")
    times = []
    for version in range(repeats + 1):
        received = receiver.receive(version)
        if version > 0:  # version 0 includes the rendezvous
            times.append(received.seconds)
    # Checked once, after the last round: checking between rounds would hold up the sender.
    diff = max((t.float() - reference[name]).abs().max().item() for name, t in received.named_tensors)
    out.put({"receive_seconds": statistics.median(times), "max_abs_diff": diff})
    _, pg = _raw_group(raw_port, 1)
    sizes = torch.zeros(64, dtype=torch.int64)
    pg.broadcast(sizes, 0, TIMEOUT).wait(TIMEOUT)
    buffers = [torch.empty(int(n), dtype=torch.uint8) for n in sizes if n > 0]
    for _ in range(repeats + 1):
        _raw_broadcasts(pg, buffers)


def bench_model(label: str, hidden: int, layers: int, tokenizer, repeats: int, bucket_mb: int) -> dict:
    from safetensors.torch import save_file

    from launch.tiny_model import build_tiny_model
    from weight_sync.buckets import strip_module_prefix

    model = build_tiny_model(tokenizer, hidden_size=hidden, layers=layers, heads=8)
    named = list(model.named_parameters())
    endpoint = make_endpoint(SyncConfig(transport="gloo", bucket_mb=bucket_mb, timeout_s=120), ["engine-0"], "float32",
                             "127.0.0.1", free_port())
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        ref = str(Path(tmp) / "ref.safetensors")
        save_file({strip_module_prefix(n): p.detach().contiguous() for n, p in named}, ref)
        raw_port = free_port()
        proc = ctx.Process(target=_engine_process, args=(endpoint, raw_port, ref, repeats, out), daemon=True)
        proc.start()
        sender = WeightSender(endpoint, rank=0)
        send_times = []
        for version in range(repeats + 1):
            stats = sender.sync(version, named)
            if version > 0:
                send_times.append(stats.seconds)
        engine = out.get(timeout=120)
        plan = make_plan(named, torch.float32, endpoint.bucket_bytes)
        bucket_sizes = [bucket_nbytes([plan.shapes[i] for i in idx], torch.float32) for idx in plan.buckets]
        store, pg = _raw_group(raw_port, 0)
        sizes = torch.zeros(64, dtype=torch.int64)
        sizes[:len(bucket_sizes)] = torch.tensor(bucket_sizes)
        pg.broadcast(sizes, 0, TIMEOUT).wait(TIMEOUT)
        buffers = [torch.empty(n, dtype=torch.uint8).random_(0, 255) for n in bucket_sizes]
        raw_times = [_raw_broadcasts(pg, buffers) for _ in range(repeats + 1)][1:]
        proc.join(timeout=60)
    src = torch.empty(stats.num_bytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    seconds, memcpy = statistics.median(send_times), statistics.median(copies)
    raw = statistics.median(raw_times)
    return {"model": label, "params": sum(p.numel() for p in model.parameters()), "bytes": stats.num_bytes,
            "buckets": stats.num_buckets, "seconds": seconds, "receive_seconds": engine["receive_seconds"],
            "memcpy_seconds": memcpy, "ratio": seconds / memcpy, "raw_gloo_seconds": raw,
            "overhead_vs_raw_gloo": seconds / raw, "max_abs_diff": engine["max_abs_diff"]}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=SyncConfig.bucket_mb)
    args = parser.parse_args(argv)
    from launch.tiny_model import _default_texts, train_tokenizer

    torch.set_num_threads(1)
    tokenizer = train_tokenizer(_default_texts())
    results = {"transport": "gloo", "bucket_mb": args.bucket_mb,
               "models": [bench_model(label, h, n, tokenizer, args.repeats, args.bucket_mb)
                          for label, (h, n) in SIZES.items()]}
    for r in results["models"]:
        print(f"{r['model']:>4}: {r['bytes'] / 1e6:7.1f} MB in {r['buckets']} buckets  sync {r['seconds'] * 1e3:7.1f} ms  "
              f"memcpy {r['memcpy_seconds'] * 1e3:6.1f} ms  ratio {r['ratio']:5.1f}x  "
              f"raw gloo {r['raw_gloo_seconds'] * 1e3:7.1f} ms  max|diff| {r['max_abs_diff']}")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
