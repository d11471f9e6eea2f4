"""Weight sync: bucketing/packing units, then real Ray actors with real DeepSpeed (CPU, gloo).

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py

The learner-rank and engine actors here are small stand-ins (the project's learner and rollout
actors call the same WeightSender / WeightReceiver); the weights compared are the learner's full
fp32 weights after a real optimizer step, cast to each engine's dtype, bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from conftest import kill_and_confirm
from weight_sync.buckets import (
    decode_header,
    encode_header,
    iter_cast_tensors,
    iter_packed_buckets,
    make_plan,
    pack_bucket,
    packed_buffer_bytes,
    params_off_device,
    plan_buckets,
    plan_header,
    strip_module_prefix,
    unpack_bucket,
)
from weight_sync.base import GatherOnlyLink
from weight_sync.config import SyncConfig
from weight_sync.endpoint import SyncError, free_port, make_endpoint
from weight_sync.sync import WeightReceiver, WeightSender
from weight_sync.transports import get_transport

# One machine: learner rank 0 listens on loopback (the multi-node case: tests/test_multinode_sync.py).
LOCAL_HOST = "127.0.0.1"

# ---------------------------------------------------------------- pure units


def test_plan_buckets_boundaries_hand_checked():
    # 4+4 fit in 10; 4 more would be 12 > 10 -> new bucket; 20 alone (> 10); then 1+9 = 10 fits.
    assert plan_buckets([4, 4, 4, 20, 1, 9], 10) == [[0, 1], [2], [3], [4, 5]]
    assert plan_buckets([10, 10], 10) == [[0], [1]]
    assert plan_buckets([3], 1) == [[0]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([1], 0)


def test_pack_unpack_roundtrip_casts_in_one_copy():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.tensor(2.5), torch.randn(2, 2, 2, generator=g)]
    for wire in (torch.float32, torch.bfloat16):
        flat = pack_bucket(ts, wire)
        itemsize = 4 if wire == torch.float32 else 2
        assert flat.dtype == torch.uint8 and flat.numel() == (15 + 7 + 1 + 8) * itemsize
        out = unpack_bucket(flat, ["a", "b", "c", "d"], [tuple(t.shape) for t in ts], wire)
        assert [n for n, _ in out] == ["a", "b", "c", "d"]
        for (_, got), want in zip(out, ts):
            assert got.dtype == wire and got.shape == want.shape
            assert torch.equal(got, want.to(wire))
    staging = torch.empty(1000, dtype=torch.uint8)
    packed = pack_bucket(ts, torch.bfloat16, staging)
    assert packed.data_ptr() == staging.data_ptr() and torch.equal(packed, pack_bucket(ts, torch.bfloat16))
    with pytest.raises(ValueError, match="staging buffer"):
        pack_bucket(ts, torch.float32, staging[:10])
    with pytest.raises(ValueError, match="header says"):
        unpack_bucket(pack_bucket(ts[:1], torch.float32), ["a"], [(3, 4)], torch.float32)


def test_plan_maps_names_drops_tied_alias_and_header_roundtrips():
    emb = torch.nn.Parameter(torch.randn(10, 4))
    named = [("module.model.embed_tokens.weight", emb), ("module.model.norm.weight", torch.nn.Parameter(torch.ones(4))),
             ("module.lm_head.weight", emb)]
    plan = make_plan(named, torch.bfloat16, bucket_bytes=80)
    assert plan.names == ["model.embed_tokens.weight", "model.norm.weight"]
    assert plan.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert plan.buckets == [[0], [1]]  # 80 bytes of bf16 embeddings fill the first bucket
    header = plan_header(plan, 7, torch.bfloat16)
    assert decode_header(encode_header(header)) == header and header["version"] == 7
    cast = list(iter_cast_tensors(plan, torch.bfloat16))  # what vLLM's WeightSource.iter_full yields
    assert [n for n, _ in cast] == plan.names
    assert all(t.dtype == torch.bfloat16 and tuple(t.shape) == s for (_, t), s in zip(cast, plan.shapes))
    assert torch.equal(cast[0][1], emb.detach().to(torch.bfloat16)) and cast[1][1].data_ptr() != named[1][1].data_ptr()
    flats = list(iter_packed_buckets(plan, torch.bfloat16))
    assert [f.numel() for f in flats] == [80, 8]
    assert strip_module_prefix("module.a.module.b") == "a.module.b"
    with pytest.raises(ValueError, match="engine name"):
        make_plan([("module.x", torch.nn.Parameter(torch.ones(1))), ("x", torch.nn.Parameter(torch.ones(1)))],
                  torch.float32, 8)


def test_make_endpoint_ranks_and_validation():
    ep = make_endpoint(SyncConfig(transport="gloo", bucket_mb=2), ["e0", "e1", "e2"], "bfloat16", LOCAL_HOST, free_port())
    assert (ep.world_size, ep.receiver_rank("e0"), ep.receiver_rank("e2")) == (4, 1, 3)
    assert ep.bucket_bytes == 2 * 2 ** 20 and ep.wire_dtype == torch.bfloat16 and ep.receivers_participate
    with pytest.raises(ValueError, match="unknown receiver"):
        ep.receiver_rank("e3")
    with pytest.raises(ValueError, match="unique"):
        make_endpoint(SyncConfig(), ["e0", "e0"], "float32", LOCAL_HOST, free_port())
    with pytest.raises(ValueError, match="unsupported weight dtype"):
        make_endpoint(SyncConfig(), ["e0"], "int8", LOCAL_HOST, free_port())
    with pytest.raises(ValueError, match="one actor handle per receiver"):
        make_endpoint(SyncConfig(transport="nccl"), ["e0", "e1"], "bfloat16", LOCAL_HOST, free_port(), engine_handles=("h0",))
    assert not make_endpoint(SyncConfig(transport="ipc"), ["e0"], "bfloat16", LOCAL_HOST, free_port(), engine_handles=("h0",)).receivers_participate


def test_registry_builds_each_side_and_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"sync\.transport must be one of \['gloo', 'ipc', 'nccl', 'ray'\], got 'tcp'"):
        SyncConfig(transport="tcp")
    ep = make_endpoint(SyncConfig(transport="gloo"), ["e0"], "float32", LOCAL_HOST, free_port())
    assert isinstance(WeightSender(ep, 1)._link, GatherOnlyLink)  # only rank 0 transmits
    for name in ("nccl", "ipc"):
        spec = get_transport(name)
        assert spec.needs_vllm and not spec.receivers_participate and spec.vllm_backend == name
        vllm_ep = make_endpoint(SyncConfig(transport=name), ["e0"], "bfloat16", LOCAL_HOST, 0, engine_handles=("h0",))
        with pytest.raises(ValueError, match="driven by the learner through vLLM"):
            WeightReceiver(vllm_ep, "e0")
    assert "colocated" not in get_transport("nccl").placements
    assert get_transport("ipc").placements == ("colocated",)


QWEN_EMBEDDING = (151936, 896)  # Qwen2.5-0.5B's embed_tokens


def test_packed_buffer_holds_the_largest_tensor_and_is_the_same_on_every_rank():
    """Issue 17 item 3: vLLM's IPC producer allocates exactly packed_buffer_size_bytes and raises
    for a bigger tensor; it used to be sync.bucket_mb, smaller than Qwen2.5-0.5B's bf16 embedding."""
    bucket = 64 * 2 ** 20

    def rank_params(full: bool) -> list[tuple[str, torch.nn.Parameter]]:
        """ZeRO-3 leaves a rank an empty partition with the full shape in `ds_shape`."""
        out = []
        for name, shape in (("model.embed_tokens.weight", QWEN_EMBEDDING), ("model.norm.weight", (896,))):
            p = torch.nn.Parameter(torch.empty(shape if full else (0,), device="meta"))
            if not full:
                p.ds_id, p.ds_shape = len(out), torch.Size(shape)
            out.append((name, p))
        return out

    sizes = {packed_buffer_bytes(make_plan(rank_params(full), torch.bfloat16, bucket), torch.bfloat16, bucket)
             for full in (True, False)}
    assert sizes == {151936 * 896 * 2}  # 272 MB, not 64 MiB; one value for every rank
    small = make_plan([("w", torch.nn.Parameter(torch.ones(4, 4)))], torch.float32, bucket)
    assert packed_buffer_bytes(small, torch.float32, bucket) == bucket


def test_gpu_transports_see_learner_weights_off_the_gpu():
    """Issue 17 item 8: a learner that fell back to CPU is caught before any engine receives."""
    plan = make_plan([("a", torch.nn.Parameter(torch.ones(2))), ("b", torch.nn.Parameter(torch.ones(3)))],
                     torch.float32, 1024)
    assert params_off_device(plan, "cuda") == ["a", "b"]
    assert params_off_device(plan, "cpu") == []


# ---------------------------------------------------------------- actors

def _ray():
    import ray

    return ray


def _learner_cls():
    ray = _ray()

    @ray.remote(num_cpus=0)
    class LearnerRank:
        """One DeepSpeed rank (ZeRO `stage`, CPU/gloo) holding the tiny model plus a WeightSender."""

        def __init__(self, model_dir: str, rank: int, world: int, master_port: int, stage: int) -> None:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank),
                              WORLD_SIZE=str(world), LOCAL_RANK="0", DS_ACCELERATOR="cpu")
            torch.set_num_threads(1)
            import deepspeed
            from transformers import AutoModelForCausalLM

            deepspeed.init_distributed(dist_backend="gloo")
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                         "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
                         "zero_optimization": {"stage": stage}}
            self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
            self.rank = rank
            self.vocab = model.config.vocab_size
            self.sender = None

        def train_step(self, seed: int) -> None:
            g = torch.Generator().manual_seed(seed + self.rank)
            ids = torch.randint(0, self.vocab, (1, 12), generator=g)
            loss = self.engine(input_ids=ids, labels=ids).loss
            self.engine.backward(loss)
            self.engine.step()

        def set_endpoint(self, endpoint) -> None:
            from weight_sync.sync import WeightSender

            self.sender = WeightSender(endpoint, self.rank)

        def sync_weights(self, version: int):
            # remove_duplicate=False: the tied lm_head shows up too and the sender must drop it.
            return self.sender.sync(version, self.engine.named_parameters(remove_duplicate=False))

        def cast_stream(self, dtype: str) -> dict[str, torch.Tensor]:
            """What the vLLM nccl/ipc WeightSource yields (`iter_cast_tensors`), kept past each
            bucket's gather (a collective: every rank calls it)."""
            from weight_sync.buckets import iter_cast_tensors

            plan = make_plan(self.engine.named_parameters(remove_duplicate=False), getattr(torch, dtype), 16 * 1024)
            return dict(iter_cast_tensors(plan, getattr(torch, dtype)))

        def full_weights(self) -> dict[str, torch.Tensor]:
            """Every full fp32 parameter under its engine name (test-only: the whole model)."""
            from weight_sync.buckets import gathered

            params = list(self.engine.named_parameters())
            with gathered([p for _, p in params]):
                return {strip_module_prefix(n): p.data.detach().clone() for n, p in params}

    return LearnerRank


def _engine_cls():
    ray = _ray()

    @ray.remote(num_cpus=0)
    class Engine:
        """An engine stand-in: an HF model in its own dtype plus a WeightReceiver."""

        def __init__(self, model_dir: str, dtype: str) -> None:
            torch.set_num_threads(1)
            from transformers import AutoModelForCausalLM

            self.dtype = getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
            self.version = 0
            self.receiver = None

        def set_endpoint(self, endpoint, name: str) -> None:
            from weight_sync.sync import WeightReceiver

            self.receiver = WeightReceiver(endpoint, name, out_dtype=self.dtype)

        def receive_weights(self, version: int) -> int:
            from weight_sync.sync import load_into_module

            received = self.receiver.receive(version)
            load_into_module(self.model, received)
            self.version = received.version
            return self.version

        def weights(self) -> tuple[int, dict[str, torch.Tensor], bool]:
            tied = self.model.lm_head.weight is self.model.model.embed_tokens.weight
            return self.version, {n: p.detach().clone() for n, p in self.model.named_parameters()}, tied

    return Engine


def _assert_engine_matches(ray, engine, version: int, expected: dict[str, torch.Tensor], dtype: torch.dtype):
    got_version, weights, tied = ray.get(engine.weights.remote(), timeout=60)
    assert got_version == version and tied
    assert set(weights) == set(expected)
    for name, want in expected.items():
        assert weights[name].dtype == dtype, name
        assert torch.equal(weights[name], want.to(dtype)), name  # bit for bit


@pytest.fixture(scope="module")
def engines(ray_local, tiny_model_dir):
    Engine = _engine_cls()
    handles = [Engine.remote(str(tiny_model_dir), "float32"), Engine.remote(str(tiny_model_dir), "bfloat16")]
    yield handles
    for h in handles:
        ray_local.kill(h)


def _round(ray, learners, engines, version: int, timeout: float = 120):
    refs = [l.sync_weights.remote(version) for l in learners] + [e.receive_weights.remote(version) for e in engines]
    return ray.get(refs, timeout=timeout)


@pytest.mark.slow
def test_gloo_zero3_two_ranks_bit_exact_versions_tied(ray_local, tiny_model_dir, engines):
    ray = ray_local
    Learner = _learner_cls()
    port = free_port()
    learners = [Learner.remote(str(tiny_model_dir), r, 2, port, 3) for r in range(2)]
    # 16 KiB buckets: the tiny model travels in many buckets, each its own ZeRO-3 gather.
    ep = make_endpoint(SyncConfig(transport="gloo", bucket_mb=1, timeout_s=60), ["fp32", "bf16"], "float32", LOCAL_HOST, free_port())
    ep = dataclasses.replace(ep, bucket_bytes=16 * 1024)
    # The first call also waits for two ZeRO-3 ranks to start (minutes on a loaded 2-core machine).
    ray.get([l.set_endpoint.remote(ep) for l in learners]
            + [e.set_endpoint.remote(ep, n) for e, n in zip(engines, ep.receiver_names)], timeout=300)
    for version in (1, 2):
        ray.get([l.train_step.remote(version) for l in learners], timeout=120)
        stats0, stats1, v_a, v_b = _round(ray, learners, engines, version)
        assert (v_a, v_b) == (version, version) and stats0.version == version
        assert stats0.num_buckets > 3 and stats1.num_bytes == 0 and stats0.num_bytes > 0
        expected, _ = ray.get([l.full_weights.remote() for l in learners], timeout=60)  # collective gather
        assert "lm_head.weight" not in expected  # tied to embed_tokens: compared through `tied`
        _assert_engine_matches(ray, engines[0], version, expected, torch.float32)
        _assert_engine_matches(ray, engines[1], version, expected, torch.bfloat16)
    # The per-tensor stream behind vLLM's WeightSource, under ZeRO-3: full, cast, still valid
    # after each bucket's gather was released.
    streamed, _ = ray.get([l.cast_stream.remote("bfloat16") for l in learners], timeout=60)
    assert list(streamed) == list(expected)
    for name, want in expected.items():
        assert torch.equal(streamed[name], want.to(torch.bfloat16)), name
    for l in learners:
        ray.kill(l)


@pytest.fixture(scope="module")
def zero0_learner(ray_local, tiny_model_dir):
    learner = _learner_cls().remote(str(tiny_model_dir), 0, 1, free_port(), 0)
    yield learner
    ray_local.kill(learner)


@pytest.mark.slow
def test_ray_transport_zero0_bf16_wire(ray_local, zero0_learner, engines):
    """Object-store fallback, wire dtype bf16: the fp32 engine holds the bf16-rounded values."""
    ray = ray_local
    ep = make_endpoint(SyncConfig(transport="ray", bucket_mb=1, timeout_s=60), ["fp32", "bf16"], "bfloat16", LOCAL_HOST, free_port())
    ray.get([zero0_learner.set_endpoint.remote(ep)]
            + [e.set_endpoint.remote(ep, n) for e, n in zip(engines, ep.receiver_names)], timeout=60)
    ray.get(zero0_learner.train_step.remote(5), timeout=60)
    stats, v_a, v_b = _round(ray, [zero0_learner], engines, 11)
    assert (stats.version, v_a, v_b) == (11, 11, 11)
    expected = {n: w.to(torch.bfloat16) for n, w in ray.get(zero0_learner.full_weights.remote(), timeout=60).items()}
    assert stats.num_bytes == sum(w.numel() * 2 for w in expected.values())  # tied head sent once
    _assert_engine_matches(ray, engines[0], 11, expected, torch.float32)
    _assert_engine_matches(ray, engines[1], 11, expected, torch.bfloat16)


@pytest.mark.slow
def test_gloo_failures_name_engine_and_phase_and_keep_old_weights(ray_local, zero0_learner, tiny_model_dir):
    ray = ray_local
    Engine = _engine_cls()
    a, b = Engine.remote(str(tiny_model_dir), "float32"), Engine.remote(str(tiny_model_dir), "float32")
    cfg = SyncConfig(transport="gloo", bucket_mb=1, timeout_s=4)

    # 1. Engine "b" never shows up: the learner's first sync fails in the rendezvous, naming it.
    ep = make_endpoint(cfg, ["a", "b"], "float32", LOCAL_HOST, free_port())
    ray.get([zero0_learner.set_endpoint.remote(ep), a.set_endpoint.remote(ep, "a")], timeout=60)
    t0 = time.monotonic()
    send, recv = zero0_learner.sync_weights.remote(1), a.receive_weights.remote(1)
    with pytest.raises(SyncError, match=r"phase 'rendezvous'; engines: \['b'\]"):
        ray.get(send, timeout=60)
    with pytest.raises(SyncError, match=r"phase 'rendezvous'; engines: \['a'\]"):
        ray.get(recv, timeout=60)
    assert time.monotonic() - t0 < 30  # bounded by timeout_s, never a hang

    # 2. A good round: version 1 everywhere.
    ep = make_endpoint(cfg, ["a", "b"], "float32", LOCAL_HOST, free_port())
    ray.get([zero0_learner.set_endpoint.remote(ep), a.set_endpoint.remote(ep, "a"), b.set_endpoint.remote(ep, "b")],
            timeout=60)
    _round(ray, [zero0_learner], [a, b], 1, timeout=60)
    v1 = ray.get(zero0_learner.full_weights.remote(), timeout=60)
    ray.get(zero0_learner.train_step.remote(9), timeout=60)

    # 3. "b" is asked for another version than the learner sends: it rejects the round, the
    #    learner names it, "a" discards what it received; the group survives.
    send, recv_a, recv_b = (zero0_learner.sync_weights.remote(2), a.receive_weights.remote(2),
                            b.receive_weights.remote(3))
    with pytest.raises(SyncError, match=r"phase 'ack'; engines: \['b'\]"):
        ray.get(send, timeout=60)
    with pytest.raises(SyncError, match=r"expected version 3, the learner sent 2"):
        ray.get(recv_b, timeout=60)
    with pytest.raises(SyncError, match=r"another engine rejected"):
        ray.get(recv_a, timeout=60)
    _assert_engine_matches(ray, a, 1, v1, torch.float32)

    # 4. "b" is alive but never receives: the learner gives up after timeout_s, naming only "b"
    #    (the only engine that never entered receive(3)), in whichever phase gloo blocked;
    #    "a" gets nothing and keeps version 1.
    send, recv = zero0_learner.sync_weights.remote(3), a.receive_weights.remote(3)
    with pytest.raises(SyncError, match=r"phase '(header|bucket 1/1|ack)'; engines: \['b'\]"):
        ray.get(send, timeout=60)
    with pytest.raises(SyncError, match=r"engine 'a'"):
        ray.get(recv, timeout=60)
    _assert_engine_matches(ray, a, 1, v1, torch.float32)

    # 5. A fresh group, a good round, then "b" dies between rounds: the next sync fails naming
    #    "b"; "a" gets nothing and keeps the version it had.
    ep = make_endpoint(cfg, ["a", "b"], "float32", LOCAL_HOST, free_port())
    ray.get([zero0_learner.set_endpoint.remote(ep), a.set_endpoint.remote(ep, "a"), b.set_endpoint.remote(ep, "b")],
            timeout=60)
    _round(ray, [zero0_learner], [a, b], 4, timeout=60)
    v4 = ray.get(zero0_learner.full_weights.remote(), timeout=60)
    ray.kill(b)
    ray.get(zero0_learner.train_step.remote(10), timeout=60)
    send, recv = zero0_learner.sync_weights.remote(5), a.receive_weights.remote(5)
    with pytest.raises(SyncError, match=r"phase '(header|bucket \d+/\d+|ack)'; engines: \[.*'b'.*\]"):
        ray.get(send, timeout=60)
    with pytest.raises(SyncError, match=r"engine 'a'"):
        ray.get(recv, timeout=60)
    _assert_engine_matches(ray, a, 4, v4, torch.float32)
    ray.kill(a)


# ---------------------------------------------------------------- vLLM control plane (CPU: recording engines)

def _control_engine_cls():
    import ray

    @ray.remote(num_cpus=0)
    class ControlledEngine:
        """An engine actor as launch.actors.SyncedRolloutWorker exposes it (`weight_control`
        applying each call to itself), recording each `EngineWeightControl` call (and failing
        where told to)."""

        def __init__(self, fail_on: str = "") -> None:
            self.calls: list[tuple] = []
            self.fail_on = fail_on

        def _record(self, *call) -> None:
            if call[0] == self.fail_on:
                raise RuntimeError(f"engine refused {call[0]}")
            self.calls.append(call)

        def vllm_init_weight_transfer_engine(self, init_info: dict) -> None:
            self._record("init", init_info["rank_offset"])

        def vllm_start_weight_update(self) -> None:
            self._record("start")

        def vllm_update_weights(self, update_info: dict) -> None:
            self._record("update", update_info["names"])

        def vllm_finish_weight_update(self, version: str) -> int:
            self._record("finish", version)
            return int(version)

        def vllm_abort_weight_update(self, reason: str) -> None:
            self._record("abort", reason)

        def weight_control(self, call) -> None:
            call.apply(self)

        def recorded(self) -> list[tuple]:
            return self.calls

    return ControlledEngine


@pytest.mark.slow
def test_control_plane_typed_calls_rank_offsets_reinit_and_abort(ray_local):
    """The learner drives every engine through typed calls; engine i gets NCCL rank offset 1 + i
    (vLLM's payload says 1 for all); a re-init (a restart) reaches every engine again; a failed
    round names the engine and the phase, and the abort reaches every engine still alive."""
    from weight_sync.engine_control import ActorSyncClient

    ray = ray_local
    Engine = _control_engine_cls()
    engines = [Engine.remote(), Engine.remote()]
    ray.get([e.recorded.remote() for e in engines], timeout=240)  # started (slow under load), then timed
    ep = make_endpoint(SyncConfig(transport="nccl", timeout_s=120), ["e0", "e1"], "bfloat16", LOCAL_HOST, 0,
                       engine_handles=tuple(engines))
    client = ActorSyncClient(ep)
    for version in (1, 2):  # the second init is what a worker restart does
        client.version = version
        client.init_weight_transfer_engine({"rank_offset": 1, "master_address": LOCAL_HOST})
        client.start_weight_update()
        client.update_weights({"names": ["w"]})
        client.finish_weight_update()
    for i, engine in enumerate(engines):
        round_calls = [("init", 1 + i), ("start",), ("update", ["w"])]
        assert ray.get(engine.recorded.remote(), timeout=30) == (
            round_calls + [("finish", "1")] + round_calls + [("finish", "2")])
    for e in engines:
        ray.kill(e)

    engines = [Engine.remote(), Engine.remote(fail_on="update")]
    ray.get([e.recorded.remote() for e in engines], timeout=240)
    ep = make_endpoint(SyncConfig(transport="nccl", timeout_s=120), ["e0", "e1"], "bfloat16", LOCAL_HOST, 0,
                       engine_handles=tuple(engines))
    client = ActorSyncClient(ep)
    client.version, client.phase = 3, "buckets"
    client.start_weight_update()
    with pytest.raises(SyncError, match=r"weight sync v3 failed in phase 'buckets'; engines: \['e1'\].*refused update"):
        client.update_weights({"names": ["w"]})
    assert client.abort_weight_update("learner rank 0: gave up") == []
    assert ray.get(engines[0].recorded.remote(), timeout=30) == [("start",), ("update", ["w"]), ("abort", "learner rank 0: gave up")]
    kill_and_confirm(engines[0], "recorded")
    with pytest.raises(SyncError, match=r"engines: \['e0'\]"):
        client.start_weight_update()
    assert client.abort_weight_update("again") == ["e0"]  # a dead engine cannot be told, and nothing raises
    ray.kill(engines[1])
