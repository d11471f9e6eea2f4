"""One way to derive a random seed from a base seed and a path of keys, used wherever the system
needs independent random streams (iterations, refill rounds, worker requests, generate chunks).

Not run on its own; tested by `python -m pytest -q tests/test_train_driver.py`.
"""
from __future__ import annotations

import hashlib

SEED_BITS = 31
"""Derived seeds lie in [0, 2**31): accepted by torch, vLLM and NumPy alike."""


def derive_seed(base: int, *keys: int | str) -> int:
    """A seed for the stream named by `keys` under `base`: a hash, so distinct key paths give
    unrelated streams (no two formulas with magic primes that can collide: with `base * p + i`,
    seed (0, i=p) equals seed (1, i=0)). Deterministic across processes and Python versions."""
    text = "/".join(str(k) for k in (base, *keys))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << SEED_BITS)
