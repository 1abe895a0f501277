"""Masking a stream of keys with the engine: the work of a chunk task, of a one-image request and
of ``clipmask run``. This is the side of ``tasks`` that loads torch (``worker.engine``)."""

from tasks.pipeline.stream import Outcome, Pipeline, kept_outcome

__all__ = ["Outcome", "Pipeline", "kept_outcome"]
