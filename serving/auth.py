"""Bearer API keys. Only their SHA-256 hashes are kept, and a presented key is compared with every one of them in
constant time. A key's jobs belong to it: the owner is a prefix of its hash, so ids and rows never hold a key."""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

ENV = "COGRT_API_KEYS"  # comma-separated keys
ANONYMOUS = "local"  # the owner of every job when no keys are configured (loopback only)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_hashes(file: str | None = None, env: str | None = None) -> list[str]:
    """The hashes of the keys in `env` (comma-separated) and in `file` (one key a line; # comments)."""
    keys = [k.strip() for k in (os.environ.get(ENV, "") if env is None else env).split(",") if k.strip()]
    if file:
        keys += [ln.strip() for ln in Path(file).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return sorted({hash_key(k) for k in keys})


class Keys:
    def __init__(self, hashes: list[str]):
        self.hashes = list(hashes)

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def owner(self, authorization: str | None) -> str | None:
        """The owner of a request's `Authorization: Bearer KEY`, or None when it names no valid key."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        presented = hash_key(key.strip())
        found = None
        for h in self.hashes:  # every hash is compared, so the time does not say which one matched
            if hmac.compare_digest(presented, h):
                found = h
        return f"key_{found[:16]}" if found else None
