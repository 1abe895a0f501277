"""``clipmask serve``: the checks before the server starts, then uvicorn."""

from __future__ import annotations

import argparse
import logging

from tasks.errors import UsageError

#: Hosts ``--no-auth`` may bind: this machine's loopback only.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(args: argparse.Namespace) -> int:
    """Refuse to start without tokens (unless ``--no-auth``, on the loopback only) or with a
    malformed setting; then serve until SIGINT or SIGTERM."""
    import uvicorn

    from tasks.api.app import create_app
    from tasks.api.context import Context

    if args.no_auth and args.host not in LOOPBACK:
        raise UsageError(f"--no-auth binds 127.0.0.1 only, not {args.host}: set CLIPMASK_API_TOKENS to serve "
                         "other hosts")
    ctx = Context.from_env(no_auth=args.no_auth)
    if not ctx.tokens.tokens and not args.no_auth:
        raise UsageError("no API token: set CLIPMASK_API_TOKENS (comma-separated, or @/path/to/file), or pass "
                         "--no-auth to serve 127.0.0.1 without one")
    if not ctx.allowed.prefixes:
        logging.getLogger(__name__).warning("CLIPMASK_API_ALLOWED is not set: every request naming a source or "
                                            "dest will be refused (403)")
    uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level=args.loglevel.lower(),
                access_log=args.access_log, proxy_headers=False, server_header=False)
    return 0
