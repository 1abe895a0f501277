"""The arguments of ``clipmask``: its subcommands, their options and help.

Exit codes (``EXIT_CODES``): 0 success; 1 some images failed (``run``) or the job is unknown
(``status``, ``cancel``, ``resume``); 2 a usage or configuration error, with a message saying how
to fix it. Importing this needs neither torch nor Celery, Redis or boto3.
"""

from __future__ import annotations

import argparse

from tasks.settings import DEFAULT_CHUNK_SIZE
from worker import settings
from worker.spec import IMAGE_OUTPUTS, PROFILES, MaskSpec, split_outputs

EXIT_CODES = """exit codes:
  0  success
  1  some images failed (run), or the job is unknown (status, cancel, resume)
  2  a usage or configuration error: the message says what to change"""

EPILOG = EXIT_CODES + """

configuration (environment; every variable in docs/operations.md):
  CELERY_BROKER_URL                          the task queue: Redis, or RabbitMQ (amqp://...)
  CELERY_RESULT_BACKEND, CLIPMASK_REDIS_URL  Redis for task results, and for job records
  CLIPMASK_MODEL                             HF model id or local directory (default CIDAS/clipseg-rd64-refined)
  AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION   boto3's own
  HF_HOME, HF_HUB_OFFLINE                    Hugging Face's own cache and offline switch
storage arguments are s3://bucket/prefix URLs or local paths."""


def at_least(low: int):
    """An argparse type: a whole number >= ``low``, else an error naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "number"
    return parse


def _mask_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("mask options")
    group.add_argument("--prompt", required=True, help="what to mask; several with '|', e.g. 'person|dog'")
    group.add_argument("--negative", default="", help="what to cut out of the mask, '|'-separated")
    group.add_argument("--threshold", type=float, default=0.5, help="mask >= threshold is on (default 0.5)")
    group.add_argument("--normalize", action="store_true", help="stretch each image's mask to [0, 1] first")
    group.add_argument("--profile", choices=PROFILES, default="default",
                       help="default: fast, 352x352 backbone; masquerade: the seed node's exact recipe")
    group.add_argument("--max-side", type=at_least(1), default=settings.MAX_SIDE.get(),
                       help="masquerade only: longest image side accepted (default $CLIPMASK_MAX_SIDE or "
                            f"{settings.MAX_SIDE.default})")
    group.add_argument("--blur", type=float, default=0.0, help="Gaussian sigma in pixels on the raw mask")
    group.add_argument("--grow", type=int, default=0, help="grow (or, negative, shrink) the mask by N pixels")
    group.add_argument("--invert", action="store_true", help="invert both masks")
    group.add_argument("--raw-bits", type=int, choices=(8, 16), default=8, help="bit depth of the raw mask PNG")
    group.add_argument("--outputs", type=split_outputs, default=IMAGE_OUTPUTS, metavar="mask[,raw][,rle]",
                       help="what to write, comma-separated: mask (0/255 PNG), raw (PNG), rle (the thresholded "
                            "mask as COCO RLE in the .json record, no file of its own) (default mask,raw); mask "
                            "alone halves the encoding work, rle alone writes no PNG")
    group.add_argument("--skip-existing", action="store_true", help="mask only what is new or changed: an image whose "
                       "metadata record under DST is newer than it is left alone; one modified since its record "
                       "was written is masked again (shards: a shard whose output shard is newer than it). Found "
                       "from the listings of SRC and DST side by side, with no request per image")
    return parent


def _engine_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model and device")
    group.add_argument("--model", help="HF model id or local directory (default: $CLIPMASK_MODEL)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16", "int8"),
                       help="auto (fp16 on CUDA, fp32 on CPU); fp32, fp16 or bf16 on CUDA; fp32, int8 or bf16 on "
                            "CPU (int8: the vision encoder quantised, about 2x faster)")
    group.add_argument("--batch-size", type=at_least(1), help="images per backbone batch (default 4 on CPU, 32 on CUDA)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipmask", description="Text-prompted image masks (CLIPSeg) for folders and buckets.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (with run: every image)")
    parser.add_argument("--version", action="version", version=f"clipmask {_version()}")
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    mask, engine = _mask_options(), _engine_options()
    run = commands.add_parser("run", parents=[mask, engine], help="mask SRC into DST in this process, no broker")
    submit = commands.add_parser("submit", parents=[mask], help="queue a job for Celery workers; prints the job id")
    for sub in (run, submit):
        sub.add_argument("source", metavar="SRC", help="s3://bucket/prefix or a local folder of images; or of "
                         "WebDataset .tar or Parquet shards, or a brace pattern of them: s3://b/data/{00000..00099}.tar")
        sub.add_argument("--out", required=True, metavar="DST", help="s3://bucket/prefix or a local folder")
        sub.add_argument("--image-column", metavar="NAME",
                         help="the column of Parquet shards that holds the image bytes, binary or a struct with a "
                              "'bytes' field (default: jpg, else image)")
    run.add_argument("--output-format", choices=("files", "webdataset", "parquet"),
                     help="files: three files per image beside its relative path (the default, and the only "
                          "choice, for a folder of images); webdataset: one output .tar shard per input shard, each "
                          "sample's mask, raw mask and record in it; parquet: one output .parquet per input shard, "
                          "columns key, mask, raw (PNG bytes) and json (the record). Shards default to their "
                          "own format")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log every image")
    submit.add_argument("--chunk-size", type=at_least(1), default=DEFAULT_CHUNK_SIZE,
                        help=f"images per task (default {DEFAULT_CHUNK_SIZE}; shards: one shard per task)")
    status = commands.add_parser("status", help="progress of a job")
    status.add_argument("job_id", metavar="JOB")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true", help="show a progress bar until the job ends")
    cancel = commands.add_parser("cancel", help="cancel a job: its remaining images are skipped")
    cancel.add_argument("job_id", metavar="JOB")
    resume = commands.add_parser(
        "resume", help="complete an interrupted plan and queue again every chunk without a result",
        description="Complete the plan of a job whose `clipmask submit` was interrupted (listing continues "
                    "after the last planned image) and queue again every chunk that has no result. Safe to "
                    "run at any time. Workers do the re-queueing part by themselves after "
                    "CLIPMASK_VISIBILITY_TIMEOUT seconds without progress.")
    resume.add_argument("job_id", metavar="JOB")
    resume.add_argument("--out", metavar="DST", help="the job's DST: only needed when Redis lost the job's "
                                                      "records, to rebuild them from DST/_jobs/JOB/")
    preview = commands.add_parser(
        "preview", help="write a static HTML page of a job's masks, to look at",
        description="Write a static HTML page (index.html, thumbs/, overlays/) of a finished job: a random "
                    "sample of images with their masks tinted over them, a coverage histogram, the failures.")
    preview.add_argument("dest", metavar="DST", help="the job's --out: s3://bucket/prefix or a folder")
    preview.add_argument("--job", dest="job_id", metavar="JOB", help="job id (default: the latest finished job)")
    preview.add_argument("--out", dest="out_dir", metavar="DIR", help="local folder for the page (default ./preview-JOB)")
    preview.add_argument("--limit", type=at_least(0), default=200, help="images sampled, failures listed, at most (default 200)")
    preview.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    serve = commands.add_parser(
        "serve", help="serve the HTTP API (masks, jobs) for backends in any language",
        description="Serve clipmask over HTTP (FastAPI on uvicorn): POST /v1/masks masks one image from a URL or "
                    "an upload, /v1/jobs submits, follows, cancels and resumes dataset jobs; /healthz, /readyz, "
                    "/metrics, /openapi.json and /docs. Stateless: it talks to the same broker, Redis and storage "
                    "as the workers, so any number can run behind a load balancer. Every /v1 call needs "
                    "Authorization: Bearer <token> (CLIPMASK_API_TOKENS); source and dest must lie under "
                    "CLIPMASK_API_ALLOWED; uploads go to CLIPMASK_API_UPLOADS; bodies over CLIPMASK_API_MAX_BYTES "
                    "are refused (413).")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=at_least(1), default=8000, help="port (default 8000)")
    serve.add_argument("--no-auth", action="store_true", help="accept calls without a token: binds 127.0.0.1 only")
    serve.add_argument("--no-access-log", dest="access_log", action="store_false", help="log no line per request")
    serve.add_argument("--loglevel", default="info", choices=("critical", "error", "warning", "info", "debug"))
    worker = commands.add_parser(
        "worker", parents=[engine], help="start this machine's Celery workers",
        description="Start one worker process per GPU (one CPU process without GPUs), or --processes-per-device "
                    "of them. Each process loads the "
                    "model once and holds up to --tasks tasks at a time (Celery's threads pool); their images "
                    "share one device loop, which batches them together. Other options are passed to "
                    "`celery worker`.")
    worker.add_argument("--gpus", help="'all' (default when GPUs exist) or indices, e.g. 0,2")
    worker.add_argument("--tasks", type=at_least(1), default=settings.WORKER_TASKS.get(),
                        help="tasks each process holds at once, feeding its device loop "
                             f"(default $CLIPMASK_WORKER_TASKS or {settings.WORKER_TASKS.default})")
    worker.add_argument("--processes-per-device", type=at_least(1),
                        default=settings.PROCESSES_PER_DEVICE.get(),
                        help="worker processes per device, each with its own model, tasks and device loop "
                             "(default $CLIPMASK_PROCESSES_PER_DEVICE or 1). Raise it on a GPU when one "
                             "process's host work (S3 requests, PNG encoding: Python, one core at a time) "
                             "cannot keep the GPU busy; on the CPU the processes share its threads")
    worker.add_argument("--loglevel", default="INFO")
    return parser


class _Commands:
    """Subparsers that show the exit codes in their help."""

    def __init__(self, subparsers):
        self.subparsers = subparsers

    def add_parser(self, name: str, parents=(), **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, parents=list(parents), epilog=EXIT_CODES,
                                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("clipmask")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def spec_from_args(args: argparse.Namespace) -> MaskSpec:
    """The mask options as a ``MaskSpec``; raises ``InvalidSpecError`` naming a bad one."""
    return MaskSpec.from_text(
        args.prompt, args.negative, threshold=args.threshold, normalize=args.normalize, profile=args.profile,
        blur_sigma=args.blur, grow=args.grow, invert=args.invert, raw_bits=args.raw_bits, max_side=args.max_side,
        outputs=args.outputs,
    )
