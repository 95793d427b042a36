"""Datasets for training and evaluation: Fashion-MNIST idx files and image folders.

Fashion-MNIST is read from the four idx files that the Debian package
`dataset-fashion-mnist` installs under /usr/share/datasets/fashion-mnist. Image folders
follow the ImageNet validation layout (one sub-folder per class, image files inside), so
an exported model can be evaluated on real image files, including Fashion-MNIST written
out with `write_image_folder`.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FASHION_MNIST_IMAGE_SIZE = (28, 28)

# Standard file names of the four idx files. Each may also carry a `.gz` suffix.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# idx magic numbers: two zero bytes, the element type (0x08 = unsigned byte) and the
# number of dimensions.
IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions (count, rows, columns)
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension (count)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# 16-bit Pillow modes. Pillow's own convert("L") clips these to 255 instead of scaling
# them (seen with Pillow 13.0), so load_image scales them itself.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# timm's interpolation names (timm.data.transforms.str_to_pil_interp) and their Pillow filters.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

_INSTALL_HINT = (
    "install the data with `apt-get install dataset-fashion-mnist` as root, or pass "
    "--data-dir with a folder holding the four idx files "
    f"({', '.join(FASHION_MNIST_FILES.values())}, each optionally gzip-compressed as .gz)"
)


class DataError(ValueError):
    """A data file or folder is missing or invalid; the message names it and the fix."""


class ImageReadError(DataError):
    """An image file that cannot be decoded or converted (corrupt, truncated, unsupported)."""


@dataclass(frozen=True)
class SkippedImage:
    """An image left out of an evaluation, with the reason."""

    path: str
    reason: str


@dataclass(frozen=True)
class FashionMNIST:
    """Fashion-MNIST arrays: uint8 images [N, 28, 28] and int64 labels [N] in 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES


# ---------------------------------------------------------------------------
# Fashion-MNIST idx files
# ---------------------------------------------------------------------------


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> FashionMNIST:
    """Load and validate the four Fashion-MNIST idx files from `data_dir`.

    `data_dir` defaults to DEFAULT_FASHION_MNIST_DIR. Each file may be gzip-compressed
    (`.gz`) or not; when both exist, the uncompressed file is read.
    Raises DataError when a file is missing, truncated or inconsistent.
    """
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "not found"
        raise DataError(f"Fashion-MNIST folder {what}: {folder}; {_INSTALL_HINT}")

    paths = {key: _find_idx_file(folder, name) for key, name in FASHION_MNIST_FILES.items()}

    train_images = _read_idx_images(paths["train_images"])
    train_labels = _read_idx_labels(paths["train_labels"], len(FASHION_MNIST_CLASSES))
    _check_counts_match(paths["train_images"], train_images, paths["train_labels"], train_labels)

    test_images = _read_idx_images(paths["test_images"])
    test_labels = _read_idx_labels(paths["test_labels"], len(FASHION_MNIST_CLASSES))
    _check_counts_match(paths["test_images"], test_images, paths["test_labels"], test_labels)

    logger.info(
        "loaded Fashion-MNIST from %s: %d train and %d test images",
        folder,
        len(train_images),
        len(test_images),
    )
    return FashionMNIST(train_images, train_labels, test_images, test_labels)


def _find_idx_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file not found: {folder / name}.gz (nor uncompressed "
        f"{folder / name}); {_INSTALL_HINT}"
    )


def _read_file_bytes(path: Path) -> bytes:
    """Read a whole file, decompressing it when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        # A truncated .gz raises EOFError and a corrupt one gzip.BadGzipFile (an OSError)
        # or zlib.error.
        raise DataError(
            f"failed to read {path}: {error}; the file is truncated or corrupt, so "
            "replace it with a complete copy"
        ) from error


def _parse_idx(path: Path, expected_magic: int, expected_ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes into an array shaped by its header."""
    data = _read_file_bytes(path)
    header_length = 4 + 4 * expected_ndim
    if len(data) < header_length:
        raise DataError(
            f"idx file {path} is {len(data)} bytes long, shorter than its "
            f"{header_length}-byte header; the file is truncated, so replace it with a "
            "complete copy"
        )

    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"idx file {path} has magic number {magic} (0x{magic:08x}) but "
            f"{expected_magic} (0x{expected_magic:08x}) was expected; the file is not "
            "an idx file of this kind, or images and labels were swapped"
        )

    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    expected_length = header_length + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_length:
        raise DataError(
            f"idx file {path} is {len(data)} bytes long but its header (dimensions "
            f"{dims}) requires {expected_length} bytes; the file is truncated or "
            "corrupt, so replace it with a complete copy"
        )

    # Copy so that callers get a writable array instead of a view of immutable bytes.
    return np.frombuffer(data, dtype=np.uint8, offset=header_length).reshape(dims).copy()


def _read_idx_images(path: Path) -> np.ndarray:
    images = _parse_idx(path, IDX_IMAGES_MAGIC, 3)
    count, rows, columns = images.shape
    if (rows, columns) != FASHION_MNIST_IMAGE_SIZE:
        raise DataError(
            f"idx file {path} contains {rows}x{columns} images but Fashion-MNIST images are "
            f"{FASHION_MNIST_IMAGE_SIZE[0]}x{FASHION_MNIST_IMAGE_SIZE[1]}; pass --data-dir "
            "with a folder holding Fashion-MNIST idx files"
        )
    if count == 0:
        raise DataError(f"idx file {path} contains no images; replace it with a complete copy")
    return images


def _read_idx_labels(path: Path, num_classes: int) -> np.ndarray:
    labels = _parse_idx(path, IDX_LABELS_MAGIC, 1)
    out_of_range = np.flatnonzero(labels >= num_classes)
    if out_of_range.size > 0:
        index = int(out_of_range[0])
        raise DataError(
            f"idx file {path} has label {int(labels[index])} at index {index}, outside "
            f"0..{num_classes - 1} ({out_of_range.size} labels out of range in all); the "
            "file is corrupt or not a Fashion-MNIST label file"
        )
    return labels.astype(np.int64)


def _check_counts_match(
    images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray
) -> None:
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} contains {len(images)} images but {labels_path} contains "
            f"{len(labels)} labels; both files must come from the same split, so "
            "replace them with matching copies"
        )


# ---------------------------------------------------------------------------
# Image folders in the ImageNet validation layout
# ---------------------------------------------------------------------------


def class_folder_name(index: int, class_name: str, num_classes: int) -> str:
    """Return the folder name for class `index`, such as `0_T-shirt-top`.

    The index is zero-padded to the digits of the largest index, so sorting the folder
    names by string puts them in index order.
    """
    width = len(str(max(num_classes - 1, 0)))
    return f"{index:0{width}d}_{_safe_file_name(class_name)}"


def _safe_file_name(name: str) -> str:
    """Replace every run of characters outside [A-Za-z0-9._-] with one '-'."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return safe or "class"


def write_image_folder(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int],
    class_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    progress: bool = True,
) -> Path:
    """Write images as PNG files into one sub-folder per class and return `out_dir`.

    `images` is uint8 [N, H, W] (grey-scale) or [N, C, H, W] with C = 1 or 3. Image i is
    written to `out_dir/<class folder>/{i:05d}.png`, with class folders named by
    `class_folder_name`. The files go to a temporary sibling folder, which is renamed to
    `out_dir` only when complete; an existing `out_dir` is removed after that rename.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    _check_images_to_write(images, labels, class_names)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(
            f"output path {out_dir} exists and is not a folder; remove it or choose "
            "another output folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    folder_names = [
        class_folder_name(index, name, len(class_names)) for index, name in enumerate(class_names)
    ]
    temporary_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # mkdtemp creates the folder with mode 0700, and the rename keeps that mode. So the
    # folder gets the permissions that a plain mkdir would give under the current umask.
    umask = os.umask(0)
    os.umask(umask)
    temporary_dir.chmod(0o777 & ~umask)
    logger.info("writing %d images of %d classes to %s", len(images), len(class_names), out_dir)
    try:
        for folder_name in folder_names:
            (temporary_dir / folder_name).mkdir()
        bar = tqdm(
            total=len(images), desc=f"writing {out_dir.name}", unit="img", disable=not progress
        )
        with bar:
            for index, (image, label) in enumerate(zip(images, labels)):
                path = temporary_dir / folder_names[int(label)] / f"{index:05d}.png"
                Image.fromarray(_to_pillow_layout(image)).save(path)
                bar.update(1)
        _move_into_place(temporary_dir, out_dir)
    except BaseException:
        # Also on KeyboardInterrupt, so an interrupted run leaves no half-written folder.
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise
    return out_dir


def _check_images_to_write(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}; convert them to uint8 first")
    channels_ok = images.ndim == 4 and images.shape[1] in (1, 3)
    if images.ndim != 3 and not channels_ok:
        raise DataError(
            f"images have shape {images.shape} but [N, H, W] or [N, C, H, W] with C = 1 "
            "or 3 is required"
        )
    if labels.shape != (len(images),):
        raise DataError(
            f"labels have shape {labels.shape} but one label per image, shape "
            f"({len(images)},), is required"
        )
    if len(class_names) == 0:
        raise DataError("class_names is empty; pass one name per class")
    if labels.size > 0 and (labels.min() < 0 or labels.max() >= len(class_names)):
        bad = labels[(labels < 0) | (labels >= len(class_names))][0]
        raise DataError(
            f"label {int(bad)} is outside 0..{len(class_names) - 1}, the indices of the "
            f"{len(class_names)} class names; pass labels and class names that match"
        )


def _to_pillow_layout(image: np.ndarray) -> np.ndarray:
    """Turn [H, W] or [C, H, W] into the [H, W] or [H, W, 3] layout Pillow expects."""
    if image.ndim == 2:
        return image
    if image.shape[0] == 1:
        return image[0]
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def _move_into_place(source: Path, destination: Path) -> None:
    """Rename the complete folder `source` to `destination`, replacing an old one."""
    if not destination.exists():
        source.rename(destination)
        return
    # Rename the old folder aside first, because rename cannot replace a non-empty folder.
    # NOTE: an interruption between the two renames leaves the old folder at the
    # `.old-` sibling and no folder at `destination`.
    old_dir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    old_dir.rmdir()
    destination.rename(old_dir)
    source.rename(destination)
    shutil.rmtree(old_dir)
    logger.info("replaced the existing folder %s", destination)


def list_class_folders(root: str | os.PathLike[str]) -> list[Path]:
    """List the class sub-folders of an image folder, sorted by name.

    Folders whose names start with '.' are skipped. Raises DataError when `root` is
    missing, not a folder, or has no class sub-folders.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"image folder not found: {root}; pass a folder with one sub-folder per class"
        )
    if not root.is_dir():
        raise DataError(
            f"image folder {root} is not a folder; pass a folder with one sub-folder per class"
        )

    class_dirs = sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    if not class_dirs:
        raise DataError(
            f"image folder {root} has no class sub-folders; put the images of each class in "
            "a sub-folder of its own (ImageNet validation layout)"
        )
    return class_dirs


def scan_image_folder(
    root: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    folder_indices: Mapping[str, int] | None = None,
) -> list[tuple[Path, int]]:
    """List (image path, class index) pairs of an image folder in the ImageNet layout.

    Class sub-folders are sorted by name and numbered in that order, as torchvision's
    ImageFolder does; folders whose names start with '.' are skipped. With
    `class_names`, the number of class folders must equal the number of names. When
    every folder is named after a class (the class name itself, its safe file name, or
    the `class_folder_name` that write_image_folder uses), folders are mapped by name
    instead. With `folder_indices` (folder name to class index, such as WordNet id to
    ImageNet index), every folder must be in it and `class_names` is ignored. Images are
    files with an extension in IMAGE_EXTENSIONS, in any letter case, sorted by name
    within each class.
    """
    root = Path(root)
    class_dirs = list_class_folders(root)
    if folder_indices is not None:
        missing = [class_dir.name for class_dir in class_dirs if class_dir.name not in folder_indices]
        if missing:
            raise DataError(
                f"image folder {root} has class folders without a class index: "
                f"{', '.join(missing[:5])}; rename or remove them"
            )
        indices = [int(folder_indices[class_dir.name]) for class_dir in class_dirs]
    else:
        indices = _class_indices(root, class_dirs, class_names)

    samples: list[tuple[Path, int]] = []
    for class_dir, index in zip(class_dirs, indices):
        image_paths = sorted(
            (path for path in class_dir.iterdir() if _is_image_file(path)),
            key=lambda path: path.name,
        )
        if not image_paths:
            raise DataError(
                f"class folder {class_dir} has no images; add images with one of the "
                f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))} or remove the folder"
            )
        samples.extend((path, index) for path in image_paths)

    logger.info("found %d images in %d class folders under %s", len(samples), len(class_dirs), root)
    return samples


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_indices(
    root: Path, class_dirs: list[Path], class_names: Sequence[str] | None
) -> list[int]:
    """Map the sorted class folders to class indices."""
    if class_names is None:
        return list(range(len(class_dirs)))

    if len(class_dirs) > len(class_names):
        raise DataError(
            f"image folder {root} has {len(class_dirs)} class folders but "
            f"{len(class_names)} class names were given; remove the extra folders or use "
            "a model trained on these classes"
        )
    if len(class_dirs) < len(class_names):
        raise DataError(
            f"image folder {root} has {len(class_dirs)} class folders but "
            f"{len(class_names)} class names were given; folders are mapped to classes by "
            "sorted order, so add a non-empty folder for every class"
        )

    names_to_index: dict[str, int] = {}
    for index, name in enumerate(class_names):
        folder_name = class_folder_name(index, name, len(class_names))
        for accepted in (name, _safe_file_name(name), folder_name):
            names_to_index.setdefault(accepted, index)
    by_name = [names_to_index.get(class_dir.name) for class_dir in class_dirs]
    if all(index is not None for index in by_name) and len(set(by_name)) == len(by_name):
        return [int(index) for index in by_name]
    return list(range(len(class_dirs)))


def load_image(
    path: str | os.PathLike[str],
    size: tuple[int, int],
    channels: int,
    resize: int | Sequence[int] | None = None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Read an image file into a uint8 array [channels, height, width].

    `size` is (height, width) of the result and `channels` is 1 (grey-scale) or 3 (RGB).
    Without `resize`, the image is not resized and a file of another size raises
    DataError. With `resize`, the image is converted to `channels` first and then goes
    through `resize_and_center_crop`, as timm's evaluation transform does. Raises
    ImageReadError (a DataError) when the file cannot be decoded or converted.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        with Image.open(path) as image:
            if resize is None:
                _check_image_size(path, image, size)
            array = _convert_image(image, channels)
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        # Pillow raises UnidentifiedImageError (an OSError) for files it cannot identify,
        # OSError for truncated data and ValueError for modes it cannot convert.
        raise ImageReadError(
            f"failed to read image {path}: {error}; replace or remove the file"
        ) from error

    if resize is not None:
        array = resize_and_center_crop(array, size, resize, interpolation)
    if channels == 1:
        return array[np.newaxis]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _check_image_size(path: Path, image: Image.Image, size: tuple[int, int]) -> None:
    height, width = size
    if image.size != (width, height):
        raise DataError(
            f"image {path} is {image.width}x{image.height} (width x height) but "
            f"{width}x{height} is expected; resize the images to {width}x{height} "
            f"or use a model built for {image.width}x{image.height} input"
        )


def check_interpolation(name: str) -> Image.Resampling:
    """Return the Pillow filter for a timm interpolation name; raise DataError if unknown."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise DataError(
            f"unknown interpolation {name!r}; use one of {', '.join(sorted(INTERPOLATIONS))}"
        ) from None


def resize_and_center_crop(
    array: np.ndarray, size: tuple[int, int], resize: int | Sequence[int], interpolation: str
) -> np.ndarray:
    """Resize a uint8 [H, W] or [H, W, 3] image and center-crop it to `size` (height, width).

    Follows torchvision's Resize and CenterCrop on Pillow images, which timm's evaluation
    transform uses: an int `resize` scales the shorter side to `resize` and the longer
    side to int(resize * longer / shorter). A [height, width] `resize` scales by the
    smaller of the two side ratios, aspect ratio kept, with rounded sides (timm's
    ResizeKeepRatio). The crop offset is round((side - crop) / 2); an image smaller than
    the crop is padded with zeros first, as torchvision does.
    """
    resample = check_interpolation(interpolation)
    height, width = array.shape[:2]
    if isinstance(resize, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = resize, int(resize * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        target_height, target_width = resize
        ratio = min(height / target_height, width / target_width)
        new_height, new_width = round(height / ratio), round(width / ratio)
    if (new_width, new_height) != (width, height):
        resized = Image.fromarray(array).resize((new_width, new_height), resample)
        array = np.asarray(resized, dtype=np.uint8)
    return _center_crop(array, size)


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    crop_height, crop_width = size
    height, width = array.shape[:2]
    if crop_height > height or crop_width > width:
        pad_top = (crop_height - height) // 2 if crop_height > height else 0
        pad_bottom = (crop_height - height + 1) // 2 if crop_height > height else 0
        pad_left = (crop_width - width) // 2 if crop_width > width else 0
        pad_right = (crop_width - width + 1) // 2 if crop_width > width else 0
        padding = [(pad_top, pad_bottom), (pad_left, pad_right)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, padding)
        height, width = array.shape[:2]
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return np.ascontiguousarray(array[top : top + crop_height, left : left + crop_width])


def _convert_image(image: Image.Image, channels: int) -> np.ndarray:
    """Convert an open Pillow image to uint8 [H, W] (channels=1) or [H, W, 3] (channels=3).

    Conversions, all by Pillow's `convert` except the 16-bit one:
    - 16-bit grey-scale (modes I;16*, and I as 16-bit PNGs opened by older Pillow) is
      scaled to 8 bits by value * 255 / 65535, rounded, after clipping to 0..65535.
    - Palette images become RGB through their palette, by way of RGBA when the palette
      has transparency.
    - Alpha (RGBA, LA, PA) is dropped, as torchvision's default loader does: the stored
      colour of transparent pixels is kept and nothing is blended with a background.
    - CMYK becomes RGB by Pillow's formula without colour profiles (R = 255 - C - K,
      clipped, and likewise for G and B), so colours differ from a colour-managed viewer.
    - RGB becomes grey-scale by ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000,
      and grey-scale becomes RGB by repeating the value in all three channels.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        if channels == 1:
            return grey
        return np.repeat(grey[:, :, np.newaxis], 3, axis=2)

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    target_mode = "L" if channels == 1 else "RGB"
    if image.mode != target_mode:
        image = image.convert(target_mode)
    return np.asarray(image, dtype=np.uint8)


def iter_image_batches(
    samples: Sequence[tuple[Path, int]],
    size: tuple[int, int],
    channels: int,
    batch_size: int,
    progress: bool = True,
    desc: str = "images",
    resize: int | Sequence[int] | None = None,
    interpolation: str = "bilinear",
    skipped: list[SkippedImage] | None = None,
    workers: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
    """Load `samples` in order and yield (uint8 images [B, C, H, W], int64 labels [B], paths).

    The last batch contains the remainder and may be smaller than `batch_size`. `size` is
    (height, width); `resize` and `interpolation` are passed to load_image. With a
    `skipped` list, an image that raises ImageReadError is appended to it and left out of
    its batch, so a batch may be smaller, and an empty one is not yielded. Without a
    `skipped` list, the error is raised. Other DataErrors, such as a wrong image size,
    are always raised.
    `workers` threads decode the images of a batch (Pillow releases the GIL while
    decoding and resizing); the result does not depend on it. With `progress`, a tqdm bar
    shows images per second and the ETA.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if resize is not None:
        check_interpolation(interpolation)

    def load(path: Path) -> np.ndarray | SkippedImage:
        try:
            return load_image(path, size, channels, resize, interpolation)
        except ImageReadError as error:
            if skipped is None:
                raise
            return SkippedImage(str(path), str(error.__cause__ or error))

    executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(samples), batch_size):
                batch = samples[start : start + batch_size]
                paths = [Path(path) for path, _ in batch]
                loaded = list(executor.map(load, paths)) if executor else [load(path) for path in paths]
                bar.update(len(batch))
                readable = [i for i, item in enumerate(loaded) if not isinstance(item, SkippedImage)]
                for item in loaded:
                    if isinstance(item, SkippedImage):
                        logger.warning("skipped %s: %s", item.path, item.reason)
                        skipped.append(item)
                if not readable:
                    continue
                images = np.stack([loaded[i] for i in readable])
                labels = np.array([batch[i][1] for i in readable], dtype=np.int64)
                yield images, labels, [paths[i] for i in readable]
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


# Colour photographs that scikit-image ships (no download), used by the full-size model
# tests and benchmarks as real 224x224 inputs.
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def load_sample_photos(size: int = 224, names: Sequence[str] = SAMPLE_PHOTOS):
    """Load scikit-image's bundled photographs as uint8 pixels [len(names), 3, size, size].

    Each photo is converted to RGB and resized to size x size with bicubic interpolation.
    scikit-image is a development dependency (the `dev` extra).
    """
    import skimage.data
    import torch

    images = []
    for name in names:
        picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        resized = picture.resize((size, size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    return torch.stack(images).contiguous()
