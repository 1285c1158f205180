"""Concurrent `vggen build`s into one directory leave it whole (vggen.compiler.emit.build_lock)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from vggen.compiler import emit as codegen
from vggen.compiler.emit import LOCK, build, build_lock, outputs

pytestmark = pytest.mark.skipif(codegen.fcntl is None, reason="no fcntl: builds are not serialised")


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single():
    """The bytes of one build: path → content."""
    return {rel: text.encode() for rel, text in outputs().items()}


def test_concurrent_builds_write_exactly_one_build(tmp_path, single):
    out, go = tmp_path / "generated", tmp_path / "go"
    # start from a stale directory: an edited kernel file and leftovers of ours (which every
    # build would remove: without the lock, one finds another has removed them first)
    (out / "cuda").mkdir(parents=True)
    (out / "cuda" / "relu.cu").write_text("// edited\n")
    for n in range(6):
        (out / "cuda" / f"old_layer{n}.cu").write_text("// left over\n")
    # the processes start building together, so their write phases overlap
    code = (f"import os, time\nfrom vggen.compiler.emit import build\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\nbuild({str(out)!r})")
    procs = []
    try:
        for _ in range(3):
            procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                          stderr=subprocess.PIPE, text=True))
        time.sleep(1.0)
    finally:
        go.touch()
    results = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        results.append((p.returncode, err))
    assert all(rc == 0 for rc, _ in results), results
    assert _tree(out) == single          # nothing else: no temporary, no lock file, no leftover
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_the_lock_makes_a_build_wait(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(codegen, "outputs", lambda: {"manifest.json": "{}\n", "c/k.c": "int k;\n"})
    done = []
    with build_lock(out):
        assert (out / LOCK).is_file()
        worker = threading.Thread(target=lambda: done.append(build(out)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and not (out / "manifest.json").exists()    # waiting on the lock
    worker.join(timeout=10)
    assert not worker.is_alive() and done
    assert _tree(out) == {"manifest.json": b"{}\n", "c/k.c": b"int k;\n"}      # and the lock file is gone


def test_lock_file_replaced_while_waiting_is_not_shared(tmp_path):
    """A waiter that wakes on a removed lock file retries on the current one."""
    out = tmp_path / "out"
    order = []

    def hold(tag, pause):
        with build_lock(out):
            order.append(f"{tag}+")
            time.sleep(pause)
            order.append(f"{tag}-")

    threads = [threading.Thread(target=hold, args=(n, 0.1)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(order) == 8
    assert all(order[k].endswith("+") and order[k + 1] == order[k][:-1] + "-" for k in range(0, 8, 2))
    assert not (out / LOCK).exists()


def test_a_stale_lock_file_is_not_an_output(tmp_path, monkeypatch, single):
    """A lock file left by a killed build: check and the manifest ignore it; a
    build takes it over and removes it."""
    monkeypatch.setattr(codegen, "outputs", lambda: {k: v.decode() for k, v in single.items()})
    out = tmp_path / "out"
    build(out)
    (out / LOCK).write_text("")
    assert build(out, check=True) == []
    assert LOCK not in single["manifest.json"].decode()
    build(out)
    assert _tree(out) == single
    assert subprocess.run(["git", "check-ignore", "-q", f"generated/{LOCK}"], cwd=REPO).returncode == 0


def test_an_up_to_date_read_only_directory_builds_without_the_lock(tmp_path, monkeypatch):
    """Where no lock file can be made (read-only), a build with nothing to write still succeeds."""
    monkeypatch.setattr(codegen, "outputs", lambda: {"manifest.json": "{}\n"})
    out = tmp_path / "out"
    build(out)
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(LOCK):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    assert build(out) == [out / "manifest.json"]
    assert _tree(out) == {"manifest.json": b"{}\n"}
