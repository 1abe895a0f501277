"""``clipmask worker``: this machine's worker processes, one per device (or several), supervised.

``start_workers`` runs in the ``clipmask worker`` process: it picks the devices, checks that the
model can be had, serves the metrics of every worker process, and supervises one child per
device slot (``worker/supervise.py``). Each child is ``clipmask worker --device D`` again, which
``start_workers`` recognises (``CHILD_ENV``) and turns into one Celery worker: the model loaded
once on its device, then Celery's threads pool with ``--tasks`` threads, whose tasks share the
process's engine and device loop. Acks stay late, so a killed process loses no task.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Callable, Iterable

from worker import settings
from worker.supervise import CHILD_ENV, supervise_workers

log = logging.getLogger("clipmask.worker")

#: Celery's exchanges between workers, which clipmask has no use for: mingle asks every other
#: worker for its revoked tasks at start-up and waits a second for the answers (jobs are
#: cancelled through their index, never by revoking a task); gossip has each worker consume every
#: other's events, traffic that grows with the square of the fleet.
QUIET_PEERS = ("--without-mingle", "--without-gossip")


def start_workers(args: argparse.Namespace, extra: list[str],
                  collectors: Callable[[], Iterable] = lambda: ()) -> int:
    """Run this machine's workers until a shutdown signal; returns the worst exit code.

    ``args`` are ``clipmask worker``'s options (``device``, ``gpus``, ``model``, ``batch_size``,
    ``precision``, ``tasks``, ``processes_per_device``, ``loglevel``), ``extra`` goes to ``celery
    worker``, and ``collectors()`` gives further Prometheus collectors to serve (made once the
    metrics folder is set). Raises ``ValueError`` for unknown devices, ``ModelUnavailableError``
    when the model cannot be had, ``OSError`` when the metrics port is taken.
    """
    from worker.model import check_model_available, model_reference

    devices = worker_devices(args.device, args.gpus)
    if args.model:
        os.environ[settings.MODEL.name] = args.model
    if args.batch_size:
        os.environ[settings.BATCH_SIZE.name] = str(args.batch_size)
    os.environ[settings.PRECISION.name] = args.precision
    if os.environ.get(CHILD_ENV):  # started by the supervisor below, which checked the model
        return serve_device(devices[0], args.tasks, args.loglevel, extra)
    check_model_available(model_reference())
    serve_metrics(collectors)  # here, for every device: the children write their samples to its folder
    return supervise_workers([device for device in devices for _ in range(args.processes_per_device)], args, extra)


def serve_device(device: str, tasks: int, loglevel: str, extra: list[str]) -> int:
    """This process as one Celery worker on ``device``: the model loaded first, then ``tasks``
    threads of Celery's threads pool taking tasks from the queue."""
    from worker import heap, lifecycle
    from worker.celery_app import app
    from worker.errors import ClipmaskError

    # Celery sets its logging up once it starts; the model is loaded before, and says so.
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
                        force=True)
    try:
        lifecycle.setup(device)
    except ClipmaskError as err:  # tasks retry the load, and report it if it keeps failing
        log.error("could not load the mask engine: %s", err)
    heap.for_pipelines()  # the model stays for life; its tasks will have hundreds of images in flight
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(tasks),
                     "--queues", app.conf.task_default_queue, "--loglevel", loglevel, *QUIET_PEERS, *extra])
    return 0


def serve_metrics(collectors: Callable[[], Iterable]) -> None:
    """With ``CLIPMASK_METRICS_PORT``, serve Prometheus metrics from this (the main) process."""
    port = settings.METRICS_PORT.get()
    if not port:
        return
    # Before prometheus_client is first imported, so that every worker process writes its samples there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clipmask-metrics-")
    from worker import metrics

    try:
        metrics.serve(port, collectors())
    except OSError as err:
        raise OSError(f"{settings.METRICS_PORT.name}={port}: cannot listen ({err}); choose a free port") from None


def worker_devices(device: str, gpus: str | None) -> list[str]:
    """One entry per worker process: ``cuda:N`` per chosen GPU (``--gpus``), or the one ``--device``."""
    from worker.devices import count_gpus, validate_device

    available = count_gpus()
    if device != "auto" or (not gpus and not available):
        return [validate_device(device)]
    if not gpus or gpus == "all":
        return [f"cuda:{i}" for i in range(available)]
    try:
        indices = [int(i) for i in gpus.split(",")]
    except ValueError:
        raise ValueError(f"--gpus must be 'all' or indices like 0,2; got {gpus!r}") from None
    missing = [i for i in indices if not 0 <= i < available]
    if missing:
        raise ValueError(f"--gpus {gpus}: no GPU {missing} on this machine ({available} visible); "
                         "leave --gpus out to use every GPU, or --device cpu")
    return [f"cuda:{i}" for i in indices]
