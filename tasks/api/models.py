"""What the API's calls take and answer, as pydantic models: they validate a request (a ``422``
names each invalid field) and describe it in the OpenAPI schema, with examples.

The mask options are ``clipmask run``'s (``docs/design.md``, "Mask semantics"), under the names
of a ``MaskSpec`` (``blur_sigma``, ``raw_bits``, ...), as in scheduled batches' entries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.api.problems import invalid, invalid_field
from tasks.settings import DEFAULT_CHUNK_SIZE
from worker import settings as worker_settings
from worker.errors import InvalidSpecError
from worker.spec import IMAGE_OUTPUTS, MaskSpec, split_outputs


class MaskOptions(BaseModel):
    """What to mask and how (``clipmask run --help``); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to mask; several with `|`, e.g. `person|dog`")
    negative: str = Field("", description="what to cut out of the mask, `|`-separated")
    threshold: float = Field(0.5, ge=0, le=1, description="mask >= threshold is on")
    normalize: bool = Field(False, description="stretch each image's mask to [0, 1] first")
    profile: Literal["default", "masquerade"] = Field("default", description="default: 352x352 backbone; "
                                                      "masquerade: the seed node's exact recipe")
    max_side: int | None = Field(None, ge=1, description="masquerade only: longest image side accepted "
                                 "(default CLIPMASK_MAX_SIDE, 2048)")
    blur_sigma: float = Field(0.0, ge=0, description="Gaussian sigma in pixels on the raw mask")
    grow: int = Field(0, description="grow (or, negative, shrink) the thresholded mask by N pixels")
    invert: bool = Field(False, description="invert both masks")
    raw_bits: Literal[8, 16] = Field(8, description="bit depth of the raw mask PNG")
    outputs: list[Literal["mask", "raw", "rle"]] = Field(
        list(IMAGE_OUTPUTS), min_length=1, description="what to write: `mask` and `raw` are PNGs; `rle` is the "
        "thresholded mask as COCO RLE in the metadata record (`rle`: `{\"size\": [h, w], \"counts\"}`), no file "
        "of its own", examples=[["mask", "raw"], ["rle"]])
    callback_url: str | None = Field(None, description="POSTed the result when it is ready, signed as Standard "
                                     "Webhooks specifies; must start with one of CLIPMASK_API_CALLBACKS")

    @field_validator("raw_bits", mode="before")
    @classmethod
    def _bits_from_text(cls, value: Any) -> Any:  # a form field is text
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs_from_text(cls, value: Any) -> Any:  # "mask,rle", as the CLI and a form take it
        return list(split_outputs(value)) if isinstance(value, str) else value

    def spec(self) -> MaskSpec:
        """The ``MaskSpec``; a ``422`` naming the field for what only the spec can tell (a prompt
        of nothing but ``|``)."""
        options = self.model_dump(exclude={"prompt", "negative", "source", "dest", "chunk_size", "skip_existing",
                                           "image_column", "callback_url"})
        if options["max_side"] is None:
            options["max_side"] = worker_settings.MAX_SIDE.get()
        options["outputs"] = tuple(options["outputs"])
        try:
            return MaskSpec.from_text(self.prompt, self.negative, **options)
        except InvalidSpecError as err:
            raise invalid_field(_spec_field(str(err)), str(err)) from None


#: The spec's messages name CLI flags; the API's fields are named after the spec.
_FLAGS = {"--prompt": "prompt", "--threshold": "threshold", "--profile": "profile", "--blur": "blur_sigma",
          "--grow": "grow", "--raw-bits": "raw_bits", "--outputs": "outputs", "--max-side": "max_side"}


def _spec_field(message: str) -> str:
    if message.startswith("no positive prompt"):
        return "prompt"
    return next((field for flag, field in _FLAGS.items() if flag in message), "")


class MaskRequest(MaskOptions):
    """Mask one image: ``source`` is its URL, ``dest`` the prefix its outputs go under (its file
    name kept: ``dest/<name>.mask.png``, ``.raw.png``, ``.json``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"source": "s3://uploads/u/42.jpg", "dest": "s3://masks/u/", "prompt": "person|dog",
         "negative": "background", "threshold": 0.4},
        {"source": "s3://uploads/u/43.jpg", "dest": "s3://masks/u/", "prompt": "person", "outputs": ["rle"]}]})

    source: str = Field(description="URL of one image: s3://bucket/key, or a path under an allowed folder")
    dest: str = Field(description="URL prefix for the outputs: s3://bucket/prefix/ or an allowed folder")


class UploadFields(MaskOptions):
    """The fields of a ``multipart/form-data`` upload, beside the image in ``file``."""

    dest: str = Field(description="URL prefix for the outputs")


class JobRequest(MaskOptions):
    """A dataset job, as ``clipmask submit`` takes it: every image under ``source`` masked into ``dest``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"source": "s3://photos/2024/", "dest": "s3://masks/2024/", "prompt": "person|dog",
         "negative": "background", "chunk_size": 64, "skip_existing": True}]})

    source: str = Field(description="URL prefix of the images: s3://bucket/prefix/ or an allowed folder")
    dest: str = Field(description="URL prefix for the outputs and the job's records (dest/_jobs/<id>/)")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1, description="images per task")
    skip_existing: bool = Field(False, description="mask only what is new or changed since its record")
    image_column: str | None = Field(None, description="Parquet shards only: the column of image bytes "
                                                       "(default: jpg, else image)")


class Accepted(BaseModel):
    """A request taken: poll ``Location`` (``/v1/masks/{id}`` or ``/v1/jobs/{id}``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "9b1c0e4d2f5a4e7a8c3b6d1e0f2a4b5c",
                                                               "state": "queued"}]})

    id: str
    state: str = Field(description="masks: queued | running; jobs: planning | queued | running | finished | "
                                   "cancelled")


class MaskResult(BaseModel):
    """A mask request that has ended: its manifest row and its metadata record. ``status`` is
    ``succeeded`` or ``failed`` (then ``error`` says why); ``files`` are the outputs to download
    (none with ``outputs: ["rle"]``: the mask is then ``metadata.rle``, COCO RLE)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "id": "9b1c0e4d2f5a4e7a8c3b6d1e0f2a4b5c", "state": "finished", "status": "succeeded",
        "source": "s3://uploads/u/42.jpg",
        "outputs": {"mask": "s3://masks/u/42.jpg.mask.png", "raw": "s3://masks/u/42.jpg.raw.png"},
        "files": {"mask": "/v1/masks/9b1c0e4d2f5a4e7a8c3b6d1e0f2a4b5c/mask.png",
                  "raw": "/v1/masks/9b1c0e4d2f5a4e7a8c3b6d1e0f2a4b5c/raw.png"},
        "metadata": {"width": 640, "height": 480, "prompts": ["person", "dog"], "coverage": 0.21}}, {
        "id": "5d2e8a0c9b3f4e1d8a7c6b5e4d3c2b1a", "state": "finished", "status": "succeeded",
        "source": "s3://uploads/u/43.jpg", "outputs": {"metadata": "s3://masks/u/43.jpg.json"}, "files": {},
        "metadata": {"width": 640, "height": 480, "prompts": ["person"], "coverage": 0.18,
                     "rle": {"size": [480, 640], "counts": "PSe35Z>2N2N1O1N2O0O2M3N1..."}}}]})

    id: str
    state: Literal["finished"]
    status: Literal["succeeded", "failed", "skipped"]
    source: str | None = None
    outputs: dict[str, str] | None = None
    error: str | None = None
    metadata: dict | None = None
    files: dict[str, str] = Field(default_factory=dict)


class Pending(BaseModel):
    """A mask request not ended yet: ``queued`` (waiting for a worker) or ``running``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "9b1c0e4d2f5a4e7a8c3b6d1e0f2a4b5c",
                                                               "state": "running"}]})

    id: str
    state: Literal["queued", "running"]


def validate_model(model: type[BaseModel], data: Any) -> BaseModel:
    """``model`` from ``data``, or a ``422`` naming each invalid field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise invalid(err.errors()) from None


__all__ = ["Accepted", "JobRequest", "MaskOptions", "MaskRequest", "MaskResult", "Pending", "UploadFields",
           "validate_model"]
