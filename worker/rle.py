"""The thresholded mask as COCO run-length encoding, the ``rle`` field of the metadata record.

``encode`` gives what ``pycocotools.mask.encode`` gives, its ``counts`` as text so that the record
stays JSON; ``pycocotools.mask.decode`` reads the field as it is (``decode`` here does that for the
preview). numpy and pycocotools only: no torch, so the job side may read records with it.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(pixels: np.ndarray) -> dict:
    """``{"size": [h, w], "counts": str}`` of an (H, W) mask, any non-zero pixel on (a 0/255
    ``mask.png`` and a bool mask encode the same). COCO runs go down the columns, so the mask is
    copied once into column order (H * W bytes), as bools: 0/1 bytes that pycocotools takes as
    uint8 without another copy (a uint8 copy costs 1.7x as much)."""
    column_major = np.asfortranarray(pixels != 0).view(np.uint8)
    rle = coco_mask.encode(column_major)
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """The (H, W) uint8 mask, 0 or 1, of a record's ``rle`` field (``encode``'s inverse).
    Raises ``ValueError`` when the field is not shaped as one."""
    try:
        height, width = (int(side) for side in rle["size"])
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"not a COCO RLE ({{'size': [h, w], 'counts': str}}): {err}") from None
    return coco_mask.decode({"size": [height, width], "counts": counts})
