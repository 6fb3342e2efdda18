"""Hash functions written as integer formulas: parsed, checked, compiled. Pure: no I/O.

``LB_HASH='H=3*i**2+7*i+11; Phi=i**2+j**2+2*j+25'`` gives the request hash H(i) and the
virtual-server hash Phi(i, j) of the consistent hash map. What a formula may hold:

- integers (``17``, ``0xff``, ``1_000``), the names ``i`` (in both) and ``j`` (in Phi only);
- ``+ - * // % **``, the bit operators ``<< >> & | ^ ~`` (``^`` is XOR, as in Python and C),
  unary ``-`` and ``+``, and parentheses.

Nothing else: the text is parsed with :mod:`ast` and every node of the tree must be one of the
types in ``ALLOWED_NODES``; no other name, no call, no attribute, no subscript, no comparison,
no float, no string.

Each formula is then checked over the whole domain it will see, by interval arithmetic, before
it is accepted (``check``):

- H gets request keys, ``0 <= i < 2**64`` (the router's keys all are: 6-digit ids, digits of at
  most 18 characters, 64-bit xxHash of anything else); Phi gets server ids
  ``0 <= i < 2**32`` and ``0 <= j < K``. The compiled functions mask ``i`` into that range, so
  an input outside it cannot reach an unchecked value.
- No intermediate value may need more than ``MAX_BITS`` bits (so ``9**9**9``, ``1<<10**9``,
  ``i**17`` and ``(i+1)**(j+99)`` are refused; ``(i+1)**(j+1)`` passes with K = 9 and is
  refused with K = 40). That bounds the time too: the costliest formula accepted takes tens of
  microseconds a call (docs/hash-formulas.md has the figures).
- An exponent or shift count may not be negative (``i**-1`` is a fraction, ``1 << -1`` an
  error), and a divisor of ``//`` or ``%`` may not be 0, anywhere in the domain.

Evaluation can therefore neither hang, nor eat memory, nor fail at run time. Interval
arithmetic is conservative: ``i % (i*i - i + 1)`` is refused although that divisor is never 0;
``(... | 1)`` makes a divisor odd and so never 0, and the check knows it (``x | y`` is 0 only
when both are). A negative result is fine: the ring takes every result mod M with Python's
``%``, which lands in 0..M-1 for any integer.

A refused formula raises :class:`FormulaError` with one line saying what is wrong, where
(character position in ``LB_HASH``, counted from 1) and the offending text.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_TEXT = 1000  # characters of the whole LB_HASH value
MAX_NODES = 200  # terms and operators (expression nodes) per formula
MAX_DEPTH = 100  # nesting of the tree: a flat sum of n terms is n deep
MAX_BITS = 1024  # size of any intermediate value, over the whole domain
KEY_BITS = 64  # H: request keys 0 .. 2**64 - 1
SERVER_ID_BITS = 32  # Phi: server ids 0 .. 2**32 - 1

ALLOWED_OPERATORS: dict[type[ast.AST], str] = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
    ast.BitXor: "^", ast.USub: "-", ast.UAdd: "+", ast.Invert: "~",
}
# The closed set: a parsed formula whose tree holds any other node type is refused.
ALLOWED_NODES: frozenset[type[ast.AST]] = frozenset(
    {ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
     *ALLOWED_OPERATORS})

RULES = "integers, i, j (Phi only), + - * // % ** << >> & | ^ ~ and parentheses"

# Human names of what people try: the message says what was found.
_WHAT = {
    ast.Call: "a function call", ast.Attribute: "attribute access", ast.Lambda: "a lambda",
    ast.Subscript: "indexing", ast.Compare: "a comparison", ast.BoolOp: "and/or",
    ast.IfExp: "if/else", ast.NamedExpr: "an assignment", ast.List: "a list",
    ast.Tuple: "a tuple", ast.Set: "a set", ast.Dict: "a dict", ast.Starred: "a star",
    ast.ListComp: "a comprehension", ast.GeneratorExp: "a generator",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.JoinedStr: "a string", ast.Await: "await", ast.Yield: "yield",
    ast.Div: "'/' (true division gives fractions: use //)", ast.Not: "'not'",
    ast.MatMult: "'@'",
}
_SIDES = re.compile(r"^\s*(H|Phi)\s*(\(\s*i\s*\)|\(\s*i\s*,\s*j\s*\))?\s*$", re.IGNORECASE)


class FormulaError(ValueError):
    """A formula that is refused; the message is one line: what, where, the text."""


@dataclass(frozen=True)
class Span:
    """Every value an expression can take over the domain lies in lo..hi (and is never 0 when
    ``nonzero``: what ``x | 1`` is, although its range may span 0)."""

    lo: int
    hi: int
    nonzero: bool = False

    @property
    def never_zero(self) -> bool:
        return self.nonzero or not self.lo <= 0 <= self.hi

    @property
    def bits(self) -> int:
        return max(abs(self.lo), abs(self.hi)).bit_length()

    def __contains__(self, x: int) -> bool:
        return self.lo <= x <= self.hi

    def text(self) -> str:
        return _short(self.lo) if self.lo == self.hi else f"{_short(self.lo)}..{_short(self.hi)}"


def _short(x: int) -> str:
    """``x`` for people: exact when short, else as a power of two."""
    if abs(x) < 10**7:
        return str(x)
    sign, m = ("-" if x < 0 else ""), abs(x)
    p = m.bit_length()
    if m + 1 == 1 << p:
        return f"{sign}(2**{p}-1)"
    if m == 1 << (p - 1):
        return f"{sign}2**{p - 1}"
    return f"{sign}~2**{round(math.log2(m))}"


@dataclass(frozen=True)
class Formulas:
    """A checked pair: canonical texts and the compiled functions (domain masks applied)."""

    h: str
    phi: str
    request: Callable[[int], int]
    virtual: Callable[[int, int], int]
    virtual_per_server: int

    @property
    def spec(self) -> str:
        """The canonical ``LB_HASH`` value: the same formulas always give the same text."""
        return f"H={self.h}; Phi={self.phi}"


def is_formula_spec(text: str) -> bool:
    return "=" in text


def parse_formulas(text: str, virtual_per_server: int) -> Formulas:
    """Parse, check and compile ``'H=...; Phi=...'`` for K = ``virtual_per_server``."""
    if len(text) > MAX_TEXT:
        raise FormulaError(f"LB_HASH is {len(text):,} characters long; formulas may have at "
                           f"most {MAX_TEXT:,}")
    if virtual_per_server < 1:
        raise FormulaError("formulas need at least one virtual server per replica (K >= 1)")
    # One character for one, so positions stay right: a value from a multi-line YAML string
    # or a shell heredoc still parses.
    text = text.translate(str.maketrans("\n\r\t", "   "))
    found: dict[str, tuple[str, int]] = {}
    start = 0
    for part in text.split(";"):
        if part.strip():
            side, eq, expr = part.partition("=")
            where = start + len(side) + len(eq)
            match = _SIDES.match(side)
            first = start + 1 + len(part) - len(part.lstrip())  # where the part begins
            if not eq or match is None:
                raise FormulaError(
                    f"LB_HASH, character {first}: expected 'H=<formula>' or 'Phi=<formula>', "
                    f"found {_clip(part.strip())!r}")
            name = "H" if match.group(1).lower() == "h" else "Phi"
            if name in found:
                raise FormulaError(f"LB_HASH, character {first}: {name} is given twice")
            found[name] = (expr, where)
        start += len(part) + 1
    missing = [n for n in ("H", "Phi") if n not in found]
    if missing:
        raise FormulaError(f"LB_HASH: {' and '.join(missing)} missing: give both, as in "
                           "'H=<formula of i>; Phi=<formula of i and j>'")
    k = virtual_per_server
    h_tree = _parse("H", *found["H"])
    phi_tree = _parse("Phi", *found["Phi"])
    check(h_tree, {"i": Span(0, 2**KEY_BITS - 1)}, "H", found["H"][1])
    check(phi_tree, {"i": Span(0, 2**SERVER_ID_BITS - 1), "j": Span(0, k - 1)}, "Phi",
          found["Phi"][1])
    h = _compile(h_tree, ("i",))
    phi = _compile(phi_tree, ("i", "j"))
    key_mask, id_mask = 2**KEY_BITS - 1, 2**SERVER_ID_BITS - 1

    def request(i: int) -> int:
        return h(i & key_mask)

    def virtual(i: int, j: int) -> int:
        if not 0 <= j < k:
            raise ValueError(f"j = {j} is outside the checked range 0..{k - 1}")
        return phi(i & id_mask, j)

    return Formulas(ast.unparse(h_tree), ast.unparse(phi_tree), request, virtual, k)


# -- parsing ---------------------------------------------------------------------------------
def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _refuse(name: str, offset: int, col: int, what: str, source: str = "") -> FormulaError:
    shown = f": {_clip(source)}" if source else ""
    return FormulaError(f"LB_HASH, character {offset + col + 1} (in {name}): {what}{shown}")


def _parse(name: str, expr: str, offset: int) -> ast.Expression:
    """The syntax tree of one formula, refused unless every node is in ``ALLOWED_NODES``."""
    stripped = expr.lstrip()
    offset += len(expr) - len(stripped)
    expr = stripped.rstrip()
    if not expr:
        raise _refuse(name, offset, 0, "the formula is empty")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        col = max(0, (exc.offset or 1) - 1)
        hint = " (write 2*i, not 2i)" if "decimal literal" in (exc.msg or "") else ""
        raise _refuse(name, offset, col, f"not a formula: {exc.msg}{hint}", expr) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise _refuse(name, offset, 0, f"not a formula: {type(exc).__name__}", expr) from None
    nodes = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:  # iterative: a deep tree must not exhaust the interpreter's stack here
        node, depth = stack.pop()
        nodes += isinstance(node, ast.expr)
        col = getattr(node, "col_offset", 0)
        if nodes > MAX_NODES:
            raise _refuse(name, offset, 0, f"more than {MAX_NODES} terms and operators", expr)
        if depth > MAX_DEPTH:
            raise _refuse(name, offset, col, f"nested more than {MAX_DEPTH} deep", expr)
        if type(node) not in ALLOWED_NODES:
            raise _refuse(name, offset, col, _what(node) + f" is not allowed ({RULES})",
                          ast.get_source_segment(expr, node) or "")
        if isinstance(node, ast.Constant) and type(node.value) is not int:
            raise _refuse(name, offset, col, f"{_kind(node.value)} is not allowed: integers "
                          "only", ast.get_source_segment(expr, node) or "")
        if isinstance(node, ast.Name) and node.id not in (("i",) if name == "H" else ("i", "j")):
            allowed = "i" if name == "H" else "i and j"
            raise _refuse(name, offset, col, f"unknown name {node.id!r}: {name} may use "
                          f"{allowed} only")
        stack.extend((child, depth + isinstance(child, ast.expr))
                     for child in ast.iter_child_nodes(node))
    return tree


def _what(node: ast.AST) -> str:
    return _WHAT.get(type(node), f"{type(node).__name__}")


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


# -- checking over the domain -------------------------------------------------------------------
def check(tree: ast.Expression, domain: dict[str, Span], name: str = "H",
          offset: int = 0) -> Span:
    """The values ``tree`` can take over ``domain``; refused when an intermediate value can
    need more than ``MAX_BITS`` bits, an exponent or shift count can be negative, or a
    divisor can be 0. ``tree`` must have passed ``_parse`` (depth bounded)."""
    source = ast.unparse(tree)

    def refuse(node: ast.AST, what: str) -> FormulaError:
        # Positions within the unparsed text are not the user's: report the user's column.
        return _refuse(name, offset, getattr(node, "col_offset", 0), what,
                       _clip(ast.unparse(node)) if node is not tree.body else source)

    def fits(node: ast.AST, span: Span) -> Span:
        if span.bits > MAX_BITS:
            raise refuse(node, f"may reach {span.bits:,} bits over the domain "
                               f"(limit {MAX_BITS:,})")
        return span

    def too_big(node: ast.AST, bits: int) -> FormulaError:
        return refuse(node, f"may need about {bits:,} bits over the domain "
                            f"(limit {MAX_BITS:,})")

    def span_of(node: ast.AST) -> Span:
        if isinstance(node, ast.Expression):
            return span_of(node.body)
        if isinstance(node, ast.Constant):
            assert type(node.value) is int  # _parse refused every other constant
            return fits(node, Span(node.value, node.value))
        if isinstance(node, ast.Name):
            return domain[node.id]
        if isinstance(node, ast.UnaryOp):
            a = span_of(node.operand)
            if isinstance(node.op, ast.USub):
                return Span(-a.hi, -a.lo, a.nonzero)
            if isinstance(node.op, ast.Invert):
                return Span(-a.hi - 1, -a.lo - 1)
            return a
        assert isinstance(node, ast.BinOp)
        a, b = span_of(node.left), span_of(node.right)
        op = node.op
        if isinstance(op, ast.Add):
            return fits(node, Span(a.lo + b.lo, a.hi + b.hi))
        if isinstance(op, ast.Sub):
            return fits(node, Span(a.lo - b.hi, a.hi - b.lo))
        if isinstance(op, ast.Mult):
            if a.bits + b.bits > MAX_BITS + 1:
                raise too_big(node, a.bits + b.bits)
            product = _corners(lambda x, y: x * y, a, b)
            return fits(node, Span(product.lo, product.hi, a.never_zero and b.never_zero))
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            if not b.never_zero:
                raise refuse(node.right, f"this divisor may be 0 (it ranges over {b.text()}); "
                                         "make it nonzero, e.g. (... | 1)")
            if isinstance(op, ast.FloorDiv):
                if b.lo > 0 or b.hi < 0:
                    return _corners(lambda x, y: x // y, a, b)
                m = max(abs(a.lo), abs(a.hi))  # b spans 0 but is never 0: |a // b| <= |a|
                return Span(-m, m)
            if b.lo > 0:
                return Span(0, min(b.hi - 1, a.hi) if a.lo >= 0 else b.hi - 1)
            if b.hi < 0:
                return Span(b.lo + 1, 0)
            return Span(min(0, b.lo + 1), max(0, b.hi - 1))  # |a % b| < |b|, sign of b
        if isinstance(op, ast.Pow):
            if b.lo < 0:
                raise refuse(node.right, f"this exponent may be negative ({b.text()}): "
                                         "integer powers only")
            m = max(abs(a.lo), abs(a.hi))
            if m <= 1:
                return Span(-1 if a.lo < 0 else 0, 1)
            if (m.bit_length() - 1) * b.hi >= MAX_BITS:
                raise too_big(node, (m.bit_length() - 1) * b.hi + 1)
            top = m ** b.hi
            if a.lo >= 0:
                low = a.lo ** b.lo if a.lo >= 1 else 0
                return fits(node, Span(low, max(top, 1)))
            return fits(node, Span(-top, top))
        if isinstance(op, (ast.LShift, ast.RShift)):
            if b.lo < 0:
                raise refuse(node.right, f"this shift count may be negative ({b.text()})")
            if isinstance(op, ast.LShift):
                if a.bits + b.hi > MAX_BITS:
                    raise too_big(node, a.bits + b.hi)
                return fits(node, _corners(lambda x, y: x << y, a, b))
            # Shifting right by more than a's bits gives 0 or -1 whatever the count.
            c = Span(min(b.lo, a.bits + 1), min(b.hi, a.bits + 1))
            return _corners(lambda x, y: x >> y, a, c)
        if isinstance(op, ast.BitAnd) and (a.lo >= 0 or b.lo >= 0):
            return Span(0, min(s.hi for s in (a, b) if s.lo >= 0))
        if isinstance(op, (ast.BitOr, ast.BitXor)) and a.lo >= 0 and b.lo >= 0:
            return Span(0, 2 ** max(a.bits, b.bits) - 1,
                        isinstance(op, ast.BitOr) and (a.never_zero or b.never_zero))
        # Two's complement: values of -2**B .. 2**B - 1 stay there under & | ^; x | y is 0
        # only when both are.
        top_bits = max(a.bits, b.bits)
        return Span(-(2**top_bits), 2**top_bits - 1,
                    isinstance(op, ast.BitOr) and (a.never_zero or b.never_zero))

    return span_of(tree)


def _corners(f: Callable[[int, int], int], a: Span, b: Span) -> Span:
    """f's range over a box, for an f monotone in each argument on it (so the extremes are
    at the corners): * everywhere, // and >> when the divisor does not cross 0."""
    values = [f(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Span(min(values), max(values))


# -- compiling ---------------------------------------------------------------------------------
def _compile(tree: ast.Expression, args: tuple[str, ...]) -> Callable[..., int]:
    """``lambda i[, j]: <formula>`` as a Python function.

    Safe to compile because ``_parse`` admitted only the node types of ``ALLOWED_NODES``
    (arithmetic on integer constants and the named arguments) and ``check`` bounded every
    value over the domain; compiled, it runs at the speed of the built-in presets.
    """
    arguments = ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in args], vararg=None,
                              kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
    lam = ast.Expression(ast.Lambda(arguments, tree.body))
    ast.fix_missing_locations(lam)
    code = compile(lam, "<LB_HASH>", "eval")
    function: Callable[..., int] = eval(code, {"__builtins__": {}})  # the lambda only
    return function
