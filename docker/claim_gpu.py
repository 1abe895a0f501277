#!/usr/bin/env python3
"""Run a command on one GPU that no other worker replica holds.

    clipmask-claim-gpu clipmask worker [ARGS...]

Installed in the worker image as ``/usr/local/bin/clipmask-claim-gpu``; ``docker/compose.yaml``
starts every ``worker`` replica through it, so ``docker compose up --scale worker=N`` (N at most
the number of GPUs) gives each replica its own GPU.

Why not ``count: 1``: Docker does not share GPUs out between containers. A device request for
``count: N`` always means "GPUs 0 .. N-1", so every replica of a ``count: 1`` service would run
on GPU 0. Instead each replica sees every GPU (``count: all``) and takes the first one that is
free: one lock file per GPU in ``$CLIPMASK_GPU_CLAIM_DIR``, a volume that all replicas on the
host share, held with ``flock`` for as long as the command runs. The lock's file descriptor
is inherited by the command (and Celery's pool processes), and the kernel drops the lock when
the last of them exits, so a crashed or stopped replica frees its GPU without any clean-up.

The command then runs with ``CUDA_VISIBLE_DEVICES`` set to that GPU alone (indices in PCI bus
order, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), so ``clipmask worker`` sees one GPU and starts one
pool process. GPUs are identified by their PCI bus id, from ``/proc/driver/nvidia/gpus`` (the
NVIDIA container runtime shows there the GPUs the container was given), or by the runtime's
``NVIDIA_VISIBLE_DEVICES`` list where that folder shows others too; failing both, by index as
counted by torch. So the replicas of a service never share a GPU, and where the runtime narrows
``/proc`` (its default mode), neither do services whose ``device_ids`` overlap.

Leaves the command untouched when ``CUDA_VISIBLE_DEVICES`` is already set (an explicit choice)
or when no GPU is visible. Exits 1 with a message when every GPU is held by another replica.
Standard library only (torch just for the fallback count), so it starts in milliseconds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys

#: Where the per-GPU lock files live: a volume shared by all replicas on the host.
CLAIM_DIR_ENV = "CLIPMASK_GPU_CLAIM_DIR"
DEFAULT_CLAIM_DIR = "/var/lib/clipmask/gpu-claims"
#: The driver's per-GPU folders, named by PCI bus id. Overridable for tests.
PROC_GPUS_ENV = "CLIPMASK_GPU_PROC_DIR"
DEFAULT_PROC_GPUS = "/proc/driver/nvidia/gpus"

PREFIX = "clipmask-claim-gpu:"


def visible_gpus(proc_dir: str | None = None) -> list[str]:
    """The GPUs this container sees, in CUDA's PCI_BUS_ID index order: PCI bus ids, else indices."""
    proc_dir = proc_dir or os.environ.get(PROC_GPUS_ENV, DEFAULT_PROC_GPUS)
    try:
        # Fixed-width lower-case hex ("0000:3b:00.0"): text order is PCI bus order.
        bus_ids = sorted(name.lower() for name in os.listdir(proc_dir))
    except OSError:
        bus_ids = []
    # The runtime's own list, for a container given some GPUs (device_ids): where the runtime
    # did not narrow /proc down to them (CDI mode), name them by that list instead. Host indices
    # are in PCI bus order, as CUDA numbers them here.
    given = [g.strip() for g in os.environ.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if given and given[0] not in ("all", "none", "void") and len(given) != len(bus_ids):
        if all(g.isdigit() for g in given):
            given.sort(key=int)
        return ["nvidia-" + g for g in given]
    if bus_ids:
        return bus_ids
    try:
        import torch  # NVML count; does not create a CUDA context
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def _lock_path(claim_dir: str, gpu: str) -> str:
    return os.path.join(claim_dir, "gpu-" + gpu.replace(":", "-").replace("/", "-"))


def claim(gpus: list[str], claim_dir: str) -> tuple[int, int] | None:
    """Lock the first free GPU: ``(index, fd)``; the GPU stays claimed while ``fd`` is open.

    ``None`` when every GPU is locked by someone else.
    """
    os.makedirs(claim_dir, exist_ok=True)
    for index, gpu in enumerate(gpus):
        fd = os.open(_lock_path(claim_dir, gpu), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # Who holds it, for a person looking at the folder (the lock itself is the flock).
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        return index, fd
    return None


def holders(gpus: list[str], claim_dir: str) -> list[str]:
    """What the lock files say about their holders (best effort, for the error message)."""
    out = []
    for gpu in gpus:
        try:
            with open(_lock_path(claim_dir, gpu), encoding="utf-8") as f:
                who = f.read().strip()
        except OSError:
            who = ""
        out.append(f"{gpu}: {who or '?'}")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: clipmask-claim-gpu COMMAND [ARGS...]  (e.g. clipmask worker)", file=sys.stderr)
        return 2
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        print(f"{PREFIX} CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} is set; "
              "running without a claim", file=sys.stderr)
        os.execvp(argv[0], argv)
    gpus = visible_gpus()
    if not gpus:
        print(f"{PREFIX} no GPU visible; running without a claim", file=sys.stderr)
        os.execvp(argv[0], argv)
    claim_dir = os.environ.get(CLAIM_DIR_ENV, DEFAULT_CLAIM_DIR)
    claimed = claim(gpus, claim_dir)
    if claimed is None:
        print(f"{PREFIX} all {len(gpus)} GPUs are claimed by other worker replicas "
              f"({'; '.join(holders(gpus, claim_dir))}). Run at most {len(gpus)} replicas on this "
              f"host: docker compose up -d --scale worker={len(gpus)}", file=sys.stderr)
        return 1
    index, fd = claimed
    os.set_inheritable(fd, True)  # the exec'd command keeps the lock
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    print(f"{PREFIX} GPU {index} ({gpus[index]}) of {len(gpus)} claimed for this replica",
          file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
