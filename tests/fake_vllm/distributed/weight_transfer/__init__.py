"""Mirrors vllm/distributed/weight_transfer/."""
