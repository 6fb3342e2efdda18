"""Hash functions as a setting: formulas (parsed, checked over their domain, compiled) and
plug-ins, as ``LB_HASH`` resolves them. Pure: no process is started."""

from __future__ import annotations

import ast
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.bootstrap import HashMapMismatch, ensure_registry, initial_state, ring_params
from lb.formulas import KEY_BITS, MAX_BITS, SERVER_ID_BITS, FormulaError, parse_formulas
from lb.hashring import PRESETS, HashPreset, HashRing, HashSpecError, resolve_preset
from lb.registry import Registry
from lb.settings import Settings, SettingsError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HANDOUT = "H=i**2+2*i+17; Phi=i**2+j**2+2*j+25"


def _balanced(depth: int) -> str:
    return "i" if depth == 0 else f"({_balanced(depth - 1)}+{_balanced(depth - 1)})"


BALANCED_128 = _balanced(7)  # 128 terms, 127 operators, 7 deep: too many, not too deep
_rng = random.Random(5)
KEYS = ([0, 1, 2**KEY_BITS - 1, 100000, 999999]
        + [_rng.randrange(2**KEY_BITS) for _ in range(3000)])
SERVER_IDS = [0, 1, 2, 3, 2**SERVER_ID_BITS - 1] + [_rng.randrange(2**16) for _ in range(300)]


# -- the presets' formulas, written out, are the presets ---------------------------------------
@pytest.mark.parametrize("name", ["seed", "cs60002"])
def test_a_presets_formulas_written_out_compute_the_preset(name: str) -> None:
    preset = PRESETS[name]
    assert preset.formulas is not None
    h, phi = preset.formulas
    written = resolve_preset(f"H={h}; Phi={phi}", 9)
    assert all(written.request(k) == preset.request(k) for k in KEYS)
    assert all(written.virtual(i, j) == preset.virtual(i, j)
               for i in SERVER_IDS for j in range(9))


def test_the_handouts_formulas_place_and_route_like_cs60002() -> None:
    by_formula, by_name = HashRing(512, 9, HANDOUT), HashRing(512, 9, "cs60002")
    for server_id in (1, 2, 3, 4, 5):
        assert by_formula.add(server_id) == by_name.add(server_id)
    assert all(by_formula.lookup(k) == by_name.lookup(k) for k in range(100000, 1000000, 7))


def test_spacing_case_and_argument_lists_do_not_change_the_canonical_spec() -> None:
    specs = [HANDOUT, " h = i**2 + 2*i + 17 ;PHI=i**2+j**2+2*j+25;",
             "Phi(i, j) = i ** 2 + j ** 2 + 2 * j + 25; H(i) = (i**2) + 2*i + 17",
             "H=i**2+2*i+17;\n  Phi=i**2+j**2+2*j+25"]
    canonical = {resolve_preset(s, 9).name for s in specs}
    assert canonical == {"H=i ** 2 + 2 * i + 17; Phi=i ** 2 + j ** 2 + 2 * j + 25"}
    assert resolve_preset(HANDOUT, 9).formulas == ("i ** 2 + 2 * i + 17",
                                                   "i ** 2 + j ** 2 + 2 * j + 25")


def test_the_issues_example_and_every_operator_are_accepted() -> None:
    f = parse_formulas("H=3*i**2+7*i+11; Phi=i**2+j**2+2*j+25", 9)
    assert f.request(5) == 3 * 25 + 35 + 11 and f.virtual(2, 3) == 4 + 9 + 6 + 25
    g = parse_formulas("H=((i * 0x9E3779B97F4A7C15) & (2**64 - 1)) >> 55; "
                       "Phi=(i << 7 | j) ^ ~i % 1_000_003 - +j // (j + 1) - 2**j", 9)
    i, j = 123456, 8
    assert g.request(i) == ((i * 0x9E3779B97F4A7C15) & (2**64 - 1)) >> 55
    assert g.virtual(i, j) == (i << 7 | j) ^ ~i % 1_000_003 - +j // (j + 1) - 2**j


# -- refused: what, where, one line ---------------------------------------------------------
HOSTILE = [
    ("H=__import__('os').system('true'); Phi=j", "a function call is not allowed", 3),
    ("H=i; Phi=().__class__.__bases__", "attribute access is not allowed", 10),
    ("H=(lambda: 1)(); Phi=j", "a function call is not allowed", 3),
    ("H=i; Phi=(lambda i: i)", "a lambda is not allowed", 11),
    ("H=9**9**9; Phi=j", "bits over the domain (limit 1,024)", 3),
    ("H=1<<10**9; Phi=j", "bits over the domain (limit 1,024)", 3),
    ("H=i**17; Phi=j", "bits over the domain", 3),
    ("H=i; Phi=(i+1)**(j+99)", "bits over the domain", 10),
    ("H=" + "i+" * 5000 + "1; Phi=j", "10,010 characters long; formulas may have at most", None),
    ("H=(i+1; Phi=j", "'(' was never closed", 3),
    ("H=i+1); Phi=j", "unmatched ')'", 6),
    ("H=i; Phi=k", "unknown name 'k': Phi may use i and j only", 10),
    ("H=j; Phi=j", "unknown name 'j': H may use i only", 3),
    ("H=os; Phi=j", "unknown name 'os'", 3),
    ("H=2i; Phi=j", "write 2*i, not 2i", 3),
    ("H=i/2; Phi=j", "true division", 3),
    ("H=1.5; Phi=j", "the float 1.5 is not allowed", 3),
    ("H='x'; Phi=j", "a string is not allowed", 3),
    ("H=True; Phi=j", "the boolean True", 3),
    ("H=i if i else 1; Phi=j", "if/else is not allowed", 3),
    ("H=i < 3; Phi=j", "a comparison is not allowed", 3),
    ("H=[i][0]; Phi=j", "indexing is not allowed", 3),
    ("H=(x:=i); Phi=j", "an assignment is not allowed", 4),
    ("H=i // (i - 5); Phi=j", "this divisor may be 0", 9),
    ("H=i; Phi=i % (j - 1)", "this divisor may be 0", 15),
    ("H=i ** -1; Phi=j", "this exponent may be negative", 8),
    ("H=i; Phi=1 << (j - 2)", "this shift count may be negative", 16),
    ("H=" + "-" * 150 + "i; Phi=j", "nested more than 100 deep", None),
    ("H=" + BALANCED_128 + "; Phi=j", "more than 200 terms", 3),
    ("H=i", "Phi missing", None),
    ("Phi=j", "H missing", None),
    ("H=i; H=i; Phi=j", "H is given twice", 6),
    ("H=i; Phi=j; G=1", "expected 'H=<formula>' or 'Phi=<formula>', found 'G=1'", 13),
    ("H=; Phi=j", "the formula is empty", 3),
    ("H=i\x00; Phi=j", "null bytes", 3),
]


@pytest.mark.parametrize(("spec", "what", "where"), HOSTILE)
def test_a_wrong_formula_is_refused_with_one_line_saying_what_and_where(
        spec: str, what: str, where: int | None) -> None:
    with pytest.raises(FormulaError) as caught:
        resolve_preset(spec, 9)
    message = str(caught.value)
    assert what in message
    assert "\n" not in message and len(message) < 300
    if where is not None:
        assert re.search(rf"character {where}\b", message)


def test_bounds_follow_the_domain_the_formula_will_see() -> None:
    """Phi's j ranges over 0..K-1: the same formula fits K = 9 and not K = 40."""
    parse_formulas("H=i; Phi=(i + 1) ** (j + 1)", 9)
    with pytest.raises(FormulaError, match="bits over the domain"):
        parse_formulas("H=i; Phi=(i + 1) ** (j + 1)", 40)
    parse_formulas("H=i ** 16; Phi=2 ** j", 9)  # 16 x 64 bits: at the limit
    with pytest.raises(FormulaError):
        parse_formulas("H=i ** 16 * 2; Phi=j", 9)
    # Interval arithmetic is conservative; the documented way out of a "may be 0" divisor.
    with pytest.raises(FormulaError, match="divisor may be 0"):
        parse_formulas("H=i % (i*i - i + 1); Phi=j", 9)
    f = parse_formulas("H=i % (i*i - i + 1 | 1) + i // (i**15 | 1) + i // (i - 9 | 1); "
                       "Phi=i % (j + 1) + i % (j - 3 | 1)", 9)
    assert f.request(0) == 0 and f.request(9) == 9 % 73 + 9 // (9**15 | 1) + 9 // 1
    assert f.virtual(10, 0) == 0 + 10 % -3


def test_settings_refuse_a_wrong_formula_and_keep_a_good_one_canonical() -> None:
    with pytest.raises(SettingsError, match=r"character 10 \(in Phi\): unknown name 'k'"):
        Settings.from_env({"LB_HASH": "H=i; Phi=k"})
    with pytest.raises(SettingsError, match="hash must be one of seed, cs60002, xxhash"):
        Settings.from_env({"LB_HASH": "md5"})
    settings = Settings.from_env({"LB_HASH": " H = i*i+2*i+17 ; Phi = i*i+j*j+2*j+25 "})
    assert ring_params(settings).hash == "H=i * i + 2 * i + 17; Phi=i * i + j * j + 2 * j + 25"
    Settings.from_env({"LB_HASH": "H=i; Phi=(i+1)**(j+1)"})
    with pytest.raises(SettingsError, match="bits over the domain"):  # K = 40 is checked
        Settings.from_env({"LB_HASH": "H=i; Phi=(i+1)**(j+1)", "LB_VIRTUAL": "40",
                           "LB_SLOTS": "4096"})


# -- at run time -------------------------------------------------------------------------------
def test_negative_results_land_on_the_ring_and_inputs_are_masked_into_the_domain() -> None:
    f = resolve_preset("H=-i - 1; Phi=-(i * 1000 + j)", 4)
    ring = HashRing(64, 4, f)
    for sid in (1, 2, 3):
        ring.add(sid)
    assert all(0 <= ring.slot_of(k) < 64 for k in KEYS[:200])
    assert ring.lookup(-5) in (1, 2, 3)
    assert f.request(2**KEY_BITS + 7) == f.request(7)
    assert f.virtual(2**SERVER_ID_BITS + 3, 1) == f.virtual(3, 1)
    with pytest.raises(ValueError, match="outside the checked range 0..3"):
        f.virtual(1, 4)


# -- fuzzing the parser --------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(
    st.text(max_size=200),
    st.text(alphabet="Hhi jPp=;()+-*/%<>&|^~0123456789x._'\"[]:,lambd", max_size=120),
))
def test_any_text_is_a_formula_pair_or_a_formula_error(text: str) -> None:
    """Whatever LB_HASH holds: accepted, or refused with a FormulaError; nothing else."""
    try:
        f = parse_formulas(text, 9)
    except FormulaError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(f.request(123456), int) and isinstance(f.virtual(1, 8), int)


OPERATORS = ["+", "-", "*", "//", "%", "**", "<<", ">>", "&", "|", "^"]


def _expressions(names: list[str]) -> st.SearchStrategy[str]:
    leaves = st.one_of(st.sampled_from(names), st.integers(0, 130).map(str),
                       st.integers(-(2**70), 2**70).map(lambda n: f"({n})"))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(OPERATORS), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(st.sampled_from(["-", "+", "~"]), inner).map(lambda t: f"{t[0]}{t[1]}")),
        max_leaves=10)


class Unsound(AssertionError):
    """An accepted formula did what the checker promised it cannot."""


def reference(node: ast.AST, env: dict[str, int]) -> int:
    """Evaluate a formula step by step, failing instead of computing anything the checker
    should have refused (so an unsound checker fails this test, never hangs it)."""
    if isinstance(node, ast.Expression):
        return reference(node.body, env)
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        v = reference(node.operand, env)
        out = {ast.USub: -v, ast.UAdd: v, ast.Invert: ~v}[type(node.op)]
    else:
        assert isinstance(node, ast.BinOp)
        a, b = reference(node.left, env), reference(node.right, env)
        op = type(node.op)
        if op in (ast.FloorDiv, ast.Mod) and b == 0:
            raise Unsound(f"division by zero in {ast.unparse(node)} at {env}")
        if op in (ast.Pow, ast.LShift, ast.RShift) and b < 0:
            raise Unsound(f"negative exponent or shift in {ast.unparse(node)} at {env}")
        if op is ast.Pow and abs(a) > 1 and (abs(a).bit_length() - 1) * b > MAX_BITS:
            raise Unsound(f"{ast.unparse(node)} is huge at {env}")
        if op is ast.LShift and a and b > MAX_BITS:
            raise Unsound(f"{ast.unparse(node)} is huge at {env}")
        out = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b, ast.Pow: lambda: a ** b,
               ast.LShift: lambda: a << b, ast.RShift: lambda: a >> min(b, 10 * MAX_BITS),
               ast.BitAnd: lambda: a & b, ast.BitOr: lambda: a | b,
               ast.BitXor: lambda: a ^ b}[op]()
    if out.bit_length() > MAX_BITS:
        raise Unsound(f"{ast.unparse(node)} = {out.bit_length()} bits at {env}")
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=_expressions(["i"]), phi=_expressions(["i", "j"]), k=st.integers(1, 40),
       data=st.data())
def test_an_accepted_formula_stays_within_its_bounds_everywhere_in_its_domain(
        h: str, phi: str, k: int, data: st.DataObject) -> None:
    """Soundness of the check: over the domain's corners and random points, an accepted
    formula never needs more than MAX_BITS bits, never divides by 0, never raises, and the
    compiled function computes what the formula says."""
    try:
        f = parse_formulas(f"H={h}; Phi={phi}", k)
    except FormulaError as exc:
        assert "\n" not in str(exc)
        return
    h_tree, phi_tree = ast.parse(f.h, mode="eval"), ast.parse(f.phi, mode="eval")
    key_top, id_top = 2**KEY_BITS - 1, 2**SERVER_ID_BITS - 1
    for i in [0, 1, key_top, data.draw(st.integers(0, key_top))]:
        assert f.request(i) == reference(h_tree, {"i": i})
    for i in [0, 1, id_top, data.draw(st.integers(0, id_top))]:
        for j in {0, k - 1, data.draw(st.integers(0, k - 1))}:
            assert f.virtual(i, j) == reference(phi_tree, {"i": i, "j": j})


# -- plug-ins ------------------------------------------------------------------------------------
def test_the_example_plug_in_is_a_preset_named_by_its_spec(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    preset = resolve_preset("hash_plugin:fnv1a", 9)
    assert isinstance(preset, HashPreset) and preset.name == "hash_plugin:fnv1a"
    from hash_plugin import fnv1a_64  # type: ignore[import-not-found]

    assert preset.request(123456) == fnv1a_64(123456)
    ring = HashRing(512, 9, "hash_plugin:fnv1a")
    for sid in (1, 2, 3):
        ring.add(sid)
    assert {ring.lookup(k) for k in range(100000, 101000)} == {1, 2, 3}
    settings = Settings.from_env({"LB_HASH": "hash_plugin:fnv1a"})
    assert ring_params(settings).hash == "hash_plugin:fnv1a"


def test_a_plug_in_that_cannot_be_used_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad_hashes.py").write_text(textwrap.dedent("""\
        from lb.hashring import HashPreset
        floats = HashPreset("f", lambda i: i / 2, lambda i, j: i + j, "returns floats")
        broken = HashPreset("b", lambda i: 1 // 0, lambda i, j: 0, "raises")
        not_a_preset = 42
    """))
    (tmp_path / "crashes_on_import.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_module_here:x": "cannot import no_such_module_here: ModuleNotFoundError",
        "crashes_on_import:x": "cannot import crashes_on_import: RuntimeError: no config",
        "bad_hashes:missing": "bad_hashes.missing is nothing, not a lb.hashring.HashPreset",
        "bad_hashes:not_a_preset": "is a int, not a lb.hashring.HashPreset",
        "bad_hashes:floats": "request(123456) returned a float, not an int",
        "bad_hashes:broken": "request(123456) raised ZeroDivisionError",
    }
    for spec, what in cases.items():
        with pytest.raises(HashSpecError) as caught:
            resolve_preset(spec, 9)
        assert what in str(caught.value) and "\n" not in str(caught.value)
        with pytest.raises(SettingsError, match="hash plug-in"):
            Settings.from_env({"LB_HASH": spec})
    sys.modules.pop("bad_hashes", None)


# -- the registry remembers its hash map ---------------------------------------------------------
def test_a_registry_written_with_another_hash_is_refused_or_migrated(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry.json"))
    seed = Settings.from_env({}, registry=registry.path)
    ensure_registry(seed, registry)
    before = registry.read()
    handout = Settings.from_env({"LB_HASH": HANDOUT}, registry=registry.path)
    with pytest.raises(HashMapMismatch) as caught:
        ensure_registry(handout, registry)
    message = str(caught.value)
    assert "hash seed" in message and "hash H=i ** 2 + 2 * i + 17" in message
    assert "--keep-registry" in message and "--migrate-hash" in message and "\n" not in message
    assert registry.read().to_dict() == before.to_dict()  # refused: nothing written

    # The same formulas, spaced otherwise, are the same map: no mismatch once migrated.
    migrated = ensure_registry(handout, registry, migrate=True)
    assert migrated.ring == ring_params(handout)
    fresh = initial_state(Settings.from_env({"LB_HASH": "cs60002"}))
    assert [r.slots for r in migrated.replicas] == [r.slots for r in fresh.replicas]
    assert [(r.hostname, r.server_id) for r in migrated.replicas] == [
        (r.hostname, r.server_id) for r in before.replicas]
    respaced = Settings.from_env({"LB_HASH": "H = i**2 + 2*i + 17; Phi = i**2+j**2+2*j+25"},
                                 registry=registry.path)
    assert ensure_registry(respaced, registry).version == migrated.version


def test_migrating_into_a_map_too_small_for_the_replicas_is_refused(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry.json"))
    ensure_registry(Settings.from_env({}, n=6, registry=registry.path), registry)
    small = Settings.from_env({}, n=1, slots=32, virtual=8, registry=registry.path)
    with pytest.raises(HashMapMismatch, match="cannot move to the hash map"):
        ensure_registry(small, registry, migrate=True)
    assert registry.read().ring.slots == 512
