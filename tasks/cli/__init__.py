"""The ``clipmask`` command: run, submit, status, cancel, resume, preview, serve, worker.

``main`` parses the arguments (``parser.py``) and runs the subcommand (``commands.py``). Every
failure a user can fix reaches it as a ``ClipmaskError`` (``tasks.errors.explain`` turns what
Redis, the broker and storage raise into one), printed on one line that says what to change,
with the exit code of ``parser.EXIT_CODES``. Importing this package loads neither torch nor
Celery, Redis or boto3: each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import logging
import sys

from tasks.cli import commands
from tasks.cli.parser import build_parser
from tasks.redact import redact_url

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ValueError as err:  # a malformed CLIPMASK_* default
        print(f"clipmask: error: {err}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return getattr(commands, args.command)(args, extra)
    except Exception as err:
        from tasks.errors import explain

        known = explain(err)
        if known is None:
            raise
        print(redact_url(f"clipmask {args.command}: error: {known}"), file=sys.stderr)
        return getattr(known, "exit_code", 2)
