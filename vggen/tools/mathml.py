"""Presentation MathML for the document's equations: the math of ``vggen report --html``.

MathML is rendered by the browser itself, so the page needs no script and
no network.  SymPy's presentation printer is the base; the overrides below
are where its output would be wrong or unlike the document's notation:

* a sum over several indices keeps every limit (the base prints only the first);
* ``Piecewise`` as cases, ``KroneckerDelta`` as δ, ``Mod`` as ``a mod b``
  (the base prints lower-cased function names);
* an access ``x[b, c, i, j]`` as x with the subscript b,c,i,j, as in LaTeX;
* the reductions of :mod:`vggen.frontend.lang` (max, first argmax);
* the document's names: ``g_x`` as ∂L/∂x, ``di`` as i′, ``i2`` as i″,
  ``var`` as σ², ``xhat`` as x̂.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.mathml import MathMLPresentationPrinter

PRIMES = {"di": ("i", "\u2032"), "dj": ("j", "\u2032"), "i2": ("i", "\u2033"), "j2": ("j", "\u2033")}
GRADIENT_PREFIX = "g_"


class DocumentMathML(MathMLPresentationPrinter):
    """SymPy's presentation MathML in the notation of "Math for VGG"."""

    def mathml_tag(self, e):
        # The base writes text unescaped (so that entities such as
        # &InvisibleTimes; survive): a strict inequality's < would open a tag.
        tag = super().mathml_tag(e)
        return {"<": "&lt;", ">": "&gt;"}.get(tag, tag)

    # ------------------------------------------------------------------ helpers

    def _element(self, tag: str, *children, text: str | None = None):
        element = self.dom.createElement(tag)
        if text is not None:
            element.appendChild(self.dom.createTextNode(text))
        for child in children:
            element.appendChild(child)
        return element

    def _operator(self, text: str):
        return self._element("mo", text=text)

    def _identifier(self, text: str):
        return self._element("mi", text=text)

    def _comma_list(self, items):
        row = self._element("mrow")
        for n, item in enumerate(items):
            if n:
                row.appendChild(self._operator(","))
            row.appendChild(self._print(item))
        return row

    def _grouped(self, expr):
        """``expr``, in parentheses unless it is a single symbol, number or access."""
        if isinstance(expr, (sp.Symbol, sp.Integer, sp.Indexed)):
            return self._print(expr)
        return self._element("mrow", self._l_paren(), self._print(expr), self._r_paren())

    # ------------------------------------------------------------------ names

    def _name(self, name: str):
        if name in PRIMES:
            letter, prime = PRIMES[name]
            return self._element("msup", self._identifier(letter), self._operator(prime))
        if name == "var":
            return self._element("msup", self._identifier("\u03c3"), self._element("mn", text="2"))
        if name.endswith("hat") and len(name) > 3:
            return self._element("mover", self._name(name[:-3]), self._operator("^"))
        if name.startswith(GRADIENT_PREFIX) and len(name) > len(GRADIENT_PREFIX):
            loss = self._element("mrow", self._operator("\u2202"), self._identifier("L"))
            of = self._element("mrow", self._operator("\u2202"), self._name(name[len(GRADIENT_PREFIX):]))
            return self._element("mfrac", loss, of)
        return super()._print_Symbol(sp.Symbol(name))

    def _print_Symbol(self, sym, style="plain"):
        return self._name(sym.name)

    def _print_IndexedBase(self, base):
        return self._name(str(base.label))

    def _print_Indexed(self, access):
        return self._element("msub", self._print(access.base), self._comma_list(access.indices))

    # ------------------------------------------------------------------ operations

    def _print_Sum(self, total):
        row = self._element("mrow")
        for index, low, high in total.limits:               # in SymPy's order, as the LaTeX has them
            lower = self._element("mrow", self._print(index), self._operator("="), self._print(low))
            row.appendChild(self._element("munderover", self._operator("\u2211"), lower, self._print(high)))
        body = total.function
        row.appendChild(self._grouped(body) if isinstance(body, sp.Add) else self._print(body))
        return row

    def _print_Piecewise(self, cases):
        table = self._element("mtable")
        table.setAttribute("columnalign", "left left")
        for value, condition in cases.args:
            when = (self._element("mtext", text="otherwise") if condition is sp.true else
                    self._element("mrow", self._element("mtext", text="if\u00a0"), self._print(condition)))
            table.appendChild(self._element("mtr", self._element("mtd", self._print(value)),
                                            self._element("mtd", when)))
        return self._element("mrow", self._operator("{"), table)

    def _print_KroneckerDelta(self, delta):
        return self._element("msub", self._identifier("\u03b4"), self._comma_list(delta.args))

    def _print_Mod(self, remainder):
        a, b = remainder.args
        return self._element("mrow", self._grouped(a), self._operator("mod"), self._grouped(b))

    def _reduction(self, operator, below, body):
        return self._element("mrow", self._element("munder", operator, below), self._grouped(body))

    def _print_ReduceMax(self, reduction):
        bounds = self._element("mrow")
        for n, (index, low, high) in enumerate(reduction.limits):
            if n:
                bounds.appendChild(self._operator(","))
            for part in (self._print(low), self._operator("\u2264"), self._print(index),
                         self._operator("\u2264"), self._print(high)):
                bounds.appendChild(part)
        return self._reduction(self._operator("max"), bounds, reduction.function)

    def _print_ArgMax(self, reduction):
        operator = self._element("msup", self._operator("argmax"), self._element("mtext", text="first"))
        return self._reduction(operator, self._comma_list(reduction.variables), reduction.function)


def equation_mathml(lhs, rhs, display: bool = True) -> str:
    """``lhs = rhs`` as one ``<math>`` element."""
    printer = DocumentMathML()
    row = printer._element("mrow", printer._print(sp.sympify(lhs)), printer._operator("="),
                           printer._print(sp.sympify(rhs)))
    math = printer._element("math", row)
    if display:
        math.setAttribute("display", "block")
    return math.toxml()


def expression_mathml(expr) -> str:
    """``expr`` as one inline ``<math>`` element."""
    printer = DocumentMathML()
    return printer._element("math", printer._print(sp.sympify(expr))).toxml()


def gradient_mathml(of: str) -> str:
    """∂L/∂``of`` as one inline ``<math>`` element (on one line, unlike ``g_of``)."""
    printer = DocumentMathML()
    return printer._element("math", printer._operator("\u2202"), printer._identifier("L"),
                            printer._operator("/"), printer._operator("\u2202"),
                            printer._name(of)).toxml()
