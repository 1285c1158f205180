"""Training data: CIFAR-10 (both official formats), a small offline digits set,
download, augmentation and mini-batching.

Everything is plain NumPy so the generated C/CUDA kernels can be fed directly:
images are float32 ``(N, 3, 32, 32)`` C-contiguous arrays, labels int32 ``(N,)``.
Problems with user-supplied files raise :class:`VggenError` naming the file and
what is wrong, because the CLI prints that message as its only output.

Each official CIFAR-10 batch holds exactly 10,000 images, so a batch with any
other count is refused: a binary file cut on a record boundary would otherwise
train on fewer images without a word.  A smaller set made on purpose (a quick
experiment, a test) is accepted with the environment variable
``VGGEN_CIFAR_SUBSET=1``: then each batch may hold any number of images ≥ 1
(a binary file must still be a whole number of records).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from vggen.errors import VggenError
from vggen.paths import cache_dir

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"

CLASSES = 10
CHANNELS, HEIGHT, WIDTH = 3, 32, 32
PIXELS = CHANNELS * HEIGHT * WIDTH  # 3072 bytes per image, channel-major
RECORD = 1 + PIXELS  # binary format: one label byte, then the pixels
BATCH_RECORDS = 10_000  # images in every official batch file, train and test
SUBSET_ENV = "VGGEN_CIFAR_SUBSET"  # set (to 1): accept batches of fewer images

DATASETS = ("digits", "cifar10")
DATA_SUBDIR = "data"  # under the cache directory, where datasets are fetched by default


@dataclass
class Dataset:
    """A labelled image set, already normalised and ready for the network."""

    images: np.ndarray  # float32 (N, 3, 32, 32), C-contiguous
    labels: np.ndarray  # int32 (N,)
    name: str
    classes: int = CLASSES

    def __post_init__(self) -> None:
        # Kernels index raw memory, so a wrong dtype or a strided view would
        # silently read garbage; catch it where the dataset is built.
        if self.images.dtype != np.float32 or not self.images.flags.c_contiguous:
            raise ValueError(f"{self.name}: images must be C-contiguous float32")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.name}: labels must be int32 with one per image")

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------
# Normalisation shared by every source
# --------------------------------------------------------------------------


def _normalise(train: np.ndarray, test: np.ndarray, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale integer pixels to [0, 1], then standardise each channel.

    Mean and standard deviation come from the training set only (so the test
    set stays unseen). They are computed exactly from a per-channel histogram
    of the integer pixel values, which needs no float64 copy of the images.
    """
    levels = np.arange(max_value + 1, dtype=np.float64) / max_value
    mean = np.empty(CHANNELS)
    std = np.empty(CHANNELS)
    for c in range(CHANNELS):
        counts = np.bincount(train[:, c].ravel(), minlength=max_value + 1)
        weights = counts / counts.sum()
        mean[c] = weights @ levels
        std[c] = np.sqrt(weights @ (levels - mean[c]) ** 2)
    std[std == 0] = 1.0  # a constant channel carries no information; leave it at 0

    def apply(raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.float32)
        out /= np.float32(max_value)
        out -= mean.astype(np.float32)[:, None, None]
        out /= std.astype(np.float32)[:, None, None]
        return out

    return apply(train), apply(test)


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Reject out-of-range labels: they would index past the 10 logits."""
    bad = np.flatnonzero((labels < 0) | (labels >= CLASSES))
    if bad.size:
        i = int(bad[0])
        raise VggenError(f"{path}: record {i} has label {int(labels[i])}, expected 0..{CLASSES - 1}")
    return labels.astype(np.int32)


def _existing_file(path: Path) -> Path:
    """Check the batch file is there and non-empty before parsing it."""
    if not path.is_file():
        raise VggenError(f"{path}: CIFAR-10 batch file is missing")
    if path.stat().st_size == 0:
        raise VggenError(f"{path}: file is empty")
    return path


def _subset_allowed() -> bool:
    return os.environ.get(SUBSET_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _check_count(path: Path, records: int, size: int | None = None) -> None:
    """Refuse a batch that does not hold the official 10,000 images, unless
    ``VGGEN_CIFAR_SUBSET`` says a smaller set is meant."""
    if records == BATCH_RECORDS or _subset_allowed():
        return
    got, want = f"{records} records", f"{BATCH_RECORDS}"
    if size is not None:
        got, want = f"{got} ({size} bytes)", f"{want} ({BATCH_RECORDS * RECORD} bytes)"
    why = "truncated download? " if records < BATCH_RECORDS else ""
    raise VggenError(
        f"{path}: {got}, but an official CIFAR-10 batch has {want}: {why}"
        f"to train on a different number of images on purpose, set {SUBSET_ENV}=1"
    )


def _read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: records of 1 label byte + 3072 channel-major pixels."""
    size = _existing_file(path).stat().st_size
    if size % RECORD:
        raise VggenError(
            f"{path}: size {size} bytes is not a whole number of {RECORD}-byte records "
            "(truncated download?)"
        )
    _check_count(path, size // RECORD, size)
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD)
    labels = _check_labels(raw[:, 0], path)
    return raw[:, 1:].reshape(-1, CHANNELS, HEIGHT, WIDTH), labels


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild NumPy arrays.

    A pickle can run arbitrary code when loaded; CIFAR batches only need
    ndarray reconstruction, so anything else is refused.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles store array bytes this way
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One Python-format batch: a pickled dict with b'data' and b'labels'."""
    with _existing_file(path).open("rb") as f:
        try:
            # encoding="bytes" is required for the official Python 2 pickles.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:  # a corrupt pickle can raise almost anything
            raise VggenError(f"{path}: cannot unpickle CIFAR-10 batch: {e}") from e
    if not isinstance(batch, dict):
        raise VggenError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    missing = [repr(k) for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise VggenError(f"{path}: pickled batch lacks key(s) {', '.join(missing)}")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (TypeError, ValueError) as e:  # e.g. ragged lists
        raise VggenError(f"{path}: b'data' or b'labels' is not an array: {e}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS or not len(data):
        raise VggenError(
            f"{path}: b'data' has shape {data.shape} and dtype {data.dtype}, "
            f"expected (N, {PIXELS}) uint8 with N > 0"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise VggenError(f"{path}: b'labels' must be {len(data)} integers, got shape {labels.shape}")
    _check_count(path, len(data))
    return data.reshape(-1, CHANNELS, HEIGHT, WIDTH), _check_labels(labels, path)


def _find_cifar10(root: Path) -> tuple[Path, str]:
    """Locate the batch directory and its format ("bin" or "py") under root."""
    if root.name == BIN_DIR and root.is_dir():
        return root, "bin"
    if root.name == PY_DIR and root.is_dir():
        return root, "py"
    for sub, fmt in ((BIN_DIR, "bin"), (PY_DIR, "py")):
        if (root / sub).is_dir():
            return root / sub, fmt
    raise VggenError(
        f"CIFAR-10 not found: looked for {root / BIN_DIR} and {root / PY_DIR}; "
        "run `vggen data fetch cifar10` to download it"
    )


def load_cifar10(root: str | Path) -> tuple[Dataset, Dataset]:
    """Load the CIFAR-10 (train, test) sets from either official format.

    ``root`` is the directory holding ``cifar-10-batches-bin/`` or
    ``cifar-10-batches-py/``, or one of those directories itself.
    """
    directory, fmt = _find_cifar10(Path(root).expanduser())
    if fmt == "bin":
        parts = [_read_bin_batch(directory / f"{name}.bin") for name in TRAIN_BATCHES + [TEST_BATCH]]
    else:
        parts = [_read_py_batch(directory / name) for name in TRAIN_BATCHES + [TEST_BATCH]]
    train_raw = np.concatenate([images for images, _ in parts[:-1]])
    train_labels = np.concatenate([labels for _, labels in parts[:-1]])
    test_raw, test_labels = parts[-1]
    train, test = _normalise(train_raw, test_raw, 255)
    return Dataset(train, train_labels, "cifar10-train"), Dataset(test, test_labels, "cifar10-test")


def default_data_dir(explicit: str | None) -> Path:
    """Where datasets live: ``--data``, else ``$VGGEN_DATA``, else ``data/`` in
    vggen's cache directory (:func:`vggen.paths.cache_dir`)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("VGGEN_DATA"):
        return Path(os.environ["VGGEN_DATA"]).expanduser()
    return cache_dir() / DATA_SUBDIR


# --------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------


def _download(url: str, archive: Path, md5: str, progress: bool) -> None:
    """Download url to archive, verifying its md5 before it gets that name.

    Bytes go to a hidden temporary file in the same directory, which is then
    renamed: the rename is atomic, so an interrupted or corrupt download never
    leaves a file under the archive's real name, and a retry starts clean.
    """
    digest = hashlib.md5(usedforsecurity=False)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=archive.parent, prefix=".download-", suffix=".part")
    except OSError as e:
        raise VggenError(f"cannot write to {archive.parent}: {e.strerror}") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=archive.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise VggenError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {digest.hexdigest()}"
            )
        os.replace(tmp, archive)
    except urllib.error.HTTPError as e:
        raise VggenError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise VggenError(f"cannot download {url}: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise VggenError(f"cannot download {url}: {e}") from e
    finally:
        # Covers every failure, Ctrl-C included; after the rename it is a no-op.
        tmp.unlink(missing_ok=True)


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Refuse members that could write outside dest (absolute, ``..``, links)."""
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts:
            raise VggenError(f"{archive}: unsafe path {m.name!r} in archive")
        if not (m.isfile() or m.isdir()):
            raise VggenError(f"{archive}: member {m.name!r} is not a regular file or directory")
    return members


def fetch_cifar10(
    dest: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, progress: bool = True
) -> Path:
    """Download and unpack the CIFAR-10 archive into dest; return the batch directory.

    The md5 is checked before anything is extracted, so a corrupt or tampered
    download is never unpacked.
    """
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VggenError(f"cannot create data directory {dest}: {e.strerror}") from e
    archive = dest / (PurePosixPath(urllib.parse.urlsplit(url).path).name or "cifar-10.tar.gz")
    _download(url, archive, md5, progress)

    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = _safe_members(tar, archive)
            if hasattr(tarfile, "data_filter"):
                # Python versions with extraction filters warn without one.
                tar.extractall(dest, members=members, filter="data")
            else:
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise VggenError(f"{archive}: cannot extract archive: {e}") from e

    tops = {PurePosixPath(m.name).parts[0] for m in members if m.name not in ("", ".")}
    for name in (BIN_DIR, PY_DIR):
        if name in tops:
            return dest / name
    raise VggenError(f"{archive}: archive has no {BIN_DIR}/ or {PY_DIR}/ directory")


# --------------------------------------------------------------------------
# Digits (offline, bundled with scikit-learn)
# --------------------------------------------------------------------------


def load_digits32(seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits, blown up to CIFAR's 3x32x32 layout.

    This gives a real, learnable 10-class problem that needs no download, so
    the whole pipeline can be exercised offline. The split is stratified per
    class and depends only on ``seed``.
    """
    if not 0 < test_fraction < 1:
        raise VggenError(f"test fraction must be between 0 and 1, got {test_fraction}")
    from sklearn.datasets import load_digits  # heavy import, only when needed

    digits = load_digits()
    raw = digits.images.astype(np.uint8)  # (N, 8, 8), values 0..16
    labels = digits.target.astype(np.int32)
    raw = raw.repeat(4, axis=1).repeat(4, axis=2)  # nearest-neighbour x4
    raw = np.repeat(raw[:, None], CHANNELS, axis=1)  # grey -> 3 identical channels

    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(members[: round(test_fraction * len(members))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True

    train, test = _normalise(raw[~is_test], raw[is_test], 16)
    return (
        Dataset(train, labels[~is_test], "digits-train"),
        Dataset(test, labels[is_test], "digits-test"),
    )


def load_dataset(name: str, data_dir: str | None, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test) for a dataset named on the command line."""
    if name == "digits":
        return load_digits32(seed)
    if name == "cifar10":
        return load_cifar10(default_data_dir(data_dir))
    raise VggenError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
