"""Tests of sklearn_craft.datasets: the synthetic faces and the real-set loaders.

The loaders are tested on tiny folders written here in each set's real layout. Every fake image
has a known colour per file (and a position-coded gradient where crops matter), so that the
tests can check that images and label rows stay aligned and that crops land where they should.
"""

import pickle
import re
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeClassifierCV, RidgeCV
from sklearn.pipeline import make_pipeline

from sklearn_craft.datasets import (
    LazyImages,
    load_aflw2000,
    load_celeba,
    load_fer2013,
    load_pointing04,
    load_utkface,
    make_faces,
)
from sklearn_craft.datasets import _images
from sklearn_craft.pooling import ActivationPooler

# --------------------------------------------------------------------------- synthetic faces


def test_make_faces_shapes_dtypes_and_label_ranges():
    images, labels = make_faces(n_samples=300, image_size=32, n_identities=7, max_yaw=45, random_state=0)
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert list(labels.columns) == ["identity", "male", "age", "yaw", "roll", "smile", "glasses"]
    assert len(labels) == 300
    assert labels["identity"].dtype == np.int64 and set(labels["identity"]) <= set(range(7))
    assert all(labels[c].dtype == bool for c in ["male", "smile", "glasses"])
    assert labels["yaw"].abs().max() <= 45 and labels["roll"].abs().max() <= 10
    assert labels["age"].between(18, 90).all()
    # gender is a trait of the identity
    assert (labels.groupby("identity")["male"].nunique() == 1).all()
    # several pixel values are used: the images are not blank
    assert images.std() > 20


def test_make_faces_non_square():
    images, _ = make_faces(n_samples=4, image_size=(40, 24), random_state=0)
    assert images.shape == (4, 40, 24, 3)


def test_make_faces_deterministic():
    a_images, a_labels = make_faces(n_samples=300, random_state=3)
    b_images, b_labels = make_faces(n_samples=300, random_state=3)
    c_images, _ = make_faces(n_samples=300, random_state=4)
    np.testing.assert_array_equal(a_images, b_images)
    pd.testing.assert_frame_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


@pytest.fixture(scope="module")
def faces():
    return make_faces(n_samples=1500, image_size=32, n_identities=10, random_state=0)


def _features(images, kind):
    """Raw pixels, or vertical edge strength (a fixed first layer: absolute row differences)."""
    x = images.astype(np.float32) / 255.0
    if kind == "edges":
        x = np.abs(np.diff(x, axis=1)).sum(axis=-1)
    return x.reshape(len(x), -1)


@pytest.fixture(scope="module")
def projected(faces):
    """Each feature kind reduced by a PCA fitted on the 1000 training images: (train, test)."""
    images, _ = faces
    out = {}
    for kind in ("pixels", "edges"):
        x = _features(images, kind)
        pca = PCA(60, random_state=0).fit(x[:1000])
        out[kind] = pca.transform(x[:1000]), pca.transform(x[1000:])
    return out


# Identity traits show in raw pixels; smile, glasses and yaw are small geometric changes that a
# linear model sees through one fixed edge layer (what a CNN's first convolution provides).
@pytest.mark.parametrize(
    "task, kind, margin",
    [("identity", "pixels", 0.5), ("male", "pixels", 0.1), ("smile", "edges", 0.15), ("glasses", "edges", 0.05)],
)
def test_make_faces_categorical_tasks_learnable(faces, projected, task, kind, margin):
    _, labels = faces
    (x_train, x_test), y = projected[kind], labels[task].to_numpy()
    accuracy = RidgeClassifierCV(alphas=np.logspace(-2, 3, 11)).fit(x_train, y[:1000]).score(x_test, y[1000:])
    chance = pd.Series(y[1000:]).value_counts(normalize=True).max()
    assert accuracy > chance + margin


@pytest.mark.parametrize("task, kind", [("yaw", "edges"), ("age", "pixels")])
def test_make_faces_continuous_tasks_learnable(faces, projected, task, kind):
    _, labels = faces
    (x_train, x_test), y = projected[kind], labels[task].to_numpy()
    assert RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(x_train, y[:1000]).score(x_test, y[1000:]) > 0.5


def test_make_faces_yaw_sign_follows_mirroring(faces):
    # Yaw is rendered symmetrically: a model of yaw sees a mirrored face turned the other way.
    images, labels = faces
    model = make_pipeline(PCA(60, random_state=0), RidgeCV(alphas=np.logspace(-2, 3, 11)))
    model.fit(_features(images[:1000], "edges"), labels["yaw"][:1000])
    predicted = model.predict(_features(images[1000:, :, ::-1], "edges"))
    assert np.corrcoef(predicted, -labels["yaw"][1000:])[0, 1] > 0.6


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"n_samples": 0}, ValueError),
        ({"image_size": 8}, ValueError),
        ({"image_size": (32, 8)}, ValueError),
        ({"n_identities": 0}, ValueError),
        ({"max_yaw": 100}, ValueError),
        ({"noise": -1}, ValueError),
        ({"n_identities": "ten"}, TypeError),
    ],
)
def test_make_faces_bad_arguments(kwargs, error):
    with pytest.raises(error):
        make_faces(**{"n_samples": 4, **kwargs})


# --------------------------------------------------------------------------- fake data sets
# Each builder writes a tiny set in the real layout and returns (root, colour of each file name).
# Image content: red = the file's own code (alignment check), green / blue = x / y position.


def _coded_image(height, width, code):
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = code
    image[..., 1] = np.clip(x, 0, 255)
    image[..., 2] = np.clip(y, 0, 255)
    return image


def _save(path, array, quality=95):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=quality)


def _make_celeba(root, n=6):
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    codes = {name: 30 * (i + 1) for i, name in enumerate(names)}
    for name in names:
        _save(root / "img_align_celeba" / name, _coded_image(218, 178, codes[name]))
    rng = np.random.RandomState(0)
    values = rng.choice([-1, 1], size=(n, 3))
    lines = [str(n), "Eyeglasses Male Smiling "]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    # the identity file lists more images than the attribute file, as the full CelebA one does
    identity = [f"{name} {100 + i}" for i, name in enumerate(names)] + ["999999.jpg 7"]
    (root / "identity_CelebA.txt").write_text("\n".join(identity) + "\n")
    return root, codes, pd.DataFrame(values == 1, index=names, columns=["Eyeglasses", "Male", "Smiling"])


def _make_utkface(root, n=6):
    codes = {}
    for i in range(n):
        name = f"{20 + i}_{i % 2}_{i % 5}_2017010{i}123456789.jpg.chip.jpg"
        codes[name] = 30 * (i + 1)
        _save(root / "crop_part1" / name, _coded_image(200, 200, codes[name]))
    return root, codes


def _make_aflw2000(root, n=6):
    codes = {}
    for i in range(n):
        name = f"image{i + 2:05d}.jpg"
        codes[name] = 30 * (i + 1)
        _save(root / "AFLW2000" / name, _coded_image(450, 450, codes[name]))
        pose = np.radians([[10.0 * i, -20.0 + 5 * i, 3.0, 0, 0, 0, 0]]).astype(np.float32)
        # landmarks spanning x 100..200, y 120..220, with one hidden point stored as (-1, 452)
        x = np.linspace(100, 200, 21)
        y = np.linspace(120, 220, 21)
        x[16], y[16] = -1, 452
        scipy.io.savemat(root / "AFLW2000" / f"image{i + 2:05d}.mat", {"Pose_Para": pose, "pt2d": np.stack([x, y])})
    return root, codes


def _make_pointing04(root, n=6):
    codes, rows = {}, []
    for i in range(n):
        tilt, pan = (-15, 0, 15)[i % 3], -90 + 15 * i
        name = f"person01{1}{27 + i:02d}{tilt:+d}{pan:+d}.jpg"
        codes[name] = 30 * (i + 1)
        _save(root / "Person01" / name, _coded_image(288, 384, codes[name]))
        rows.append([f"Person01/{name}", 1, 1, 27 + i, tilt, pan, 150, 140, 80, 100])
    columns = ["image", "person", "series", "index", "tilt_deg", "pan_deg", "face_cx", "face_cy", "face_w", "face_h"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "labels.csv", index=False)
    return root, codes


def _make_fer2013(root, n=6):
    codes = {}
    emotions = ["happy", "angry", "neutral"]
    for split in ("train", "test"):
        for i in range(n):
            name = f"{'Training' if split == 'train' else 'PrivateTest'}_{1000 + i}.jpg"
            code = 30 * (i + 1)
            _save(root / split / emotions[i % 3] / name, np.full((48, 48), code, dtype=np.uint8))
            if split == "train":
                codes[name] = code
    return root, codes


LOADERS = {
    "celeba": (load_celeba, lambda root: _make_celeba(root)[:2], "img_align_celeba"),
    "utkface": (load_utkface, _make_utkface, "crop_part1"),
    "aflw2000": (load_aflw2000, _make_aflw2000, "AFLW2000"),
    "pointing04": (load_pointing04, _make_pointing04, "Person01"),
    "fer2013": (load_fer2013, _make_fer2013, "train/*"),
}


def _red(images):
    """The code written in each image: its centre pixel's first channel (or gray level)."""
    h, w = images.shape[1:3]
    return images[:, h // 2, w // 2, 0].astype(int)


# --------------------------------------------------------------------------- all loaders


@pytest.mark.parametrize("name", LOADERS)
def test_loader_subset_is_deterministic_and_aligned(tmp_path, name):
    load, make, _ = LOADERS[name]
    root, codes = make(tmp_path / name)
    images, labels = load(root, n=4, random_state=0)
    again, labels_again = load(root, n=4, random_state=0)
    assert images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(labels) == 4
    np.testing.assert_array_equal(images, again)
    pd.testing.assert_frame_equal(labels, labels_again)
    assert labels.index.name == "file" and labels.index.is_unique
    # rows follow file order, and each image is the file its label row names (JPEG error: ±3)
    expected = np.array([codes[f] for f in labels.index])
    np.testing.assert_allclose(_red(images), expected, atol=3)
    all_images, all_labels = load(root)
    assert len(all_images) == len(codes) and set(all_labels.index) == set(codes)
    assert set(labels.index) <= set(all_labels.index)
    other = [tuple(load(root, n=4, random_state=seed)[1].index) for seed in range(6)]
    assert len(set(other)) > 1


@pytest.mark.parametrize("name", LOADERS)
def test_loader_size_preset_and_color(tmp_path, name):
    load, make, _ = LOADERS[name]
    root, codes = make(tmp_path / name)
    images, labels = load(root, size=(40, 30), color="rgb")
    assert images.shape == (len(codes), 40, 30, 3)
    gray_preset = types.SimpleNamespace(size=(24, 20), color="gray")
    images, _ = load(root, preset=gray_preset)
    assert images.shape == (len(codes), 24, 20, 1)
    # an explicit size wins over the preset's
    images, _ = load(root, size=(16, 16), preset=gray_preset)
    assert images.shape == (len(codes), 16, 16, 1)
    with pytest.raises(TypeError, match="preset must have"):
        load(root, preset=object())
    with pytest.raises(ValueError, match="size must be"):
        load(root, size=(0, 10))


@pytest.mark.parametrize("name", LOADERS)
def test_loader_errors_name_the_path(tmp_path, name):
    load, make, image_folder = LOADERS[name]
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match="empty"):
        load(empty)
    root, codes = make(tmp_path / name)
    with pytest.raises(ValueError, match="n must be at most"):
        load(root, n=len(codes) + 1)
    corrupt = sorted(root.glob(f"{image_folder}/*.jpg"))[0]
    corrupt.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=re.escape(corrupt.name)):
        load(root)


@pytest.mark.parametrize("name", LOADERS)
def test_loader_cache_is_a_memory_mapped_npy_rebuilt_when_a_file_changes(tmp_path, name, monkeypatch):
    load, make, image_folder = LOADERS[name]
    root, codes = make(tmp_path / name)
    cache = tmp_path / "cache"
    expected, expected_labels = load(root, n=3, random_state=1, size=(32, 32))
    images, labels = load(root, n=3, random_state=1, size=(32, 32), cache=cache)
    files = list(cache.glob(f"{name}-*.npy"))
    assert [path.name for path in cache.iterdir()] == [files[0].name]  # no temporary file left
    assert isinstance(images, np.memmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, expected)
    pd.testing.assert_frame_equal(labels, expected_labels)
    # A hit maps the file without decoding anything.
    with monkeypatch.context() as patch:
        patch.setattr(_images, "_decode", lambda *args: pytest.fail("decoded on a cache hit"))
        cached, cached_labels = load(root, n=3, random_state=1, size=(32, 32), cache=cache)
    np.testing.assert_array_equal(cached, images)
    pd.testing.assert_frame_equal(cached_labels, labels)
    # Rewriting an image file (new size and time) makes another key: decoded afresh.
    for path in root.glob(f"{image_folder}/*.jpg"):
        with Image.open(path) as img:
            shape = np.asarray(img).shape
        _save(path, np.full(shape, 7, dtype=np.uint8), quality=80)
    fresh, _ = load(root, n=3, random_state=1, size=(32, 32), cache=cache)
    assert np.abs(_red(fresh) - 7).max() <= 3
    assert len(list(cache.glob(f"{name}-*.npy"))) == 2
    # ... and so do other options.
    load(root, n=3, random_state=1, size=(24, 24), cache=cache)
    assert len(list(cache.glob(f"{name}-*.npy"))) == 3


@pytest.mark.parametrize(
    "stored",
    [
        np.zeros((3, 32, 32, 3), dtype=np.float32),  # another dtype
        np.zeros((2, 32, 32, 3), dtype=np.uint8),  # another number of images
        np.zeros((3, 24, 24, 3), dtype=np.uint8),  # another size
        np.zeros((3, 32, 32, 1), dtype=np.uint8),  # another colour
        "truncated",
    ],
)
def test_loader_cache_rebuilds_a_mismatched_file(tmp_path, stored):
    root, _ = _make_utkface(tmp_path / "utkface")
    cache = tmp_path / "cache"
    expected, _ = load_utkface(root, n=3, random_state=1, size=(32, 32), cache=cache)
    expected = np.array(expected)
    (path,) = cache.glob("utkface-*.npy")
    if isinstance(stored, str):
        path.write_bytes(path.read_bytes()[:1000])
    else:
        np.save(path, stored)
    images, _ = load_utkface(root, n=3, random_state=1, size=(32, 32), cache=cache)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), expected)  # repaired


@pytest.mark.parametrize("name", LOADERS)
def test_loader_lazy_dataset_decodes_the_eager_images(tmp_path, name):
    load, make, _ = LOADERS[name]
    root, _ = make(tmp_path / name)
    gray = types.SimpleNamespace(size=(24, 20), color="gray")
    for options in ({"n": 4, "random_state": 0}, {"preset": gray}):
        expected, expected_labels = load(root, **options)
        dataset, labels = load(root, lazy=True, **options)
        assert isinstance(dataset, LazyImages) and isinstance(dataset, torch.utils.data.Dataset)
        pd.testing.assert_frame_equal(labels, expected_labels)
        np.testing.assert_array_equal(np.stack([dataset[i] for i in range(len(dataset))]), expected)
        # It holds file names and boxes, never pixels, and travels to DataLoader workers as such.
        assert not any(isinstance(value, np.ndarray) and value.dtype == np.uint8 for value in vars(dataset).values())
        copy = pickle.loads(pickle.dumps(dataset))
        np.testing.assert_array_equal(copy[len(copy) - 1], expected[-1])
    with pytest.raises(ValueError, match="cache must be None with lazy=True"):
        load(root, lazy=True, cache=tmp_path / "cache")


def test_lazy_dataset_through_dataloader_workers_and_estimators(tmp_path):
    root, _, _ = _make_celeba(tmp_path / "celeba")
    expected, _ = load_celeba(root, size=(16, 16))
    dataset, _ = load_celeba(root, size=(16, 16), lazy=True)
    # The default collate stacks the H×W×C items into N×H×W×C uint8 tensors, in worker processes.
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    np.testing.assert_array_equal(torch.cat(list(loader)).numpy(), expected)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    features = ActivationPooler(model).fit_transform(expected)
    np.testing.assert_array_equal(ActivationPooler(model).fit_transform(loader), features)
    np.testing.assert_array_equal(ActivationPooler(model, batch_size=4, num_workers=2).fit_transform(dataset), features)


@pytest.mark.parametrize("name", LOADERS)
def test_loader_n_jobs_decodes_the_sequential_images(tmp_path, name):
    load, make, image_folder = LOADERS[name]
    root, _ = make(tmp_path / name)
    expected, expected_labels = load(root)
    images, labels = load(root, n_jobs=2)
    np.testing.assert_array_equal(images, expected)
    pd.testing.assert_frame_equal(labels, expected_labels)
    cached, _ = load(root, n_jobs=2, cache=tmp_path / "cache")
    np.testing.assert_array_equal(cached, expected)
    corrupt = sorted(root.glob(f"{image_folder}/*.jpg"))[-1]
    corrupt.write_bytes(b"not a jpeg at all")
    for options in ({"n_jobs": 2}, {"n_jobs": 2, "cache": tmp_path / "cache"}):
        with pytest.raises(ValueError, match=re.escape(corrupt.name)):
            load(root, **options)
    assert not list((tmp_path / "cache").glob("*.tmp"))  # the failed write left nothing behind


def test_load_images_reports_different_sizes(tmp_path):
    _save(tmp_path / "a.jpg", _coded_image(20, 16, 10))
    _save(tmp_path / "b.jpg", _coded_image(20, 18, 10))
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for options in ({}, {"cache": tmp_path / "cache"}):
        with pytest.raises(ValueError, match=r"different sizes: \(20, 16, 3\) .*a.jpg.* \(20, 18, 3\) .*b.jpg"):
            _images.load_images(paths, **options)
    images = LazyImages(paths)
    assert images[0].shape == (20, 16, 3) and images[1].shape == (20, 18, 3)
    with pytest.raises(ValueError, match="size is required"):
        LazyImages(paths, boxes=[[0, 0, 4, 4], [0, 0, 4, 4]])
    with pytest.raises(ValueError, match="boxes must have shape"):
        LazyImages(paths, boxes=[[0, 0, 4, 4]], size=(4, 4))
    with pytest.raises(ValueError, match="color must be"):
        LazyImages(paths, color="cmyk")


@pytest.mark.parametrize("name", LOADERS)
def test_loader_bad_arguments(tmp_path, name):
    load, make, _ = LOADERS[name]
    root, _ = make(tmp_path / name)
    with pytest.raises(ValueError):
        load(root, n=0)
    with pytest.raises(ValueError):
        load(root, color="cmyk")
    with pytest.raises(TypeError):
        load(42)
    with pytest.raises(ValueError):
        load(root, lazy="yes")
    with pytest.raises(TypeError):
        load(root, n_jobs=1.5)


# --------------------------------------------------------------------------- set by set


def test_celeba_labels_and_face_crop(tmp_path):
    root, codes, attributes = _make_celeba(tmp_path / "celeba")
    images, labels = load_celeba(root, size=(112, 96))
    assert list(labels.columns) == ["Eyeglasses", "Male", "Smiling", "identity"]
    assert (labels.dtypes[:3] == bool).all() and labels["identity"].dtype == np.int64
    pd.testing.assert_frame_equal(labels[attributes.columns], attributes, check_names=False)
    np.testing.assert_array_equal(labels["identity"], 100 + np.arange(len(codes)))
    # 7:6 output: the documented box (35, 70, 143, 196); green / blue give x / y of the source pixel
    assert abs(images[:, :, 0, 1].mean() - 35.5) < 3 and abs(images[:, :, -1, 1].mean() - 142.5) < 3
    assert abs(images[:, 0, :, 2].mean() - 70.6) < 3 and abs(images[:, -1, :, 2].mean() - 195.4) < 3
    native, _ = load_celeba(root)
    assert native.shape[1:] == (126, 108, 3)
    full, _ = load_celeba(root, crop=False)
    assert full.shape[1:] == (218, 178, 3)


def test_celeba_label_file_errors(tmp_path):
    root, _, _ = _make_celeba(tmp_path / "celeba")
    text = (root / "list_attr_celeba.txt").read_text().replace(" 1", " 0", 1)
    (root / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(ValueError, match="1 or -1"):
        load_celeba(root)
    root, _, _ = _make_celeba(tmp_path / "celeba2")
    (root / "identity_CelebA.txt").write_text("000001.jpg 5\n")
    with pytest.raises(ValueError, match="no identity"):
        load_celeba(root)
    (root / "identity_CelebA.txt").unlink()
    with pytest.raises(FileNotFoundError, match="identity_CelebA.txt"):
        load_celeba(root)


def test_utkface_parses_names_and_skips_malformed(tmp_path):
    root, codes = _make_utkface(tmp_path / "utkface")
    # the two kinds of odd names of the real release: a field missing, an invalid code
    _save(root / "crop_part1" / "61_1_20170109142408075.jpg.chip.jpg", _coded_image(200, 200, 1))
    _save(root / "crop_part1" / "61_3_20170109150557335.jpg.chip.jpg", _coded_image(200, 200, 1))
    _save(root / "crop_part1" / "30_7_1_20170109150557335.jpg.chip.jpg", _coded_image(200, 200, 1))
    with pytest.warns(UserWarning, match="skipped 3 file"):
        images, labels = load_utkface(root)
    assert images.shape == (len(codes), 200, 200, 3)
    assert list(labels.columns) == ["age", "gender", "race"] and (labels.dtypes == np.int64).all()
    for name, row in labels.iterrows():
        assert [row.age, row.gender, row.race] == [int(v) for v in name.split("_")[:3]]


def test_aflw2000_pose_crop_and_max_angle(tmp_path):
    root, codes = _make_aflw2000(tmp_path / "aflw2000")
    images, labels = load_aflw2000(root, size=(64, 64))
    i = np.arange(len(codes))
    np.testing.assert_allclose(labels["pitch"], 10.0 * i, atol=1e-4)
    np.testing.assert_allclose(labels["yaw"], -20.0 + 5 * i, atol=1e-4)
    np.testing.assert_allclose(labels["roll"], 3.0, atol=1e-4)
    # visible landmarks span 100..200 and 120..220 (the hidden one is ignored): centre
    # (150, 170 - 10), height 1.4 * 100, so the crop covers x 80..220, y 90..230
    assert abs(images[:, :, 0, 1].mean() - 81) < 3 and abs(images[:, :, -1, 1].mean() - 219) < 3
    assert abs(images[:, 0, :, 2].mean() - 91) < 3 and abs(images[:, -1, :, 2].mean() - 229) < 3
    # root may also be the AFLW2000 folder itself
    direct, _ = load_aflw2000(root / "AFLW2000", size=(64, 64))
    np.testing.assert_array_equal(direct, images)
    kept_images, kept = load_aflw2000(root, max_angle=35, size=(32, 32))
    assert list(kept.index) == list(labels.index[labels.abs().max(axis=1) <= 35])
    assert len(kept_images) == len(kept) < len(labels)
    (root / "AFLW2000" / "image00003.mat").unlink()
    with pytest.raises(FileNotFoundError, match="image00003.mat"):
        load_aflw2000(root)


def test_pointing04_labels_and_box_crop(tmp_path):
    root, codes = _make_pointing04(tmp_path / "pointing04")
    images, labels = load_pointing04(root, size=(60, 60))
    assert list(labels.columns) == ["person", "series", "tilt", "pan"]
    for name, row in labels.iterrows():
        assert name.endswith(f"{row.tilt:+d}{row.pan:+d}.jpg")
    # box centre (150, 140), 80 x 100: the crop is 1.2 * 100 = 120 px wide and high
    assert abs(images[:, :, 0, 1].mean() - 91) < 3 and abs(images[:, :, -1, 1].mean() - 209) < 3
    assert abs(images[:, 0, :, 2].mean() - 81) < 3 and abs(images[:, -1, :, 2].mean() - 199) < 3
    (root / "labels.csv").unlink()
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        load_pointing04(root)


def test_fer2013_emotion_categories_and_splits(tmp_path):
    root, _ = _make_fer2013(tmp_path / "fer2013")
    images, labels = load_fer2013(root, split="test")
    assert images.shape == (6, 48, 48, 1)
    assert list(labels.emotion.cat.categories) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert all(name.startswith("PrivateTest_") for name in labels.index)
    assert labels.emotion.cat.codes.tolist() == [3, 0, 6, 3, 0, 6]
    rgb, _ = load_fer2013(root, color="rgb")
    assert rgb.shape == (6, 48, 48, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    with pytest.raises(ValueError):
        load_fer2013(root, split="validation")
    (root / "test" / "bored").mkdir()
    with pytest.raises(ValueError, match="bored"):
        load_fer2013(root, split="test")


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_celeba(shared_data):
    from sklearn_craft.models import preset

    root = shared_data / "celeba"
    images, labels = load_celeba(root, n=32, preset=preset("mobilefacenet"), random_state=0)
    assert images.shape == (32, 112, 96, 3)
    assert labels.shape == (32, 41) and (labels.dtypes.iloc[:40] == bool).all()
    assert labels["identity"].between(1, 10177).all()
    # a face crop is brighter in the middle than a black-padded or background-heavy frame would be
    assert images[:, 40:80, 30:66].mean() > 60
    with pytest.raises(ValueError, match="4559"):
        load_celeba(root, n=4560)


@pytest.mark.realdata
def test_real_utkface(shared_data):
    with pytest.warns(UserWarning, match="skipped 2 file"):
        images, labels = load_utkface(shared_data / "utkface", n=32, random_state=0)
    assert images.shape == (32, 200, 200, 3)
    assert labels["age"].between(1, 116).all() and set(labels["gender"]) <= {0, 1}
    assert set(labels["race"]) <= set(range(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="4998"):
            load_utkface(shared_data / "utkface", n=4999)


@pytest.mark.realdata
def test_real_aflw2000(shared_data):
    images, labels = load_aflw2000(shared_data / "aflw2000", n=32, size=(64, 64), random_state=0, max_angle=99)
    assert images.shape == (32, 64, 64, 3)
    assert labels.abs().max().max() <= 99 and labels["yaw"].std() > 10
    reference = pd.read_csv(shared_data / "aflw2000" / "pose_labels.csv", index_col="image")
    np.testing.assert_allclose(labels["yaw"], reference.loc[labels.index, "yaw_deg"], atol=1e-4)


@pytest.mark.realdata
def test_real_pointing04(shared_data):
    images, labels = load_pointing04(shared_data / "pointing04", n=32, size=(64, 64), random_state=0)
    assert images.shape == (32, 64, 64, 3)
    assert set(labels["tilt"]) <= {-15, 0, 15} and labels["person"].between(1, 15).all()
    assert (labels["pan"] % 15 == 0).all() and labels["pan"].abs().max() <= 90


@pytest.mark.realdata
def test_real_fer2013(shared_data):
    from sklearn_craft.models import preset

    p = preset("mini_xception")
    images, labels = load_fer2013(shared_data / "fer2013", split="test", preset=p)
    assert images.shape == (3589, 64, 64, 1)
    assert tuple(labels.emotion.cat.categories) == tuple(p.class_names)
    assert labels.emotion.value_counts()["happy"] == 879


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("celeba", {"size": (56, 48)}),
        ("utkface", {"size": (64, 64)}),
        ("aflw2000", {"size": (64, 64)}),
        ("pointing04", {"size": (64, 64)}),
        ("fer2013", {"split": "test"}),
    ],
)
def test_real_lazy_and_parallel_decoding_match_the_eager_images(shared_data, name, kwargs):
    load = LOADERS[name][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UTKFace's two misnamed files
        expected, labels = load(shared_data / name, n=24, random_state=0, **kwargs)
        dataset, lazy_labels = load(shared_data / name, n=24, random_state=0, lazy=True, **kwargs)
        parallel, _ = load(shared_data / name, n=24, random_state=0, n_jobs=2, **kwargs)
    pd.testing.assert_frame_equal(lazy_labels, labels)
    np.testing.assert_array_equal(np.stack([dataset[i] for i in range(len(dataset))]), expected)
    np.testing.assert_array_equal(parallel, expected)
