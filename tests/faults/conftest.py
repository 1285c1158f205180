"""Fixtures of the fault tests: a directory nobody may write to."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory that cannot be written: mode 0o500 for an ordinary user; for
    root, whom modes do not stop, a read-only tmpfs mounted there (skipped
    where mounting is not allowed)."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root and cannot mount a read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
