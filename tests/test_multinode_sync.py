"""Weight sync across two Ray nodes on one machine (issue 12 bug 2 / issue 17 item 10): the head
node (the driver's, the machine's address) holds the rollout worker, a second node started on
127.0.0.2 holds learner rank 0. The sync endpoint must be learner rank 0's node address with a
port chosen there, and a gloo sync must bring the worker to the learner's weights across them.

    PYTHONPATH=$PWD python -m pytest -q tests/test_multinode_sync.py
"""
from __future__ import annotations

import pytest
import ray
import torch

from launch.actors import SyncedLearnerRank, SyncedRolloutWorker
from launch.sync_group import SyncGroup
from learner.config import LearnerConfig
from rollout_workers.config import RolloutConfig
from weight_sync.config import SyncConfig

TIMEOUT = 240.0
LEARNER_NODE_IP = "127.0.0.2"


@pytest.fixture(scope="module")
def two_nodes(own_ray):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"worker_node": 1},
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, resources={"learner_node": 1}, node_ip_address=LEARNER_NODE_IP)
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=own_ray)
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_gloo_endpoint_is_learner_node_and_sync_crosses_nodes(two_nodes, tiny_model_dir):
    learner = ray.remote(SyncedLearnerRank).options(num_cpus=0.5, resources={"learner_node": 0.1}).remote(
        LearnerConfig(num_ranks=1, cpus_per_rank=0.5, micro_batch_tokens=256), str(tiny_model_dir), 0, 1)
    worker = ray.remote(SyncedRolloutWorker).options(num_cpus=0.5, resources={"worker_node": 0.1}, max_concurrency=4).remote(
        RolloutConfig(cpus_per_worker=0.5, reward_processes=1), str(tiny_model_dir), "hf-0")
    try:
        addr, port = ray.get(learner.rendezvous_address.remote(), timeout=TIMEOUT)
        assert addr == LEARNER_NODE_IP
        ray.get(learner.setup.remote(addr, port, TIMEOUT), timeout=TIMEOUT)
        sync = SyncGroup(SyncConfig(transport="gloo", timeout_s=60), [learner], [worker], ["hf-0"], "float32", TIMEOUT)
        driver_ip = ray.util.get_node_ip_address()
        assert driver_ip != LEARNER_NODE_IP  # the driver (and the worker) sit on the other node
        assert sync.endpoint.host == LEARNER_NODE_IP  # was 127.0.0.1 with a port chosen on the driver

        # Make the engine differ from the learner, then sync version 1 across the nodes.
        want = ray.get(learner.full_weights.remote(), timeout=TIMEOUT)
        zeros = [(n, torch.zeros_like(t)) for n, t in want.items()]
        assert ray.get(worker.update_weights.remote(zeros, 0), timeout=TIMEOUT) == 0
        stats = sync.sync(1)
        assert stats.version == 1 and stats.num_bytes > 0
        assert ray.get(worker.version.remote(), timeout=TIMEOUT) == 1
        got = dict(ray.get(worker.named_weights.remote(), timeout=TIMEOUT))
        assert set(got) >= set(want) - {"lm_head.weight"}  # tied to embed_tokens
        for name in set(want) & set(got):
            assert torch.equal(got[name], want[name]), name
        sync.close()
    finally:
        ray.kill(learner)
        ray.kill(worker)
