"""Tests for vggen.data: CIFAR-10 files in both official formats (written tiny,
byte for byte as the originals), download from a local HTTP server, the
offline digits set, augmentation and batching."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from vggen.data import datasets
from vggen.data.augment import augment, batches
from vggen.data.datasets import (
    BIN_DIR,
    PY_DIR,
    Dataset,
    default_data_dir,
    fetch_cifar10,
    load_cifar10,
    load_dataset,
    load_digits32,
)
from vggen.errors import VggenError

RECORDS = 7  # per batch file; the loader must not assume 10000
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
ALL_FILES = TRAIN_FILES + ["test_batch"]


@pytest.fixture(autouse=True)
def small_batches_on_purpose(monkeypatch):
    """The files written here hold RECORDS images, not the official 10,000."""
    monkeypatch.setenv("VGGEN_CIFAR_SUBSET", "1")


def make_cifar(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random uint8 images (n, 3, 32, 32) and labels for every batch file."""
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.integers(0, 256, size=(RECORDS, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, size=RECORDS, dtype=np.uint8),
        )
        for name in ALL_FILES
    }


def write_bin(root: Path, batches_: dict) -> Path:
    """Binary format: per record, 1 label byte then 3072 channel-major pixels."""
    d = root / BIN_DIR
    d.mkdir(parents=True)
    for name, (images, labels) in batches_.items():
        records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
        (d / f"{name}.bin").write_bytes(records.tobytes())
    return d


def write_py(root: Path, batches_: dict) -> Path:
    """Python format: pickled dict with bytes keys, as in the official archive."""
    d = root / PY_DIR
    d.mkdir(parents=True)
    for name, (images, labels) in batches_.items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in labels],
            b"data": images.reshape(len(images), -1),
            b"filenames": [f"img{i}.png".encode() for i in range(len(images))],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def expected_normalised(raw: dict) -> tuple[np.ndarray, np.ndarray]:
    """Reference normalisation computed independently, in float64."""
    train = np.concatenate([raw[n][0] for n in TRAIN_FILES]) / 255.0
    test = raw["test_batch"][0] / 255.0
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    return (train - mean) / std, (test - mean) / std


# --------------------------------------------------------------------------
# CIFAR-10 loading
# --------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_bin, write_py], ids=["bin", "py"])
@pytest.mark.parametrize("point_at", ["parent", "batch_dir"])
def test_load_cifar10_both_formats(tmp_path, writer, point_at):
    raw = make_cifar()
    batch_dir = writer(tmp_path, raw)
    train, test = load_cifar10(tmp_path if point_at == "parent" else batch_dir)

    assert len(train) == 5 * RECORDS and len(test) == RECORDS
    for ds in (train, test):
        assert ds.images.dtype == np.float32 and ds.images.flags.c_contiguous
        assert ds.images.shape == (len(ds), 3, 32, 32)
        assert ds.labels.dtype == np.int32 and ds.labels.shape == (len(ds),)
        assert ds.classes == 10
    np.testing.assert_array_equal(train.labels, np.concatenate([raw[n][1] for n in TRAIN_FILES]))
    np.testing.assert_array_equal(test.labels, raw["test_batch"][1])

    want_train, want_test = expected_normalised(raw)
    np.testing.assert_allclose(train.images, want_train, atol=1e-5)
    np.testing.assert_allclose(test.images, want_test, atol=1e-5)
    np.testing.assert_allclose(train.images.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(train.images.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_binary_and_python_formats_agree(tmp_path):
    raw = make_cifar(seed=3)
    a_train, a_test = load_cifar10(write_bin(tmp_path / "a", raw))
    b_train, b_test = load_cifar10(write_py(tmp_path / "b", raw))
    np.testing.assert_array_equal(a_train.images, b_train.images)
    np.testing.assert_array_equal(a_test.labels, b_test.labels)


def test_binary_layout_is_channel_major(tmp_path):
    # Channel c of every image holds value 10 * (c + 1); after normalisation
    # each channel must be constant, which fails if channels were interleaved.
    raw = make_cifar()
    for images, _ in raw.values():
        images[:] = (10 * np.arange(1, 4, dtype=np.uint8))[:, None, None]
    raw["data_batch_1"][0][0, :, 0, 0] = 0  # avoid a zero standard deviation
    train, _ = load_cifar10(write_bin(tmp_path, raw))
    for c in range(3):
        assert np.unique(train.images[1:, c]).size == 1


@pytest.mark.parametrize("writer", [write_bin, write_py], ids=["bin", "py"])
def test_missing_file(tmp_path, writer):
    d = writer(tmp_path, make_cifar())
    victim = next(d.glob("data_batch_3*"))
    victim.unlink()
    with pytest.raises(VggenError, match="data_batch_3.*missing"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("writer", [write_bin, write_py], ids=["bin", "py"])
def test_empty_file(tmp_path, writer):
    d = writer(tmp_path, make_cifar())
    victim = next(d.glob("test_batch*"))
    victim.write_bytes(b"")
    with pytest.raises(VggenError, match="test_batch.*empty"):
        load_cifar10(tmp_path)


def test_truncated_binary_file(tmp_path):
    d = write_bin(tmp_path, make_cifar())
    path = d / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VggenError, match=r"data_batch_2\.bin.*not a whole number of 3073-byte records"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("writer", [write_bin, write_py], ids=["bin", "py"])
@pytest.mark.parametrize("value", [None, "0", "no"])
def test_batch_of_fewer_than_10000_images_needs_the_subset_variable(tmp_path, monkeypatch, writer,
                                                                    value):
    if value is None:
        monkeypatch.delenv("VGGEN_CIFAR_SUBSET")
    else:
        monkeypatch.setenv("VGGEN_CIFAR_SUBSET", value)
    writer(tmp_path, make_cifar())
    with pytest.raises(VggenError, match=r"data_batch_1(\.bin)?: 7 records.* has 10000.*"
                                         r"set VGGEN_CIFAR_SUBSET=1"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("writer", [write_bin, write_py], ids=["bin", "py"])
def test_official_count_needs_no_variable(tmp_path, monkeypatch, writer):
    # Ten thousand real records would cost 600 MB of float32 images: lower the bar instead.
    monkeypatch.delenv("VGGEN_CIFAR_SUBSET")
    monkeypatch.setattr(datasets, "BATCH_RECORDS", RECORDS)
    train, test = load_cifar10(writer(tmp_path, make_cifar()))
    assert len(train) == 5 * RECORDS and len(test) == RECORDS


@pytest.mark.parametrize("writer", [write_bin, write_py], ids=["bin", "py"])
def test_bad_label(tmp_path, writer):
    raw = make_cifar()
    raw["data_batch_4"][1][5] = 12
    writer(tmp_path, raw)
    with pytest.raises(VggenError, match="data_batch_4.*record 5 has label 12"):
        load_cifar10(tmp_path)


def test_corrupt_pickle(tmp_path):
    d = write_py(tmp_path, make_cifar())
    (d / "data_batch_1").write_bytes(b"this is not a pickle")
    with pytest.raises(VggenError, match="data_batch_1.*cannot unpickle"):
        load_cifar10(tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    # A pickle can call any importable function when loaded; only NumPy
    # array reconstruction is allowed.
    d = write_py(tmp_path, make_cifar())
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": print}, f)
    with pytest.raises(VggenError, match="data_batch_1.*refusing to load builtins.print"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((7, 3072), np.uint8)}, "lacks key.*labels"),
        ({b"labels": [0] * 7}, "lacks key.*data"),
        ({b"data": np.zeros((7, 100), np.uint8), b"labels": [0] * 7}, r"shape \(7, 100\)"),
        ({b"data": np.zeros((7, 3072), np.float32), b"labels": [0] * 7}, "dtype float32"),
        ({b"data": np.zeros((7, 3072), np.uint8), b"labels": [0] * 6}, "must be 7 integers"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
    ids=["no-labels", "no-data", "shape", "dtype", "label-count", "not-dict"],
)
def test_malformed_pickle(tmp_path, batch, message):
    d = write_py(tmp_path, make_cifar())
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(VggenError, match="test_batch.*" + message):
        load_cifar10(tmp_path)


def test_cifar10_not_found_suggests_fetch(tmp_path):
    with pytest.raises(VggenError) as err:
        load_dataset("cifar10", str(tmp_path / "nowhere"), seed=0)
    assert str(tmp_path / "nowhere" / BIN_DIR) in str(err.value)
    assert "vggen data fetch cifar10" in str(err.value)


def test_load_dataset_cifar10_and_unknown(tmp_path):
    write_bin(tmp_path, make_cifar())
    train, test = load_dataset("cifar10", str(tmp_path), seed=0)
    assert len(train) == 5 * RECORDS and len(test) == RECORDS
    with pytest.raises(VggenError, match="unknown dataset 'mnist'.*digits.*cifar10"):
        load_dataset("mnist", None, seed=0)


# --------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VGGEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("VGGEN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    assert default_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("VGGEN_DATA")
    assert default_data_dir(None) == tmp_path / "xdg" / "vggen" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir(None) == tmp_path / "home" / ".cache" / "vggen" / "data"
    monkeypatch.setenv("VGGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert default_data_dir(None) == tmp_path / "cache" / "data"


# --------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serve a directory over HTTP on 127.0.0.1; yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    # Never route the local request through a proxy from the environment.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def make_archive(path: Path, members: dict[str, bytes]) -> str:
    """Write a .tar.gz with the given members; return its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def bin_members(raw: dict) -> dict[str, bytes]:
    staging = {}
    for name, (images, labels) in raw.items():
        records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
        staging[f"{BIN_DIR}/{name}.bin"] = records.tobytes()
    return staging


def test_fetch_and_load(http_root, tmp_path):
    served, base = http_root
    raw = make_cifar()
    md5 = make_archive(served / "cifar-10-binary.tar.gz", bin_members(raw))
    dest = tmp_path / "data"

    got = fetch_cifar10(dest, url=f"{base}/cifar-10-binary.tar.gz", md5=md5, progress=False)

    assert got == dest / BIN_DIR
    assert (dest / "cifar-10-binary.tar.gz").is_file()
    assert not list(dest.glob(".download-*"))
    train, test = load_cifar10(got)
    np.testing.assert_array_equal(test.labels, raw["test_batch"][1])
    assert len(train) == 5 * RECORDS


def test_fetch_wrong_md5_leaves_nothing(http_root, tmp_path):
    served, base = http_root
    actual = make_archive(served / "c.tar.gz", bin_members(make_cifar()))
    url = f"{base}/c.tar.gz"
    dest = tmp_path / "data"
    with pytest.raises(VggenError) as err:
        fetch_cifar10(dest, url=url, md5="0" * 32, progress=False)
    assert url in str(err.value) and "0" * 32 in str(err.value) and actual in str(err.value)
    assert list(dest.iterdir()) == []


def test_fetch_http_error(http_root, tmp_path):
    _, base = http_root
    url = f"{base}/missing.tar.gz"
    with pytest.raises(VggenError, match=f"cannot download {url}: HTTP 404"):
        fetch_cifar10(tmp_path / "data", url=url, md5="0" * 32, progress=False)
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("evil", ["../escaped.bin", "/tmp/vggen-absolute.bin"])
def test_fetch_rejects_unsafe_paths(http_root, tmp_path, evil):
    served, base = http_root
    md5 = make_archive(served / "evil.tar.gz", {f"{BIN_DIR}/ok.bin": b"x", evil: b"boom"})
    dest = tmp_path / "data"
    with pytest.raises(VggenError, match="unsafe path"):
        fetch_cifar10(dest, url=f"{base}/evil.tar.gz", md5=md5, progress=False)
    assert not (tmp_path / "escaped.bin").exists()
    assert not (dest / BIN_DIR).exists()  # checked before anything is extracted


# --------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------


def test_digits_shapes_and_split():
    train, test = load_digits32(seed=0)
    assert len(train) + len(test) == 1797
    for ds in (train, test):
        assert ds.images.shape == (len(ds), 3, 32, 32)
        assert ds.images.dtype == np.float32 and ds.images.flags.c_contiguous
        assert ds.labels.dtype == np.int32
        assert set(np.unique(ds.labels)) == set(range(10))
        # Grey digits: all three channels identical; x4 nearest-neighbour blocks.
        np.testing.assert_array_equal(ds.images[:, 0], ds.images[:, 2])
        blocks = ds.images[:, 0].reshape(len(ds), 8, 4, 8, 4)
        assert (blocks == blocks[:, :, :1, :, :1]).all()
    # Stratified: every class has about 20% of its samples in the test set.
    all_counts = np.bincount(np.concatenate([train.labels, test.labels]))
    np.testing.assert_allclose(np.bincount(test.labels) / all_counts, 0.2, atol=0.01)
    np.testing.assert_allclose(train.images.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(train.images.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_digits_split_is_deterministic():
    a_train, a_test = load_digits32(seed=1)
    b_train, b_test = load_digits32(seed=1)
    np.testing.assert_array_equal(a_test.images, b_test.images)
    np.testing.assert_array_equal(a_train.labels, b_train.labels)
    _, c_test = load_digits32(seed=2)
    assert not np.array_equal(a_test.images, c_test.images)


def test_load_dataset_digits():
    train, test = load_dataset("digits", None, seed=0)
    assert train.name == "digits-train" and len(test) > 0


# --------------------------------------------------------------------------
# Augmentation and batching
# --------------------------------------------------------------------------


def small_dataset(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    return Dataset(images, np.arange(n, dtype=np.int32) % 10, "small")


def test_augment_identity_without_pad_or_flip():
    images = small_dataset(5).images
    out = augment(images, np.random.default_rng(0), pad=0, flip=False)
    np.testing.assert_array_equal(out, images)
    assert out is not images and out.dtype == np.float32 and out.flags.c_contiguous


def test_augment_crops_and_flips():
    images = small_dataset(64).images
    before = images.copy()
    out = augment(images, np.random.default_rng(0), pad=4, flip=True)
    assert out.shape == images.shape and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(images, before)  # input untouched
    # Every output must be some shift (and optional mirror) of its input.
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    flipped = 0
    for i in range(len(images)):
        candidates = [
            (mirror, dy, dx)
            for mirror in (False, True)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(
                out[i],
                (padded[i, :, :, ::-1] if mirror else padded[i])[:, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert candidates, f"image {i} is not a crop of its padded input"
        flipped += candidates[0][0]
    assert 10 < flipped < 54  # about half are mirrored


def test_batches_cover_every_sample_once():
    ds = small_dataset(23)
    seen = []
    for images, labels in batches(ds, 5, np.random.default_rng(0), drop_last=False):
        assert len(images) == len(labels) <= 5
        for img, label in zip(images, labels):
            i = int(np.flatnonzero((ds.images == img).all(axis=(1, 2, 3)))[0])
            assert ds.labels[i] == label
            seen.append(i)
    assert sorted(seen) == list(range(23))
    assert seen != list(range(23))  # shuffled


def test_batches_unshuffled_and_drop_last():
    ds = small_dataset(23)
    got = list(batches(ds, 5, None, drop_last=True))
    assert [len(lab) for _, lab in got] == [5, 5, 5, 5]
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got]), ds.labels[:20])


@pytest.mark.parametrize(
    "n, size, drop_last, message",
    [
        (10, 0, False, "batch size must be positive, got 0"),
        (10, -3, True, "got -3"),
        (10, 11, True, "batch size 11 is larger than dataset small \\(10 samples\\)"),
        (0, 4, False, "dataset small is empty"),
    ],
)
def test_batches_errors(n, size, drop_last, message):
    with pytest.raises(VggenError, match=message):
        batches(small_dataset(n), size, None, drop_last)  # raises before iteration


def test_batch_larger_than_dataset_allowed_without_drop_last():
    (images, labels), = list(batches(small_dataset(3), 8, None, drop_last=False))
    assert len(images) == 3
