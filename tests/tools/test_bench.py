"""`vggen bench`: a JSON object with the measured rates and the per-kernel table."""

import json
import re
import subprocess
import sys

import pytest


def test_bench_json_on_c():
    res = subprocess.run([sys.executable, "-m", "vggen", "bench", "--target", "c", "--batch-size", "2",
                          "--width", "2", "--steps", "2", "--warmup", "1", "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["images_per_s"] > 0
    assert {"torch_images_per_s", "ratio", "kernels"} <= set(r)
    names = {re.sub(r"_winograd\d$", "", k["name"]) for k in r["kernels"]}   # whichever algorithm ran it
    assert "convolution2d_forward_y" in names and "convolution2d_backward_g_w" in names
    assert abs(sum(k["share"] for k in r["kernels"]) - 1) < 1e-6


@pytest.mark.parametrize("algorithm", ["direct", "winograd4"])
def test_bench_runs_the_convolutions_by_the_algorithm_asked_for(algorithm):
    res = subprocess.run([sys.executable, "-m", "vggen", "bench", "--target", "c", "--batch-size", "2",
                          "--width", "2", "--steps", "1", "--warmup", "0", "--no-torch", "--json",
                          "--conv-algorithm", algorithm], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["conv_algorithm"] == algorithm
    convs = {k["name"] for k in r["kernels"] if k["name"].startswith("convolution2d")}
    suffix = "" if algorithm == "direct" else "_" + algorithm
    # the first layer's ∂L/∂x is not needed (the images), so two or three kernel names
    assert convs and all(n.endswith(suffix) and n.count("_winograd") == (suffix != "") for n in convs)


def test_bench_rejects_numpy_and_bad_sizes():
    for args in (["--target", "numpy"], ["--batch-size", "0"]):
        res = subprocess.run([sys.executable, "-m", "vggen", "bench", *args],
                             capture_output=True, text=True)
        assert res.returncode != 0 and "Traceback" not in res.stderr
