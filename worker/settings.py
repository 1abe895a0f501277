"""Reading clipmask's own environment variables: typed, and loud about bad values."""

from __future__ import annotations

import os


def env_int(name: str, default: int) -> int:
    """``int($name)``, or ``default`` when unset or empty; raises ``ValueError`` naming ``name``."""
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
