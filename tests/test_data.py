"""Tests of hnq.data: Fashion-MNIST idx files and image folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hnq import data
from hnq.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    DataError,
    iter_image_batches,
    load_fashion_mnist,
    load_image,
    scan_image_folder,
    write_image_folder,
)

requires_fashion_mnist = pytest.mark.skipif(
    not DEFAULT_FASHION_MNIST_DIR.is_dir(),
    reason=(
        f"Fashion-MNIST not found at {DEFAULT_FASHION_MNIST_DIR}; install it with "
        "`apt-get install dataset-fashion-mnist` (scripts/setup.sh does this as root)"
    ),
)


@pytest.fixture(scope="module")
def fashion_mnist() -> data.FashionMNIST:
    if not DEFAULT_FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {DEFAULT_FASHION_MNIST_DIR}")
    return load_fashion_mnist()


# ---------------------------------------------------------------------------
# Small idx files
# ---------------------------------------------------------------------------


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> Path:
    """Write an idx file (gzip-compressed when the name ends in .gz)."""
    content = magic.to_bytes(4, "big")
    content += b"".join(dim.to_bytes(4, "big") for dim in dims)
    content += payload
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


def write_small_set(
    folder: Path, train_count: int = 5, test_count: int = 3, suffix: str = ".gz"
) -> tuple[np.ndarray, np.ndarray]:
    """Write four valid idx files of random images and return the train images and labels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    train_images = None
    train_labels = None
    for split, count in (("train", train_count), ("t10k", test_count)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        images_path = folder / f"{split}-images-idx3-ubyte{suffix}"
        labels_path = folder / f"{split}-labels-idx1-ubyte{suffix}"
        write_idx(images_path, 2051, images.shape, images.tobytes())
        write_idx(labels_path, 2049, labels.shape, labels.tobytes())
        if split == "train":
            train_images, train_labels = images, labels
    return train_images, train_labels


@requires_fashion_mnist
def test_fashion_mnist_shapes(fashion_mnist):
    assert fashion_mnist.train_images.shape == (60000, 28, 28)
    assert fashion_mnist.train_labels.shape == (60000,)
    assert fashion_mnist.test_images.shape == (10000, 28, 28)
    assert fashion_mnist.test_labels.shape == (10000,)


@requires_fashion_mnist
def test_fashion_mnist_dtypes(fashion_mnist):
    assert fashion_mnist.train_images.dtype == np.uint8
    assert fashion_mnist.train_labels.dtype == np.int64
    assert fashion_mnist.test_images.dtype == np.uint8
    assert fashion_mnist.test_labels.dtype == np.int64


@requires_fashion_mnist
def test_fashion_mnist_balanced_classes(fashion_mnist):
    # The official splits hold 6,000 training and 1,000 test images of each class.
    assert np.bincount(fashion_mnist.train_labels).tolist() == [6000] * 10
    assert np.bincount(fashion_mnist.test_labels).tolist() == [1000] * 10


@requires_fashion_mnist
def test_fashion_mnist_class_names(fashion_mnist):
    assert fashion_mnist.class_names == FASHION_MNIST_CLASSES
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


@requires_fashion_mnist
def test_fashion_mnist_images_not_blank(fashion_mnist):
    assert fashion_mnist.train_images.max() == 255
    assert 0 < fashion_mnist.test_images.mean() < 255


def test_idx_gz_loads(tmp_path):
    images, labels = write_small_set(tmp_path, suffix=".gz")
    loaded = load_fashion_mnist(tmp_path)
    assert np.array_equal(loaded.train_images, images)
    assert np.array_equal(loaded.train_labels, labels.astype(np.int64))
    assert loaded.test_images.shape == (3, 28, 28)


def test_idx_uncompressed_loads(tmp_path):
    images, labels = write_small_set(tmp_path, suffix="")
    loaded = load_fashion_mnist(str(tmp_path))
    assert np.array_equal(loaded.train_images, images)
    assert np.array_equal(loaded.train_labels, labels.astype(np.int64))


def test_idx_arrays_writable(tmp_path):
    write_small_set(tmp_path)
    loaded = load_fashion_mnist(tmp_path)
    assert loaded.train_images.flags.writeable


def test_idx_folder_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        load_fashion_mnist(missing)
    assert str(missing) in str(error.value)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert "--data-dir" in str(error.value)


def test_idx_file_missing(tmp_path):
    write_small_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(error.value)
    assert "not found" in str(error.value)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)


def test_idx_truncated_payload(tmp_path):
    write_small_set(tmp_path, suffix="")
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(error.value)
    assert "truncated" in str(error.value)
    assert str(16 + 5 * 28 * 28) in str(error.value)


def test_idx_truncated_header(tmp_path):
    write_small_set(tmp_path, suffix="")
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(error.value)
    assert "header" in str(error.value)


def test_idx_truncated_gzip(tmp_path):
    write_small_set(tmp_path, suffix=".gz")
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(error.value)
    assert "truncated or corrupt" in str(error.value)


def test_idx_bad_magic(tmp_path):
    write_small_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, 2049, (5, 28, 28), bytes(5 * 28 * 28))
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(error.value)
    assert "magic number 2049" in str(error.value)
    assert "2051" in str(error.value)


def test_idx_count_mismatch(tmp_path):
    write_small_set(tmp_path, test_count=3)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels_path, 2049, (4,), bytes([1, 2, 3, 4]))
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert "3 images" in str(error.value)
    assert "4 labels" in str(error.value)
    assert str(labels_path) in str(error.value)


def test_idx_label_out_of_range(tmp_path):
    write_small_set(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, 2049, (5,), bytes([0, 1, 12, 3, 4]))
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(error.value)
    assert "label 12 at index 2" in str(error.value)
    assert "0..9" in str(error.value)


def test_idx_wrong_image_size(tmp_path):
    write_small_set(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, 2051, (3, 32, 32), bytes(3 * 32 * 32))
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(error.value)
    assert "32x32" in str(error.value)
    assert "28x28" in str(error.value)


# ---------------------------------------------------------------------------
# Writing and scanning image folders
# ---------------------------------------------------------------------------


@requires_fashion_mnist
def test_folder_round_trip(fashion_mnist, tmp_path):
    images = fashion_mnist.test_images[:300]
    labels = fashion_mnist.test_labels[:300]
    root = write_image_folder(
        images, labels, FASHION_MNIST_CLASSES, tmp_path / "fm", progress=False
    )
    samples = scan_image_folder(root, FASHION_MNIST_CLASSES)
    assert len(samples) == 300

    loaded = np.zeros((300, 1, 28, 28), dtype=np.uint8)
    loaded_labels = np.full(300, -1, dtype=np.int64)
    batches = iter_image_batches(samples, (28, 28), 1, batch_size=64, progress=False)
    for batch_images, batch_labels, paths in batches:
        indices = [int(path.stem) for path in paths]
        loaded[indices] = batch_images
        loaded_labels[indices] = batch_labels
    assert np.array_equal(loaded[:, 0], images)
    assert np.array_equal(loaded_labels, labels)


@requires_fashion_mnist
def test_folder_class_names(fashion_mnist, tmp_path):
    root = write_image_folder(
        fashion_mnist.test_images[:100],
        fashion_mnist.test_labels[:100],
        FASHION_MNIST_CLASSES,
        tmp_path / "fm",
        progress=False,
    )
    folders = sorted(path.name for path in root.iterdir())
    assert folders[0] == "0_T-shirt-top"
    assert folders[1] == "1_Trouser"
    assert folders[9] == "9_Ankle-boot"


def test_folder_name_padding():
    assert data.class_folder_name(3, "cat", 1000) == "003_cat"
    assert data.class_folder_name(0, "T-shirt/top", 10) == "0_T-shirt-top"
    assert data.class_folder_name(7, "a  b", 11) == "07_a-b"
    assert data.class_folder_name(1, "???", 2) == "1_class"


def test_folder_rgb_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 3, 8, 10), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    root = write_image_folder(images, labels, ["a", "b", "c"], tmp_path / "rgb", progress=False)
    samples = scan_image_folder(root, ["a", "b", "c"])
    batches = list(iter_image_batches(samples, (8, 10), 3, batch_size=4, progress=False))
    assert [len(batch[0]) for batch in batches] == [4, 2]
    for batch_images, batch_labels, paths in batches:
        for image, label, path in zip(batch_images, batch_labels, paths):
            assert np.array_equal(image, images[int(path.stem)])
            assert label == labels[int(path.stem)]


def test_folder_replaces_existing(tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "stale").mkdir(parents=True)
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    write_image_folder(images, [0, 1], ["x", "y"], out_dir, progress=False)
    assert sorted(path.name for path in out_dir.iterdir()) == ["0_x", "1_y"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_folder_interrupted_leaves_nothing(tmp_path, monkeypatch):
    original_fromarray = Image.fromarray
    calls = []

    def failing_fromarray(array):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_fromarray(array)

    monkeypatch.setattr(data.Image, "fromarray", failing_fromarray)
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    with pytest.raises(KeyboardInterrupt):
        write_image_folder(images, [0, 1, 0, 1, 0], ["x", "y"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_folder_interrupted_keeps_old(tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    old_images = np.zeros((2, 4, 4), dtype=np.uint8)
    write_image_folder(old_images, [0, 1], ["x", "y"], out_dir, progress=False)

    def failing_fromarray(array):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.Image, "fromarray", failing_fromarray)
    with pytest.raises(KeyboardInterrupt):
        new_images = np.ones((2, 4, 4), dtype=np.uint8)
        write_image_folder(new_images, [0, 1], ["x", "y"], out_dir, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert len(scan_image_folder(out_dir)) == 2


def test_write_rejects_bad_label(tmp_path):
    with pytest.raises(DataError) as error:
        write_image_folder(np.zeros((2, 4, 4), dtype=np.uint8), [0, 5], ["x", "y"], tmp_path / "o")
    assert "label 5" in str(error.value)
    assert "0..1" in str(error.value)


def test_write_rejects_float_images(tmp_path):
    with pytest.raises(DataError) as error:
        write_image_folder(np.zeros((2, 4, 4)), [0, 1], ["x", "y"], tmp_path / "o")
    assert "uint8" in str(error.value)


def test_write_rejects_bad_shape(tmp_path):
    with pytest.raises(DataError) as error:
        two_channels = np.zeros((2, 2, 4, 4), dtype=np.uint8)
        write_image_folder(two_channels, [0, 1], ["x", "y"], tmp_path / "o")
    assert "(2, 2, 4, 4)" in str(error.value)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_scan_root_missing(tmp_path):
    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)
    assert "not found" in str(error.value)


def test_scan_root_is_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(DataError) as error:
        scan_image_folder(path)
    assert "is not a folder" in str(error.value)


def test_scan_empty_root(tmp_path):
    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "no class sub-folders" in str(error.value)


def test_scan_class_without_images(tmp_path):
    save_png(tmp_path / "a" / "1.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path)
    assert str(tmp_path / "b") in str(error.value)
    assert "has no images" in str(error.value)


def test_scan_too_many_folders(tmp_path):
    for name in ("a", "b", "c"):
        save_png(tmp_path / name / "1.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path, ["a", "b"])
    assert "3 class folders" in str(error.value)
    assert "2 class names" in str(error.value)


def test_scan_too_few_folders(tmp_path):
    save_png(tmp_path / "a" / "1.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path, ["a", "b"])
    assert "1 class folders" in str(error.value)
    assert "2 class names" in str(error.value)


def test_scan_sorted_order(tmp_path):
    # Synset-style folder names match no class name, so sorted order gives the index.
    for name in ("n02", "n01"):
        save_png(tmp_path / name / "1.png", np.zeros((4, 4), dtype=np.uint8))
    samples = scan_image_folder(tmp_path, ["first", "second"])
    assert [(path.parent.name, label) for path, label in samples] == [("n01", 0), ("n02", 1)]


def test_scan_maps_safe_names(tmp_path):
    # Without index prefixes, sorted order ("Ankle-boot" < "T-shirt-top" < "Trouser")
    # differs from class order, so the folders must be mapped by name.
    classes = ["T-shirt/top", "Trouser", "Ankle boot"]
    for name in ("T-shirt-top", "Trouser", "Ankle-boot"):
        save_png(tmp_path / name / "1.png", np.zeros((4, 4), dtype=np.uint8))
    mapping = {path.parent.name: label for path, label in scan_image_folder(tmp_path, classes)}
    assert mapping == {"T-shirt-top": 0, "Trouser": 1, "Ankle-boot": 2}


def test_scan_extensions_any_case(tmp_path):
    save_png(tmp_path / "a" / "1.PNG", np.zeros((4, 4), dtype=np.uint8))
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a" / "2.JPG", "JPEG")
    save_png(tmp_path / "a" / "3.tif", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "a" / "labels.csv").write_text("x")
    (tmp_path / ".hidden").mkdir()
    names = [path.name for path, _ in scan_image_folder(tmp_path)]
    assert names == ["1.PNG", "2.JPG", "3.tif"]


# ---------------------------------------------------------------------------
# Loading single images
# ---------------------------------------------------------------------------


def test_load_wrong_size(tmp_path):
    path = save_png(tmp_path / "big.png", np.zeros((30, 32), dtype=np.uint8))
    with pytest.raises(DataError) as error:
        load_image(path, (28, 28), 1)
    assert str(path) in str(error.value)
    assert "32x30" in str(error.value)
    assert "28x28" in str(error.value)
    assert "resize" in str(error.value)


def test_load_corrupt_png(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as error:
        load_image(path, (28, 28), 1)
    assert str(path) in str(error.value)
    assert "failed to read image" in str(error.value)


def test_load_truncated_png(tmp_path):
    noise = np.random.default_rng(2).integers(0, 256, (28, 28), np.uint8)
    path = save_png(tmp_path / "cut.png", noise)
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(DataError) as error:
        load_image(path, (28, 28), 1)
    assert str(path) in str(error.value)


def test_load_grey_as_rgb(tmp_path):
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    path = save_png(tmp_path / "grey.png", grey)
    image = load_image(path, (4, 4), 3)
    assert image.shape == (3, 4, 4)
    for channel in range(3):
        assert np.array_equal(image[channel], grey)


def test_load_rgb_as_grey(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    path = save_png(tmp_path / "rgb.png", rgb)
    image = load_image(path, (2, 3), 1)
    assert image.shape == (1, 2, 3)
    # ITU-R 601-2 luma: (299 * 200 + 587 * 100 + 114 * 50) / 1000 = 124.4
    assert np.all(np.abs(image.astype(int) - 124) <= 1)


def test_load_rgb_channels_first(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = save_png(tmp_path / "rgb.png", rgb)
    image = load_image(path, (5, 7), 3)
    assert image.shape == (3, 5, 7)
    assert np.array_equal(image, rgb.transpose(2, 0, 1))


def test_load_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 10
    rgba[..., 1] = 20
    rgba[..., 2] = 30
    rgba[..., 3] = 0
    path = save_png(tmp_path / "rgba.png", rgba)
    image = load_image(path, (4, 4), 3)
    assert image.shape == (3, 4, 4)
    assert image[:, 0, 0].tolist() == [10, 20, 30]


def test_load_cmyk(tmp_path):
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(path)
    rgb = load_image(path, (4, 4), 3)
    grey = load_image(path, (4, 4), 1)
    assert rgb[:, 0, 0].tolist() == [255, 0, 255]
    assert grey.shape == (1, 4, 4)


def test_load_palette(tmp_path):
    path = tmp_path / "palette.png"
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 255, 128, 0] + [0] * 762)
    palette_image.info["transparency"] = 0
    palette_image.save(path, transparency=0)
    image = load_image(path, (4, 4), 3)
    assert image[:, 0, 0].tolist() == [255, 128, 0]


def test_load_sixteen_bit(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path, (1, 4), 1)
    assert image[0, 0].tolist() == [0, 1, 128, 255]


def test_load_bad_channels(tmp_path):
    path = save_png(tmp_path / "grey.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        load_image(path, (4, 4), 2)


def test_batches_bad_size(tmp_path):
    with pytest.raises(ValueError):
        list(iter_image_batches([], (4, 4), 1, batch_size=0))


def test_batches_empty(tmp_path):
    assert list(iter_image_batches([], (4, 4), 1, batch_size=8, progress=False)) == []


# ---------------------------------------------------------------------------
# Resize and center crop, skipping unreadable images
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, resize, interpolation",
    [
        (300, 451, 248, "bicubic"),  # landscape
        (451, 300, 248, "bilinear"),  # portrait
        (100, 120, 256, "bicubic"),  # upscaled
        (248, 248, 248, "bicubic"),  # already the resize size
    ],
)
def test_resize_crop_matches_torchvision(height, width, resize, interpolation):
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    rgb = np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mode = InterpolationMode(interpolation)
    expected = np.asarray(CenterCrop(224)(Resize(resize, interpolation=mode)(Image.fromarray(rgb))))
    ours = data.resize_and_center_crop(rgb, (224, 224), resize, interpolation)
    assert ours.shape == (224, 224, 3)
    assert np.array_equal(ours, expected)


def test_center_crop_pads_small_image():
    from torchvision.transforms import CenterCrop

    grey = np.random.default_rng(5).integers(1, 256, (5, 8), dtype=np.uint8)
    expected = np.asarray(CenterCrop((9, 6))(Image.fromarray(grey)))
    ours = data._center_crop(grey, (9, 6))
    assert np.array_equal(ours, expected)
    assert ours[0].sum() == 0  # a padded row


def test_resize_to_height_width_keeps_ratio():
    # [height, width] scales by the smaller side ratio: 400x600 to cover 200x250 -> 200x300.
    rgb = np.zeros((400, 600, 3), dtype=np.uint8)
    rgb[:, 300:] = 255
    out = data.resize_and_center_crop(rgb, (200, 250), [200, 250], "bilinear")
    assert out.shape == (200, 250, 3)
    assert out[:, 0].max() == 0
    assert out[:, -1].min() == 255


def test_resize_unknown_interpolation():
    with pytest.raises(DataError) as error:
        data.resize_and_center_crop(np.zeros((4, 4), dtype=np.uint8), (2, 2), 3, "cubic")
    assert "'cubic'" in str(error.value)
    assert "bicubic" in str(error.value)


def test_load_with_resize_any_size(tmp_path):
    path = save_png(tmp_path / "wide.png", np.full((30, 50), 77, dtype=np.uint8))
    image = load_image(path, (28, 28), 1, resize=32, interpolation="bicubic")
    assert image.shape == (1, 28, 28)
    assert np.all(image == 77)


def test_load_unreadable_is_image_read_error(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("not an image")
    with pytest.raises(data.ImageReadError) as error:
        load_image(path, (4, 4), 3)
    assert str(path) in str(error.value)


def test_batches_skip_unreadable(tmp_path):
    good = [save_png(tmp_path / f"{i}.png", np.full((4, 4), i, dtype=np.uint8)) for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    samples = [(good[0], 0), (bad, 1), (good[1], 2), (good[2], 3)]
    skipped: list[data.SkippedImage] = []
    batches = list(iter_image_batches(samples, (4, 4), 1, batch_size=2, progress=False, skipped=skipped))
    assert [labels.tolist() for _, labels, _ in batches] == [[0], [2, 3]]
    assert [paths for _, _, paths in batches][0] == [good[0]]
    assert [item.path for item in skipped] == [str(bad)]
    assert skipped[0].reason


def test_batches_skip_whole_batch(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    good = save_png(tmp_path / "good.png", np.zeros((4, 4), dtype=np.uint8))
    skipped: list[data.SkippedImage] = []
    batches = list(iter_image_batches([(bad, 0), (good, 1)], (4, 4), 1, 1, progress=False, skipped=skipped))
    assert len(batches) == 1
    assert batches[0][1].tolist() == [1]
    assert len(skipped) == 1


def test_batches_raise_without_skip_list(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    with pytest.raises(data.ImageReadError):
        list(iter_image_batches([(bad, 0)], (4, 4), 1, 1, progress=False))


def test_batches_wrong_size_not_skipped(tmp_path):
    # A size mismatch without resize is a setup error for the whole folder, so it raises.
    path = save_png(tmp_path / "big.png", np.zeros((8, 8), dtype=np.uint8))
    skipped: list[data.SkippedImage] = []
    with pytest.raises(DataError) as error:
        list(iter_image_batches([(path, 0)], (4, 4), 1, 1, progress=False, skipped=skipped))
    assert not isinstance(error.value, data.ImageReadError)
    assert skipped == []


def test_batches_workers_keep_order(tmp_path):
    samples = [
        (save_png(tmp_path / f"{i:02d}.png", np.full((6, 6), i, dtype=np.uint8)), i) for i in range(20)
    ]
    serial = list(iter_image_batches(samples, (6, 6), 1, 7, progress=False))
    threaded = list(iter_image_batches(samples, (6, 6), 1, 7, progress=False, workers=4))
    for (images_a, labels_a, _), (images_b, labels_b, _) in zip(serial, threaded):
        assert np.array_equal(images_a, images_b)
        assert np.array_equal(labels_a, labels_b)
    assert [int(images[0, 0, 0, 0]) for images, _, _ in threaded] == [0, 7, 14]


def test_scan_folder_indices(tmp_path):
    for name in ("n02", "n01"):
        save_png(tmp_path / name / "1.png", np.zeros((4, 4), dtype=np.uint8))
    samples = scan_image_folder(tmp_path, folder_indices={"n01": 7, "n02": 3})
    assert [(path.parent.name, label) for path, label in samples] == [("n01", 7), ("n02", 3)]


def test_scan_folder_indices_missing_folder(tmp_path):
    for name in ("n01", "extra"):
        save_png(tmp_path / name / "1.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path, folder_indices={"n01": 0})
    assert "extra" in str(error.value)


def test_written_image_folder_follows_umask(tmp_path):
    """The image folder is made in a 0700 temporary folder and renamed; the result must not stay 0700."""
    import os

    import numpy as np

    from hnq.data import write_image_folder

    images = np.zeros((2, 28, 28), dtype=np.uint8)
    previous = os.umask(0o022)
    try:
        write_image_folder(images, np.array([0, 1]), ["a", "b"], tmp_path / "out", progress=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
