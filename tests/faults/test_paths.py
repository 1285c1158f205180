"""Paths the user names that cannot be written: one line, before any work, nothing lost.

Each case runs the command line and asserts exit status 2, exactly one line
on stderr, no traceback, and that the files the user had are untouched."""

from __future__ import annotations

import time

import pytest

from vggen.atomic import write_atomic
from vggen import atomic
from vggen.errors import VggenError
from tests.faults.cli import TINY, digest, one_line_error, vggen


def test_checkpoint_naming_a_file_fails_before_training(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    t0 = time.perf_counter()
    res = vggen("train", *TINY, "--epochs", "1", "--checkpoint", mine)
    one_line_error(res, "--checkpoint", "notes.txt", "not a directory")
    assert time.perf_counter() - t0 < 20          # no epoch was spent first
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("option", ["--metrics", "--checkpoint"])
def test_training_outputs_on_a_read_only_file_system(read_only_dir, option):
    res = vggen("train", *TINY, "--epochs", "1", option, read_only_dir / "sub" / "out")
    one_line_error(res, option, "not writable")


def test_metrics_naming_a_directory(tmp_path):
    one_line_error(vggen("train", *TINY, "--epochs", "1", "--metrics", tmp_path),
                   "--metrics", "is a directory")


def test_outputs_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(vggen("train", *TINY, "--epochs", "1", "--metrics", tmp_path / "f" / "m.jsonl"),
                   "is not a directory")


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0, '
                    '"test_acc": 0.5}\n')
    return path


@pytest.mark.parametrize("command", [
    ["report", "--layer", "relu", "-o"],
    ["check", "--markdown"],
    ["plot", "METRICS", "-o"],
])
def test_documents_on_a_read_only_file_system(read_only_dir, metrics_file, command):
    if command[0] == "plot":
        pytest.importorskip("matplotlib")
    args = [metrics_file if a == "METRICS" else a for a in command]
    res = vggen(*args, read_only_dir / "out")
    one_line_error(res, str(read_only_dir / "out"), "not writable")


def test_report_onto_a_directory(tmp_path):
    one_line_error(vggen("report", "--layer", "relu", "-o", tmp_path), "is a directory")


def test_a_failing_cleanup_never_hides_the_error(tmp_path, monkeypatch):
    path = tmp_path / "d.md"
    path.write_text("old")

    def full(*a):
        raise OSError(28, "No space left on device")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(atomic.os, "replace", full)
    monkeypatch.setattr(atomic.Path, "unlink", refuse)
    with pytest.raises(VggenError, match="cannot write .*d.md: No space left on device"):
        write_atomic(path, "new")
    assert path.read_text() == "old"


def test_a_user_file_is_never_half_replaced(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("the user's")
    before = digest(path)
    res = vggen("report", "--layer", "nosuchlayer", "-o", path)
    assert res.returncode == 2 and digest(path) == before


def test_build_into_a_read_only_file_system(read_only_dir):
    one_line_error(vggen("build", "--out", read_only_dir / "generated"),
                   f"cannot create {read_only_dir / 'generated'}")
