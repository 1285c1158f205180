"""`vggen report --html`: a page whose math is MathML, rendered with no script and no network."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import sympy as sp

from tests.helpers import REPO
from vggen.derive.autodiff import derive
from vggen.frontend.lang import Sum, indices, sizes
from vggen.frontend.layers import convolution2d, max_pooling2d, relu
from vggen.manifest import load_manifest
from vggen.proof.verify import check_all
from vggen.tools.cli import main
from vggen.tools.mathml import equation_mathml, expression_mathml
from vggen.tools.report import html_page, markdown


class _Page(HTMLParser):
    """Tags in order, the <script> sources, and whether every tag is closed."""

    VOID = frozenset({"meta", "br", "hr", "img", "link"})

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.tags, self.scripts = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append(dict(attrs).get("src"))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag


@pytest.fixture(scope="module")
def layers_and_rows():
    layers = [relu(), convolution2d(), max_pooling2d()]
    return layers, check_all(layers)


@pytest.fixture(scope="module")
def page(layers_and_rows):
    layers, rows = layers_and_rows
    return html_page(rows, layers, load_manifest(REPO / "generated")[1])


def test_page_needs_no_script_or_network(page):
    parsed = _Page(page)
    assert parsed.stack == []
    assert parsed.scripts == [] and "MathJax" not in page
    assert not re.search(r"""src\s*=\s*["']?https?:""", page) and "http" not in page


def test_every_equation_is_mathml(layers_and_rows, page):
    layers, rows = layers_and_rows
    text = markdown(rows, layers, load_manifest(REPO / "generated")[1])
    displayed = text.count("\n$$ ")
    assert page.count('<math display="block">') == displayed > 0
    inline = len(re.findall(r"(?<!\$)\$[^$\n]+\$(?!\$)", text))
    assert page.count("<math>") == inline > 0
    assert "$" not in page and "\\frac" not in page and "\\sum" not in page    # no TeX left over
    assert "<h3><math>" in page                                              # the ∂L/∂x headings
    assert '<span class="tag">(51)</span>' in page                            # ReLU's equation number
    assert "<strong>pass</strong>" in page and "<code>relu_backward_g_x</code>" in page


def test_mathml_is_in_the_document_notation():
    conv = convolution2d().equations[0]
    forward = equation_mathml(conv.lhs, conv.rhs)
    assert forward.count("<mo>\u2211</mo>") == 3                      # ic, i′, j′: every limit kept
    assert "<msup><mi>i</mi><mo>\u2032</mo></msup>" in forward        # di as i′
    pool = max_pooling2d()
    assert "argmax" in equation_mathml(pool.equations[0].lhs, pool.equations[0].rhs)
    backward = derive(pool).gradients[0].equation
    printed = equation_mathml(backward.lhs, backward.rhs)
    assert "<mi>\u03b4</mi>" in printed and "<mo>mod</mo>" in printed
    assert "kroneckerdelta" not in printed and "piecewise" not in printed.lower()
    assert "<mo>\u2202</mo><mi>L</mi>" in printed                       # g_x as ∂L/∂x
    x, = sizes("x")
    (i,) = indices("i")
    guarded = expression_mathml(sp.Piecewise((1, i < x), (0, True)) + Sum(i, (i, 0, x)))
    assert "<mo>&lt;</mo>" in guarded and "<mtext>otherwise</mtext>" in guarded
    assert expression_mathml(sp.Symbol("var")) == "<math><msup><mi>\u03c3</mi><mn>2</mn></msup></math>"


def test_cli_html_report_is_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--html", "--layer", "relu", "-o", "page.html"]) == 0
    capsys.readouterr()
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    parsed = _Page(page)
    assert parsed.stack == [] and parsed.scripts == [] and "http" not in page
    assert "math" in parsed.tags and page.count("<math") >= 4
