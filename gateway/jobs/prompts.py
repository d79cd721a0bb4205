"""Prompt normalisation, so that the same prompt typed twice compares equal."""

from __future__ import annotations

import hashlib
import unicodedata


def normalize(prompt: str) -> str:
    """Unicode NFKC, casefold, whitespace collapsed, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())


def fingerprint(prompt: str) -> str:
    """A short stable hash of a prompt, for logs that must not carry the prompt itself."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]
