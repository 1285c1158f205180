"""`vggen check`: every document equation proved; JSON and Markdown outputs."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "vggen", *args], capture_output=True, text=True)


def test_check_json_and_markdown(tmp_path):
    md = tmp_path / "derivations.md"
    res = run("check", "--json", "--markdown", str(md))
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    for row in rows:
        assert {"layer", "gradient", "equation", "method", "verdict"} <= set(row)
        assert row["verdict"] == "pass"
    proved = {r["equation"] for r in rows if r["equation"]}
    assert proved == {"4", "8", "11", "14", "16", "18", "24", "25", "50", "53", "55"}
    softmax = [r for r in rows if r["layer"] == "SoftmaxCrossEntropy"]
    assert softmax and softmax[0]["equation"] is None and softmax[0]["fd_error"] < 1e-6
    text = md.read_text()
    assert "## BatchNormalization" in text and "$$" in text and "eq. 50" in text


def test_bad_option_is_one_line_without_traceback():
    res = run("train", "--target", "tpu")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
