"""Who may call the API, and where a call may make the workers read and write.

- **Tokens.** Every ``/v1`` call carries ``Authorization: Bearer <token>``, compared in constant
  time with each token of ``CLIPMASK_API_TOKENS`` (comma-separated, or ``@/path`` to a file of
  one token a line), read when the server starts.
- **Locations.** A request's ``source`` and ``dest`` must lie under one of the URL prefixes of
  ``CLIPMASK_API_ALLOWED``; a local path only where a local folder is listed. URLs are compared
  in their canonical form (``storage.parse_url``; local paths resolved, ``..`` and links
  included), so ``s3://masks/`` does not admit ``s3://masks-other/`` and ``/data/in/../etc``
  is ``/data/etc``. Without the list, a token holder could make the workers read any bucket
  they can, or any file on their disks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from storage import parse_url, split_object_url
from storage.base import check_key
from tasks import settings
from tasks.api.problems import Problem, invalid_field
from tasks.errors import UsageError


def read_tokens(raw: str | None) -> tuple[str, ...]:
    """The tokens of ``CLIPMASK_API_TOKENS``: comma-separated, or ``@/path`` to a file of one
    token a line (blank lines and ``#`` comments skipped). Raises ``UsageError`` for a file that
    cannot be read."""
    if not raw:
        return ()
    if raw.startswith("@"):
        path = raw[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as err:
            raise UsageError(f"CLIPMASK_API_TOKENS names {path}, which cannot be read ({err})") from None
        tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    else:
        tokens = [token.strip() for token in raw.split(",") if token.strip()]
    return tuple(tokens)


@dataclass(frozen=True)
class Tokens:
    """The accepted bearer tokens; none and ``open`` is ``--no-auth``."""

    tokens: tuple[bytes, ...]
    open: bool = False

    @classmethod
    def from_env(cls, no_auth: bool = False) -> Tokens:
        return cls(tuple(token.encode() for token in read_tokens(settings.API_TOKENS.get())), no_auth)

    def check(self, authorization: str | None) -> None:
        """Raise a ``401`` unless ``authorization`` is ``Bearer <one of the tokens>``: every token
        is compared, each in constant time, so the time taken says nothing of how close it was,
        nor which token it matched."""
        if self.open:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Problem(401, "unauthorized", "send Authorization: Bearer <token>, one of CLIPMASK_API_TOKENS",
                          headers={"WWW-Authenticate": 'Bearer realm="clipmask"'})
        candidate, match = _digest(given.strip().encode()), False
        for token in self.tokens:
            match |= hmac.compare_digest(candidate, _digest(token))
        if not match:
            raise Problem(401, "unauthorized", "the bearer token is not one of CLIPMASK_API_TOKENS",
                          headers={"WWW-Authenticate": 'Bearer realm="clipmask", error="invalid_token"'})


def _digest(token: bytes) -> bytes:
    """Tokens are compared as digests of one length, so that the time taken says nothing of a
    token's length either."""
    return hashlib.sha256(token).digest()


def canonical_prefix(url: str) -> str:
    """``url`` as a prefix to compare: ``s3://bucket/prefix/`` or a resolved local folder with
    a trailing ``/``. Raises ``ValueError`` for a malformed URL."""
    parsed = parse_url(url)
    if parsed.scheme == "s3":
        return parsed.url
    return os.path.realpath(parsed.prefix).rstrip("/") + "/"


def canonical_object(url: str) -> str:
    """One object's URL, canonical: ``s3://bucket/key`` or a resolved local path. Raises
    ``ValueError`` for a URL that names no object, or an S3 key with ``.`` or ``..`` segments."""
    root, key = split_object_url(url)
    if url.lower().startswith("s3://"):
        check_key(url[len("s3://"):].partition("/")[2])
        return canonical_prefix(root) + key
    return os.path.realpath(os.path.join(root, key))


@dataclass(frozen=True)
class Allowed:
    """The locations a request may name (``CLIPMASK_API_ALLOWED``), canonical."""

    prefixes: tuple[str, ...]

    @classmethod
    def from_env(cls) -> Allowed:
        raw = settings.API_ALLOWED.get() or ""
        prefixes = []
        for item in (part.strip() for part in raw.split(",")):
            if item:
                try:
                    prefixes.append(canonical_prefix(item))
                except ValueError as err:
                    raise UsageError(f"CLIPMASK_API_ALLOWED: {err}") from None
        return cls(tuple(prefixes))

    def prefix(self, field: str, url: str) -> str:
        """A ``source`` or ``dest`` prefix the request may use, canonical; else a ``403`` naming
        the prefixes allowed (``422`` for a malformed URL)."""
        try:
            canonical = canonical_prefix(url)
        except (TypeError, ValueError) as err:
            raise invalid_field(field, str(err)) from None
        self._check(field, url, canonical)
        return canonical

    def object(self, field: str, url: str) -> str:
        """One object's URL the request may read; canonical, or a ``403`` / ``422``."""
        try:
            canonical = canonical_object(url)
        except (TypeError, ValueError) as err:
            raise invalid_field(field, str(err)) from None
        self._check(field, url, canonical)
        return canonical

    def _check(self, field: str, url: str, canonical: str) -> None:
        if any(canonical.startswith(prefix) for prefix in self.prefixes):
            return
        listed = ", ".join(self.prefixes) if self.prefixes else "none"
        local = "" if canonical.startswith("s3://") else "; a local path is only allowed under a folder listed there"
        raise Problem(403, "location-not-allowed",
                      f"{field} {url} is not under an allowed prefix (CLIPMASK_API_ALLOWED: {listed}){local}",
                      field=field, allowed=list(self.prefixes))
