"""weight_sync: versioned, bucketed weights from the learner to every engine (tensors only: it
imports nothing from launch, learner or rollout_workers).

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py
    PYTHONPATH=$PWD python -m launch.bench.sync --json /tmp/bench_sync.json

Public API: endpoint.make_endpoint / SyncEndpoint / SyncError, sync.WeightSender,
sync.WeightReceiver, sync.load_into_module; the transport registry in transports (links in
gloo_transport, ray_transport, vllm_transport); the typed engine control plane of the vLLM
transports in engine_control; the shared plan/gather/pack logic in buckets.

Layers, bottom first; a module imports only ones listed before it (tests/test_imports.py checks
there is no cycle): buckets; base (SyncEndpoint, SyncError, the SenderLink / ReceiverLink
protocols, the Transport spec); the links (gloo_transport, ray_transport, engine_control,
vllm_transport); transports (the registry: it imports the links lazily, at call time); config;
endpoint (make_endpoint); sync.
"""
