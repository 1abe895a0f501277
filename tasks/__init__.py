"""The job side: Celery tasks, planning and fan-out, progress, manifests, the CLI and client API."""
