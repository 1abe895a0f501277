"""The images of a source: its keys with an image extension, in listing (S3 key) order."""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, TypeVar

from storage import ObjectStore
from storage.layout import IMAGE_EXTENSIONS, is_image_key, is_output_key
from tasks.errors import NoImagesError

K = TypeVar("K", bound=str)


def image_keys(source: ObjectStore, start_after: str | None = None) -> Iterator[str]:
    """Keys under ``source`` with an image extension, excluding clipmask's own outputs."""
    return only_images(source.list(start_after=start_after) if start_after else source.list())


def only_images(keys: Iterable[K]) -> Iterator[K]:
    """Those of ``keys`` (plain, or ``Listed``) with an image extension, not clipmask's outputs."""
    return (key for key in keys if is_image_key(key) and not is_output_key(key))


def chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def no_images(source: ObjectStore) -> NoImagesError:
    """The error for a source without images, naming the extensions looked for."""
    return NoImagesError(f"no images under {source.url} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
