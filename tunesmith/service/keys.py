"""API keys: each key belongs to a project (a name), which sees only its own files, jobs and models.

A key is shown once, when made; the store keeps only its sha256 (a key is 256 random bits, so a
plain hash is enough: there is nothing to brute-force that a salt would protect) and a short
prefix so `tunesmith keys list` can tell keys apart.
"""
from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-ts-"


def new_key() -> str:
    """A fresh plaintext API key: 'sk-ts-' + 43 url-safe characters (32 random bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """The part of a key that is safe to show in listings."""
    return key[: len(KEY_PREFIX) + 4]
