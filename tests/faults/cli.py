"""Run the ``vggen`` command as a user would, and judge how it failed.

Every fault test goes through the public command line in a subprocess: exit
status, stderr and the files left behind are what a user sees.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# A training run small enough for a fault test: about four seconds on two cores.
TINY = ("--target", "c", "--width", "2", "--batch-size", "64", "-q")


def vggen(*args, env: dict | None = None, cwd: str | Path | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m vggen ARGS`` with ``env`` added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "vggen", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, *words: str, status: int = 2) -> str:
    """Assert the run failed with ``status`` and exactly one stderr line holding ``words``."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert res.returncode == status, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def digest(path: str | Path) -> str:
    """SHA-256 of a file: to show that a user's file was left exactly as it was."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
