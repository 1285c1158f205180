"""The autotuner's choices, its record, and the kernels built from it.

Timing needs a GPU (``tools/gpu_check.sh`` runs ``vggen tune``); what is
tested here is everything around it: which candidates are timed, which
result is kept, how records merge, how a bad record is refused, and that a
record becomes a table the kernel consults (run in the CPU emulation).
"""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest

from vggen.compiler.emit import build, generate
from vggen.compiler.targets.cuda import schedule as cuda_schedule
from vggen.compiler.targets.cuda.schedule import (
    CONFIGS,
    TUNING_FILE,
    Tuned,
    Tuning,
    choose,
    parse_tuning,
    tune_value,
)
from vggen.errors import VggenError
from vggen.frontend.layers import linear
from vggen.tools.tune import MIN_GAIN, Product, candidates, merge, pick

CXX = shutil.which("g++") or shutil.which("c++")
SPECIALISE = {"K": 1, "S": 2, "epsilon": 2e-5}


def test_candidates_start_with_the_model_and_are_distinct():
    for m, n, k in ((64, 4096, 27), (512, 32, 4608), (10, 512, 512)):
        tunes = candidates(m, n, k)
        assert tunes[0] == tune_value(*choose(m, n, k))
        choices = [cuda_schedule.choose(m, n, k, tune=t) for t in tunes]
        assert len(set(choices)) == len(choices)
        assert {c for c, _ in choices} == set(range(len(CONFIGS)))


def test_pick_keeps_only_a_clear_win():
    p = Product("conv", 64, 1024, 576)
    model = tune_value(*choose(p.m, p.n, p.k))
    other = next(t for t in candidates(p.m, p.n, p.k) if t != model)
    assert pick(p, {model: 1.0, other: 1.0 - MIN_GAIN / 2}) is None         # within the noise
    assert pick(p, {model: 1.0, other: 1.5}) is None
    won = pick(p, {model: 1.0e-3, other: 0.5e-3})
    assert (won.tune, won.ms, won.heuristic_ms) == (other, 0.5, 1.0)
    with pytest.raises(ValueError, match="model"):
        pick(p, {other: 1.0})


def test_merge_replaces_and_drops():
    a, b = Product("k", 1, 2, 3), Product("k", 4, 5, 6)
    old = Tuning("H100", {"k": [Tuned(1, 2, 3, 7), Tuned(4, 5, 6, 8)], "j": [Tuned(9, 9, 9, 2)]})
    new = merge(old, "H100", {a: Tuned(1, 2, 3, 9), b: None})
    assert new.kernels == {"k": [Tuned(1, 2, 3, 9)], "j": [Tuned(9, 9, 9, 2)]}
    other_gpu = merge(old, "H200", {a: Tuned(1, 2, 3, 9)})
    assert other_gpu.kernels == {"k": [Tuned(1, 2, 3, 9)]}


@pytest.mark.parametrize("data, match", [
    ([], "not a tuning record"),
    ({"kernels": {}, "configs": len(CONFIGS) + 1}, "tile configurations"),
    ({"kernels": {"k": [{"M": 1, "N": 2}]}, "configs": len(CONFIGS)}, "integer M, N, K and tune"),
    ({"kernels": {"k": [{"M": 1, "N": 2, "K": 3, "tune": 0}]}, "configs": len(CONFIGS)}, "out of range"),
    ({"kernels": {"k": [{"M": 1, "N": 2, "K": 3, "tune": 2}] * 2}, "configs": len(CONFIGS)}, "two entries"),
])
def test_a_bad_record_is_refused_by_name(data, match):
    with pytest.raises(VggenError, match=match):
        parse_tuning(data, "generated/tuning.json")


def _record(kernel: str, m: int, n: int, k: int, tune: int) -> Tuning:
    return Tuning("NVIDIA H100 80GB HBM3", {kernel: [Tuned(m, n, k, tune, 0.1, 0.2)]})


def test_build_compiles_the_record_into_kernel_and_manifest(tmp_path):
    out = tmp_path / "gen"
    build(out)
    assert "vg_tuned_table_" not in (out / "cuda" / "linear.cu").read_text()
    tune = tune_value(3, 2)
    rec = _record("linear_forward_y", 32, 512, 512, tune)
    (out / TUNING_FILE).write_text(json.dumps(rec.as_json()))
    assert sorted(p.name for p in build(out, check=True)) == ["linear.cu", "manifest.json"]
    build(out)
    assert build(out, check=True) == []
    text = (out / "cuda" / "linear.cu").read_text()
    assert f"{{ 32, 512, 512, {tune} }}" in text and "measured by `vggen tune` on NVIDIA H100" in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["tuning"] == {"file": TUNING_FILE, "device": "NVIDIA H100 80GB HBM3"}
    entry = next(e for e in man["kernels"] if e["name"] == "linear_forward_y" and e["target"] == "cuda")
    (choice,) = entry["launch"]["tuned"]["choices"]
    assert (choice["tune"], choice["config"], choice["splits"]) == (tune, 3, 2)
    (out / TUNING_FILE).write_text("{")
    with pytest.raises(VggenError, match="tuning.json: cannot read"):
        build(out, check=True)


def test_the_kernel_consults_its_table_only_when_not_forced():
    _, kernels = generate([linear()], "cuda", SPECIALISE, tuning=_record("linear_forward_y", 8, 32, 64, 5))
    fwd = next(k for k in kernels if k.name == "linear_forward_y")
    assert ("vg_tune_linear_forward_y != 0 ? vg_tune_linear_forward_y : "
            "vg_tuned_linear_forward_y(vg_M, vg_N, vg_K)") in fwd.text
    other = next(k for k in kernels if k.name == "linear_backward_g_x")
    assert "vg_tuned_table_" not in other.text and "return 0;" in other.text


@pytest.mark.skipif(CXX is None or sys.platform != "linux", reason="needs g++ and ucontext (Linux)")
def test_a_recorded_choice_is_found_and_runs_right_in_emulation(tmp_path):
    from tests.compiler.test_cuda_emulation import _check, _run, compile_emulation
    from tests.helpers import layer_data, reference

    sizes = dict(B=8, IC=64, C=32)
    tune = tune_value(4, 3)
    rec = _record("linear_forward_y", 8, 32, 64, tune)
    text, kernels = generate([linear()], "cuda", SPECIALISE, tuning=rec)
    probe = 'extern "C" int vg_emu_tuned(int M, int N, int K) { return vg_tuned_linear_forward_y(M, N, K); }\n'
    lib = compile_emulation(text, kernels, tmp_path, probe)
    assert lib.vg_emu_tuned(8, 32, 64) == tune
    assert lib.vg_emu_tuned(8, 32, 65) == 0 and lib.vg_emu_tuned(32, 8, 64) == 0
    gk = next(k for k in kernels if k.name == "linear_forward_y")
    env = layer_data(linear(), sizes, SPECIALISE, np.random.default_rng(0))
    _check(gk, _run(lib, gk, env, sizes, 5), reference(gk, env, sizes, SPECIALISE), "tuned")


def test_tune_without_a_gpu_is_one_line(tmp_path):
    from vggen.runtime import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    res = subprocess.run([sys.executable, "-m", "vggen", "tune", "--target", "cuda"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "needs CuPy and a GPU" in res.stderr


def test_tune_on_c_records_each_convolutions_fastest_algorithm(tmp_path):
    """`vggen tune --target c` into a copy of generated/: algorithms.json, then the
    manifest lists the records beside the direct kernels, and the build is current."""
    import shutil

    from tests.helpers import REPO
    from vggen.compiler.emit import build

    gen = tmp_path / "generated"
    shutil.copytree(REPO / "generated", gen)
    res = subprocess.run([sys.executable, "-m", "vggen", "tune", "--target", "c", "--width", "2",
                          "--batch-size", "2", "--generated", str(gen)], capture_output=True, text=True,
                         env={**os.environ, "VGGEN_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "measured choices" in res.stdout
    record = json.loads((gen / "algorithms.json").read_text())
    assert set(record["kernels"]) == {"convolution2d_forward_y", "convolution2d_backward_g_x",
                                      "convolution2d_backward_g_w"}
    for recs in record["kernels"].values():
        for r in recs:
            assert set(r["ms"]) == {"direct", "winograd2", "winograd4"}
            assert r["ms"][r["algorithm"]] == min(r["ms"].values())      # rounding keeps the order
    manifest = json.loads((gen / "manifest.json").read_text())
    listed = {e["name"]: e.get("measured") for e in manifest["kernels"] if e["target"] == "c"}
    assert listed["convolution2d_forward_y"] == record["kernels"]["convolution2d_forward_y"]
    assert manifest["algorithms"]["c"]["file"] == "algorithms.json"
    assert build(gen, check=True) == []
