"""The split: each group of related rows goes to train, test or held-out by a hash of its key alone.

The key is the row's conversation id (IngestConfig.group_by) when it has one, else its near-duplicate cluster's
representative's id: every turn of a thread, and every copy of a prompt kept with dedup off, lands on one side. A
side depends on nothing but the key, so adding a week of traffic never moves an old row across the split, and the
shares are monotone: test is the top `test_share` of the hash range and held-out the bottom `held_out_share`, so
raising one only moves rows from train into it.
"""

from __future__ import annotations

import hashlib

SIDES = ("train", "test", "held_out")


def group_key(group: str | None, cluster: str) -> str:
    """The text a row's side is drawn from: its group value, else its cluster's representative id."""
    return f"group:{group}" if group is not None else f"cluster:{cluster}"


def group_hash(key: str) -> str:
    """16 hex digits of a group key's blake2b: what the output rows carry as `group`."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def side(hashed: str, test_share: float, held_out_share: float) -> str:
    """train, test or held_out for a group hash: its place in [0, 1) against the shares."""
    place = int(hashed, 16) / 2**64
    if place < held_out_share:
        return "held_out"
    return "test" if place >= 1 - test_share else "train"
