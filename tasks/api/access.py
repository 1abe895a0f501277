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
- **Callbacks.** A ``callback_url`` must start with one of ``CLIPMASK_API_CALLBACKS``, compared
  by scheme, host, port and path (``https://hooks.example.com/`` does not admit
  ``https://hooks.example.com.evil/``), and carry no user or password; the workers then POST to
  the URL as this module rebuilt it, and follow no redirect. Without the list, a token holder could
  make the workers call internal addresses: a cloud metadata endpoint, Redis, an admin port.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from storage import parse_url, split_object_url
from storage.base import check_key
from tasks import settings
from tasks.api.problems import Problem, invalid_field
from tasks.errors import UsageError
from tasks.shards.names import expand_braces, is_brace_pattern, split_pattern


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
        tokens = comma_list(raw)
    return tuple(tokens)


def comma_list(raw: str | None) -> list[str]:
    """The items of a comma-separated setting, stripped, blanks dropped."""
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def canonical_list(name: str, raw: str | None, canonical: Callable[[str], str]) -> tuple[str, ...]:
    """``canonical`` of each item of the setting ``name``; a ``UsageError`` naming it for one
    that is malformed."""
    try:
        return tuple(canonical(item) for item in comma_list(raw))
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None


@dataclass(frozen=True)
class Tokens:
    """The accepted bearer tokens, kept as their digests (``_digest``); none and ``open`` is
    ``--no-auth``."""

    tokens: tuple[bytes, ...]
    open: bool = False

    @classmethod
    def from_env(cls, no_auth: bool = False) -> Tokens:
        return cls(tuple(_digest(token.encode()) for token in read_tokens(settings.API_TOKENS.get())), no_auth)

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
            match |= hmac.compare_digest(candidate, token)
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


#: Shards one brace pattern of a job's ``source`` may name (each is checked when the job is asked).
MAX_PATTERN_SHARDS = 100_000


def canonical_source(url: str) -> str:
    """A job's SRC as a prefix to compare (``canonical_prefix``), or, for a brace pattern of shards
    (``s3://b/data/{00000..00099}.tar``), its folder canonical with the pattern after it. Raises
    ``ValueError`` for a malformed URL, a pattern of more than ``MAX_PATTERN_SHARDS`` shards, or
    one that names a folder above its own (a ``..`` in any shard it expands to)."""
    if not is_brace_pattern(url):
        return canonical_prefix(url)
    folder, pattern = split_pattern(url)
    named = list(itertools.islice(expand_braces(pattern), MAX_PATTERN_SHARDS + 1))
    if len(named) > MAX_PATTERN_SHARDS:
        raise ValueError(f"a brace pattern may name {MAX_PATTERN_SHARDS:,} shards at most: {url}")
    if any(key.startswith("/") or ".." in key.split("/") for key in named):
        raise ValueError(f"a brace pattern may not name a parent folder ('..'): {url}")
    return canonical_prefix(folder) + pattern


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
        return cls(canonical_list("CLIPMASK_API_ALLOWED", settings.API_ALLOWED.get(), canonical_prefix))

    def prefix(self, field: str, url: str) -> str:
        """A ``source`` or ``dest`` prefix the request may use, canonical; else a ``403`` naming
        the prefixes allowed (``422`` for a malformed URL)."""
        return self._allowed(field, url, canonical_prefix)

    def source(self, field: str, url: str) -> str:
        """A job's ``source``: a prefix, or a brace pattern of shards under an allowed prefix."""
        return self._allowed(field, url, canonical_source)

    def object(self, field: str, url: str) -> str:
        """One object's URL the request may read; canonical, or a ``403`` / ``422``."""
        return self._allowed(field, url, canonical_object)

    def _allowed(self, field: str, url: str, canonical_of: Callable[[str], str]) -> str:
        try:
            canonical = canonical_of(url)
        except (TypeError, ValueError) as err:
            raise invalid_field(field, str(err)) from None
        if any(canonical.startswith(prefix) for prefix in self.prefixes):
            return canonical
        listed = ", ".join(self.prefixes) if self.prefixes else "none"
        local = "" if canonical.startswith("s3://") else "; a local path is only allowed under a folder listed there"
        raise Problem(403, "location-not-allowed",
                      f"{field} {url} is not under an allowed prefix (CLIPMASK_API_ALLOWED: {listed}){local}",
                      field=field, allowed=list(self.prefixes))


def canonical_http(url: str) -> tuple[str, str]:
    """An ``http(s)://`` URL rebuilt from its parts: (the URL to call, its part to compare:
    ``scheme://host:port/path``). Raises ``ValueError`` for another scheme, no host, a user or
    password, or a malformed port."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "\\" in url:
        raise ValueError(f"{url!r} must not carry a user, a password or a backslash")
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (443 if scheme == "https" else 80)
    compared = f"{scheme}://{host}:{port}{parts.path or '/'}"
    return compared + (f"?{parts.query}" if parts.query else ""), compared


@dataclass(frozen=True)
class Callbacks:
    """The URL prefixes a ``callback_url`` may start with (``CLIPMASK_API_CALLBACKS``), canonical."""

    prefixes: tuple[str, ...]

    @classmethod
    def from_env(cls) -> Callbacks:
        prefixes = canonical_list("CLIPMASK_API_CALLBACKS", settings.API_CALLBACKS.get(),
                                  lambda url: canonical_http(url)[1])
        if prefixes:
            from tasks.webhooks import secret_key

            secret_key()  # UsageError: callbacks could not be signed
        return cls(prefixes)

    def url(self, field: str, url: str) -> str:
        """The URL the workers will call, once allowed; else a ``403`` (``422`` if malformed)."""
        try:
            target, compared = canonical_http(url)
        except ValueError as err:
            raise invalid_field(field, str(err)) from None
        if not any(compared.startswith(prefix) for prefix in self.prefixes):
            listed = ", ".join(self.prefixes) if self.prefixes else "none: callbacks are off"
            raise Problem(403, "callback-not-allowed", f"{field} {url} does not start with an allowed prefix "
                          f"(CLIPMASK_API_CALLBACKS: {listed})", field=field, allowed=list(self.prefixes))
        return target
