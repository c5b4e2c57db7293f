"""Seeds derived from names, shared by every place that must draw the same thing in every
process: the RL step's rollouts (per prompt) and the training-time speech augmentation (per
clip). Both key on (run seed, epoch, row id), so a resumed run and every rank draw the same."""
from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 62-bit seed from its parts, the same in every process and Python version (unlike
    ``hash``, which is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
