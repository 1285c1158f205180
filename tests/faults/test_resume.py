"""Exact resume through the command line, and the options a resume refuses."""

from __future__ import annotations

import numpy as np
import pytest

from vggen.model import checkpoint as ckpt
from tests.faults.cli import TINY, digest, one_line_error, vggen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain 3-epoch run, and 2 epochs of a 3-epoch schedule resumed to 3."""
    root = tmp_path_factory.mktemp("resume")
    whole, split = root / "whole", root / "split"
    for args in (["--epochs", "3", "--checkpoint", whole],
                 ["--epochs", "2", "--schedule-epochs", "3", "--checkpoint", split]):
        res = vggen("train", *TINY, *args)
        assert res.returncode == 0, res.stderr
    return whole, split


def test_two_plus_one_epochs_equal_three(runs):
    whole, split = runs
    res = vggen("train", "-q", "--epochs", "3", "--resume", split)
    assert res.returncode == 0, res.stderr
    a, b = ckpt.load(whole), ckpt.load(split)
    assert b.epoch == 3
    for group in ("params", "momentum", "state"):
        for name, value in getattr(a, group).items():
            np.testing.assert_array_equal(value, getattr(b, group)[name], err_msg=name)
    losses = [[r[k] for k in ("train_loss", "test_loss", "test_acc")] for r in a.header["history"]]
    assert losses == [[r[k] for k in ("train_loss", "test_loss", "test_acc")]
                      for r in b.header["history"]]


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "32"], "--batch-size 64"),
    (["--lr", "0.1"], "--lr 0.01"),
    (["--momentum", "0.5"], "--momentum 0.9"),
    (["--weight-decay", "0"], "--weight-decay 0.0005"),
    (["--width", "4"], "--width 2"),
    (["--seed", "1"], "--seed 0"),
    (["--no-augment"], "trained with augmentation; a resumed run keeps it (got --no-augment)"),
    (["--dropout"], "the dataset's default dropout; a resumed run keeps it (got --dropout)"),
    (["--epochs", "5"], "goes past the learning-rate schedule"),
    (["--schedule-epochs", "2", "--epochs", "5"], "--schedule-epochs 2 is shorter than --epochs 5"),
])
def test_a_resume_refuses_a_changed_run(runs, args, words):
    whole = runs[0]
    before = digest(whole / "checkpoint.npz")
    one_line_error(vggen("train", "--resume", whole, *args), words)
    assert digest(whole / "checkpoint.npz") == before


def test_a_resume_may_repeat_the_options(runs):
    whole = runs[0]
    before = digest(whole / "checkpoint.npz")
    res = vggen("train", *TINY, "--epochs", "3", "--resume", whole)     # done already: nothing to do
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert digest(whole / "checkpoint.npz") == before
