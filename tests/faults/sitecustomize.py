"""Faults injected into real worker processes (on ``PYTHONPATH`` only in the tests that ask).

``CLIPMASK_TEST_SWALLOW_ONCE=PATH``: the first task a worker process hands to its threads pool is
never run, as a worker that holds a delivery it does not start; ``PATH`` is created then, so a
worker started afterwards (the supervisor's replacement) runs every task.
"""

import os

_marker = os.environ.get("CLIPMASK_TEST_SWALLOW_ONCE")
if _marker:
    from concurrent.futures import Future

    from celery.concurrency import thread

    _on_apply = thread.TaskPool.on_apply

    def _swallow_first(self, *args, **kwargs):
        try:
            fd = os.open(_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return _on_apply(self, *args, **kwargs)
        os.close(fd)
        return thread.ApplyResult(Future())  # received, reserved, never started

    thread.TaskPool.on_apply = _swallow_first
