"""`vggen report`: the derivation document with verdicts and kernel names (vggen.tools.report)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from tests.helpers import REPO
from vggen import atomic as atomic_mod
from vggen.atomic import write_atomic
from vggen.compiler.emit import generated_layers
from vggen.errors import VggenError
from vggen.frontend.layers import dropout, relu
from vggen.manifest import load_manifest
from vggen.proof.verify import check_all
from vggen.tools.cli import main
from vggen.tools.report import html, latex, markdown, write_markdown


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REPO / "generated")[1]


@pytest.fixture(scope="module")
def small():
    layers = [relu(), dropout()]
    return layers, check_all(layers)


def test_document_has_forward_document_derived_verdict_and_kernels(small, manifest):
    layers, rows = small
    text = markdown(rows, layers, manifest)
    assert text.startswith("# Math for VGG")
    assert "## ReLU" in text and "## Dropout" in text and "## Convolution2D" not in text
    relu_part = text[text.index("## ReLU"):text.index("## Dropout")]
    # forward, with the document's number as a tag and the kernel that computes it
    assert r"\tag{51}" in relu_part and "`relu_forward_y` (C `c/vggen_kernels.c`, CUDA `cuda/relu.cu`)" in relu_part
    # per gradient: document's equation, then the derived one, the verdict, the kernels
    grad = relu_part[relu_part.index(r"### $\partial L / \partial x$"):]
    order = [grad.index(s) for s in ("Document, eq. 53", "Derived:", "- Document eq. 53: **pass**, method *symbolic*",
                                     "- Kernels: `relu_backward_g_x`")]
    assert order == sorted(order)
    assert r"\frac{\partial L}{\partial y}" in grad        # g_y written as ∂L/∂y
    assert grad.count("$$") == 4                           # two display equations
    assert "| ReLU | ∂L/∂x | eq. 53 | symbolic | **pass** | `relu_backward_g_x` |" in text
    assert "2 of 2 checks pass." in text


def test_every_generated_kernel_is_named_in_the_document(manifest):
    """Matched by layer and written tensor: each forward and backward kernel appears."""
    text = markdown([], generated_layers(), manifest)
    for k in manifest["kernels"]:
        assert f"`{k['name']}`" in text, k["name"]
    conv = text[text.index("## Convolution2D"):text.index("## Linear")]
    gx = conv[conv.index(r"\partial x$"):conv.index(r"\partial w$")]
    assert "Document, eq. 4 (scatter form)" in gx and "Document, eq. 8 (gather form)" in gx
    assert "`convolution2d_backward_g_x`" in gx and "`convolution2d_backward_g_w`" not in gx
    bn = text[text.index("## BatchNormalization"):text.index("## ReLU")]
    assert bn.count("`batchnormalization_backward_g_gamma_g_beta`") == 2   # writes ∂L/∂γ and ∂L/∂β
    soft = text[text.index("## SoftmaxCrossEntropy"):]
    assert "Derived (the document has no equation for it):" in soft


def test_document_notation():
    from vggen.proof.document import document_equations

    eq4 = next(d for d in document_equations() if d.number == "4")
    tex = latex(eq4.expr)
    assert "i''" in tex and "i'" in tex and r"\frac{\partial L}{\partial y}" in tex and "di" not in tex
    bn = next(d for d in document_equations() if d.number == "50")
    assert r"\sigma^{2}" in latex(bn.expr) and r"\frac{\partial L}{\partial \gamma}" in latex(bn.expr)


def test_markdown_without_manifest_is_what_check_writes(small, tmp_path):
    layers, rows = small
    text = markdown(rows, layers)
    assert "Kernels" not in text and "kernels |" not in text and "eq. 18" in text
    path = write_markdown(tmp_path / "d.md", rows)      # `vggen check --markdown`'s call
    assert path.read_text() == markdown(rows)


class _Balanced(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag


def test_html_page(small, manifest):
    layers, rows = small
    page = html(markdown(rows, layers, manifest))
    assert page.startswith("<!DOCTYPE html>") and "MathJax" in page and "tex-chtml.js" in page
    p = _Balanced()
    p.feed(page)
    assert p.stack == [] and {"h1", "h2", "h3", "table", "ul", "li", "code", "strong"} <= set(p.tags)
    assert "<h2>ReLU</h2>" in page
    assert '<div class="math">$$ ' in page and r"\geq 0" in page          # math left for MathJax
    assert "<td><code>relu_backward_g_x</code></td>" in page
    assert "<strong>pass</strong>" in page and "**" not in page
    tricky = html("a < b & *c* `x<y` $a<b$\n\n$$ x < y $$")
    assert "a &lt; b &amp; <em>c</em> <code>x&lt;y</code> $a&lt;b$" in tricky
    assert '<div class="math">$$ x &lt; y $$</div>' in tricky


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "d.md"
    path.write_text("old")
    write_atomic(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["d.md"]

    def fail(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic_mod.os, "replace", fail)
    with pytest.raises(VggenError, match="cannot write .*d.md: No space left"):
        write_atomic(path, "newer")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["d.md"]


def test_cli_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # no ./generated: the repository's is used
    assert main(["report", "--layer", "relu", "--layer", "DROP"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "wrote derivations.md: 2 layers, 2 checks, 2 passed, 0 failed"
    text = (tmp_path / "derivations.md").read_text()
    assert "`dropout_backward_g_x`" in text and "## ReLU" in text and "## Linear" not in text

    assert main(["report", "--html", "--layer", "relu", "-o", "page.html"]) == 0
    assert (tmp_path / "page.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", "--html", "--layer", "relu"]) == 0
    assert (tmp_path / "derivations.html").is_file()
    assert sorted(os.listdir(tmp_path)) == ["derivations.html", "derivations.md", "page.html"]


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", "--layer", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no layer named 'nope'" in err and "BatchNormalization" in err
    assert main(["report", "--layer", "relu", "--generated", str(tmp_path)]) == 2
    assert "manifest.json not found: run `vggen build`" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{")
    assert main(["report", "--layer", "relu", "--generated", str(tmp_path)]) == 2
    assert "cannot read the manifest" in capsys.readouterr().err


def test_failing_check_exits_1_and_is_in_the_document(tmp_path, monkeypatch, manifest):
    from vggen.proof import verify

    def broken(layers=None, docs=None):
        rows = check_all([relu()])
        rows[0].verdict, rows[0].detail = "fail", "made up"
        return rows
    monkeypatch.setattr(verify, "check_all", broken)
    assert main(["report", "--layer", "relu", "-o", str(tmp_path / "d.md")]) == 1
    assert "**fail**" in (tmp_path / "d.md").read_text()


def test_help_describes_every_option():
    res = subprocess.run([sys.executable, "-m", "vggen", "report", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--output", "--html", "--layer", "--generated"):
        assert opt in res.stdout
    assert "derivations.md" in res.stdout
