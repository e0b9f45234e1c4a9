"""Chained hashes of fixed-size token blocks: the keys of the prefix-cache summaries.

A rank publishes the blocks it caches (``shm.prefix_summary``) and the dispatcher looks
up the blocks of a new prompt; both compute the keys here, so they agree by
construction. Block ``j`` covers tokens ``[j * BLOCK_LEN, (j + 1) * BLOCK_LEN)``; only
full blocks have keys. The key of block ``j`` is chained: it hashes block ``j``'s
tokens together with the key of block ``j - 1``, so it stands for the whole prefix
``tokens[:(j + 1) * BLOCK_LEN]``. A rank that has key ``j`` in its summary holds that
entire prefix, whatever else the summary misses.

Why CPython's own tuple hash: the dispatcher hashes every prompt on the request path,
in pure Python. ``hash((prev, block_tuple))`` is one C call over the block, about
5 ns a token; every other way of getting the tokens to a byte hash (numpy, array,
struct, marshal) first converts the Python ints, at 10-20 ns a token. The tuple hash of
ints is not salted (only str/bytes hashes are, per process), so it is the same in
every process of one interpreter build; the API and the ranks run the same one. It is
not a cryptographic hash: a client can craft two prompts with equal keys, and what
that buys it is a worse routing decision for its own request, nothing more (the rank's
own cache compares tokens, never keys).

Keys are stored as unsigned 64-bit values with 0 reserved for "empty"
(``summary_key``).
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

BLOCK_LEN = 64
KEY_MASK = (1 << 64) - 1


def summary_key(h: int) -> int:
    """A chained hash as the unsigned, non-zero 64-bit value a summary stores."""
    return (h & KEY_MASK) or 1


def chain_hashes(tokens: tuple, num_blocks: int, hashes: list[int]) -> list[int]:
    """Extend ``hashes`` (the chained hashes of the first ``len(hashes)`` blocks of
    ``tokens``) to ``num_blocks`` blocks; return it. Raw Python hashes (signed): map
    them through ``summary_key`` before storing or comparing with a summary.

    ``tokens`` is a tuple: a tuple's slice hashes without a list-to-tuple copy.
    """
    if num_blocks * BLOCK_LEN > len(tokens):
        raise ValueError(f"{num_blocks} blocks of {BLOCK_LEN} need {num_blocks * BLOCK_LEN} "
                         f"tokens; got {len(tokens)}")
    h = hashes[-1] if hashes else 0
    for start in range(len(hashes) * BLOCK_LEN, num_blocks * BLOCK_LEN, BLOCK_LEN):
        h = hash((h, tokens[start:start + BLOCK_LEN]))
        hashes.append(h)
    return hashes


def first_hash(tokens: Sequence[int]) -> int:
    """``chain_hashes(tuple(tokens), 1, [])[0]`` without copying more than one block."""
    return hash((0, tuple(tokens[:BLOCK_LEN])))


def block_keys(tokens: Sequence[int], first_block: int = 0) -> list[int]:
    """The summary keys of the full blocks ``first_block..`` of ``tokens`` (the whole
    path from the root: earlier blocks are hashed too, as the chain needs them)."""
    hashes = chain_hashes(tuple(tokens), len(tokens) // BLOCK_LEN, [])
    return [summary_key(h) for h in hashes[first_block:]]


DIGEST_BYTES = 16


def prefix_digests(tokens: Sequence[int], num_blocks: int, start: int = 0) -> list[bytes]:
    """Chained BLAKE2b digests of blocks ``start..num_blocks-1``: block j's stands for
    ``tokens[:(j + 1) * BLOCK_LEN]`` (it hashes block j's tokens with block j - 1's).

    The keys above are fast, not collision-proof (a client can craft equal keys); a
    rank that copies another rank's KV for a prefix (``scheduler.prefix_share``)
    checks these instead, so a crafted collision can never put one prompt's KV under
    another prompt's tokens. Hashes from block 0; returns only the blocks from ``start``.
    """
    out, digest = [], b""
    for j in range(num_blocks):
        block = array("q", tokens[j * BLOCK_LEN:(j + 1) * BLOCK_LEN]).tobytes()
        digest = hashlib.blake2b(digest + block, digest_size=DIGEST_BYTES).digest()
        if j >= start:
            out.append(digest)
    return out
