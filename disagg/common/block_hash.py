"""The hash chain that names a full KV block by its token prefix (the prefix cache's key).

    seed   = model_seed(model id), or salted_seed(that, cache_salt) for a salted request
    h[0]   = H(seed,   tokens[0 : bs])
    h[i]   = H(h[i-1], tokens[i*bs : (i+1)*bs])        H: blake2b-64, top bit cleared

The same tokens give the same chain in every process, on every instance with the same seed: the
engine keys its cached blocks by it (disagg/engine/kv_cache.py), instances publish the hashes
they hold, and the proxy computes a prompt's chain to find the instance holding its prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def block_hashes(tokens: Sequence[int], block_size: int, seed: int,
                 start: Sequence[int] = ()) -> list[int]:
    """The hash chain of every full block of ``tokens`` (63-bit ints). ``start`` is a chain
    already known for a prefix of the blocks (extended, not recomputed)."""
    out = list(start)
    parent = out[-1] if out else seed
    arr = np.asarray(tokens, dtype=np.int64)
    for i in range(len(out), len(tokens) // block_size):
        h = hashlib.blake2b(parent.to_bytes(8, "little")
                            + arr[i * block_size:(i + 1) * block_size].tobytes(), digest_size=8)
        parent = int.from_bytes(h.digest(), "little") >> 1
        out.append(parent)
    return out


def model_seed(model_id: str) -> int:
    """The root of an instance's hash chains: the model's identity."""
    h = hashlib.blake2b(f"{model_id}\x00".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def salted_seed(seed: int, cache_salt: str | None) -> int:
    """The root of a request's chain: ``seed``, or, with a ``cache_salt`` (OpenAI-style
    request field), a root only requests with the same salt share: tenants that salt their
    requests never hit each other's cached blocks (no timing side channel between them)."""
    if cache_salt is None:
        return seed
    h = hashlib.blake2b(seed.to_bytes(8, "little") + cache_salt.encode(), digest_size=8,
                        person=b"disagg-salt")
    return int.from_bytes(h.digest(), "little") >> 1
