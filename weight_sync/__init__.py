"""weight_sync: versioned, bucketed weights from the learner to every engine (tensors only: it
imports nothing from launch, learner or rollout_workers).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_weight_sync.py
    PYTHONPATH=$PWD .venv/bin/python -m launch.bench.sync --json /tmp/bench_sync.json

Public API: endpoint.make_endpoint / SyncEndpoint / SyncError, sync.WeightSender,
sync.WeightReceiver, sync.load_into_module; the transport registry and the SenderLink /
ReceiverLink protocols in transports (links in gloo_transport, ray_transport, vllm_transport);
the typed engine control plane of the vLLM transports in engine_control; the shared
plan/gather/pack logic in buckets.
"""
