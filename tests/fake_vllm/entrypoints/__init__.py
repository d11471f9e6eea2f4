"""Mirrors vllm/entrypoints/."""
