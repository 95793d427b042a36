"""ImageNet-1k conventions: WordNet-id class folders and timm's evaluation preprocessing.

The class order is timm's: index i is line i of `timm/data/_info/imagenet_synsets.txt`,
read through `timm.data.ImageNetInfo`. This is the sorted order of the 1000 WordNet ids,
the order that every ImageNet-1k classifier in timm predicts in.

Evaluation preprocessing follows `timm.data.transforms_imagenet_eval` in its default
"center" crop mode: resize to floor(input_size / crop_pct) with the model's interpolation,
then center-crop to the input size.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .data import DataError, list_class_folders, scan_image_folder
from .io import CheckpointError

IMAGENET_NUM_CLASSES = 1000

# timm.data.constants.DEFAULT_CROP_PCT and the default interpolation of
# timm.data.resolve_data_config (timm 1.0.31).
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bicubic"

# A WordNet noun synset id as ImageNet names its classes: "n" and an 8-digit offset.
_WORDNET_ID = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """Return the 1000 ImageNet-1k WordNet ids in class-index order, as timm ships them."""
    from timm.data import ImageNetInfo

    synsets = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(synsets) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"timm's imagenet_synsets.txt lists {len(synsets)} classes, expected "
                           f"{IMAGENET_NUM_CLASSES}; reinstall timm")
    return synsets


@lru_cache(maxsize=1)
def imagenet_descriptions() -> tuple[str, ...]:
    """Return the 1000 class descriptions ("tabby, tabby cat", ...) in class-index order."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_descriptions())


def is_wordnet_id(name: str) -> bool:
    return _WORDNET_ID.fullmatch(name) is not None


def uses_wordnet_folders(root: str | os.PathLike[str]) -> bool:
    """Return True when any class folder of `root` is named like a WordNet id (n01440764)."""
    return any(is_wordnet_id(folder.name) for folder in list_class_folders(root))


def synset_indices(root: str | os.PathLike[str]) -> dict[str, int]:
    """Map each class folder of `root` to its ImageNet-1k index by its WordNet id.

    The folder may hold any subset of the 1000 classes. Raises DataError naming every
    folder that is not an ImageNet-1k WordNet id.
    """
    root = Path(root)
    index_of = {synset: index for index, synset in enumerate(imagenet_synsets())}
    folders = list_class_folders(root)
    unknown = [folder.name for folder in folders if folder.name not in index_of]
    if unknown:
        listed = ", ".join(unknown[:5])
        if len(unknown) > 5:
            listed += f" and {len(unknown) - 5} more"
        raise DataError(
            f"image folder {root} is in the ImageNet layout, but {len(unknown)} class folders are "
            f"not ImageNet-1k WordNet ids: {listed}; rename each folder to the WordNet id of its "
            "class (such as n01440764) or remove it"
        )
    return {folder.name: index_of[folder.name] for folder in folders}


def scan_imagenet_folder(root: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """List (image path, ImageNet-1k class index) pairs of a folder of WordNet-id folders."""
    return scan_image_folder(root, folder_indices=synset_indices(root))


def scan_evaluation_folder(
    root: str | os.PathLike[str], num_classes: int, class_names: Sequence[str] | None
) -> tuple[list[tuple[Path, int]], str]:
    """List the labelled images of `root` for a model with `num_classes` outputs.

    Returns the samples and the label mapping used: "imagenet-1k synsets" when the model
    has 1000 outputs and the folders are named by WordNet id, else the mapping of
    `scan_image_folder` by class name or sorted folder order.
    """
    if num_classes == IMAGENET_NUM_CLASSES and uses_wordnet_folders(root):
        return scan_imagenet_folder(root), "imagenet-1k synsets"
    return scan_image_folder(root, class_names), "class folders"


def eval_resize(input_size: Sequence[int], crop_pct: float) -> int | list[int]:
    """Return the resize before the center crop, as timm's evaluation transform computes it.

    `input_size` is (height, width). A square input gives one int (the shorter image side
    is resized to it), a non-square input gives [height, width] (the image is scaled,
    aspect ratio kept, until it covers that size).
    """
    if not 0 < crop_pct:
        raise ValueError(f"crop_pct must be positive, got {crop_pct}")
    height, width = input_size
    if height == width:
        return math.floor(height / crop_pct)
    return [math.floor(height / crop_pct), math.floor(width / crop_pct)]


def preprocessing_from_arch(arch: Mapping[str, Any], image_shape: Sequence[int]) -> dict[str, Any]:
    """Return the resize, crop and interpolation entries of `hnq.preprocessing` for a model.

    `image_shape` is the model input (channels, height, width). When `arch` records
    `crop_pct` (from the timm model's pretrained_cfg), images are resized by timm's rule
    and center-cropped to the input size. Without it nothing is resized, so images must
    already have the input size. `arch["input_size"]`, when present, must match `image_shape`.
    """
    _, height, width = image_shape
    recorded = arch.get("input_size")
    if recorded is not None and tuple(recorded)[-2:] != (height, width):
        raise CheckpointError(f"the checkpoint's arch records input_size {list(recorded)} but the model takes "
                        f"{height}x{width} images; re-create the checkpoint with a matching input_size")
    crop_pct = arch.get("crop_pct")
    if crop_pct is None:
        return {"resize": None, "crop": None, "interpolation": arch.get("interpolation", DEFAULT_INTERPOLATION)}
    return {
        "resize": eval_resize((height, width), float(crop_pct)),
        "crop": [height, width],
        "crop_pct": float(crop_pct),
        "interpolation": arch.get("interpolation", DEFAULT_INTERPOLATION),
    }
