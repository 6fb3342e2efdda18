"""The sticky key from a query parameter (``LB_HASH_KEY=query:NAME``): ``lb.routing.query_value``
gives exactly what werkzeug's ``request.args.get(NAME)`` gives (the threads path's key), however
the name is spelt in the query, for short queries and long ones alike."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers
from werkzeug.sansio.request import Request

from lb.routing import SCANNED_PARAMETERS, query_value, request_key


def werkzeug_value(query: str, name: str) -> str | None:
    """``request.args.get(name)`` for a request whose query string is ``query`` (as the WSGI
    environ holds it: the request's bytes as latin-1)."""
    request = Request("GET", "http", None, "", "/", query.encode("latin-1"), Headers(), None)
    return request.args.get(name)


HEX = "0123456789abcdefABCDEF"
# Names an operator might choose, and some no one would (escapes, separators, non-ASCII).
NAMES = st.one_of(
    st.sampled_from(["", "id", "user", "a", "a b", "%", "%FF", "%C3%A9", "%2", "+", "&", "=", "é",
                     "ü%41", " "]),
    st.text(alphabet="ab %+=&Fé9", min_size=1, max_size=4),
)


@st.composite
def spellings(draw: st.DrawFn, name: str) -> str:
    """``name`` as a client could send it: each character as itself, escaped (hex in either
    case) or, for a space, as ``+``; sometimes broken on purpose."""
    out = []
    for char in name:
        raw = char.encode("utf-8")
        escaped = "".join(f"%{b:02X}" for b in raw)
        forms = [escaped, escaped.lower()]
        if char == " ":
            forms.append("+")
        if char.isascii() and char not in "&=+":
            forms.append(char)
        out.append(draw(st.sampled_from(forms)))
    spelt = "".join(out)
    if draw(st.booleans()):  # a near miss: one character more or fewer
        spelt = draw(st.sampled_from([spelt[:-1], spelt + "a", spelt + "%", "%" + spelt]))
    return spelt


@st.composite
def queries(draw: st.DrawFn) -> tuple[str, str]:
    """A name and a query of up to 3 x SCANNED_PARAMETERS parameters: some the name spelt
    some way, the rest noise (escapes, separators, empty parameters, no "=")."""
    name = draw(NAMES)
    noise = st.text(alphabet=HEX + "%+=&xau ", max_size=8)
    parts = draw(st.lists(
        st.one_of(
            noise,
            st.tuples(spellings(name), st.sampled_from(["=", ""]), noise).map("".join),
        ),
        max_size=3 * SCANNED_PARAMETERS))
    return "&".join(parts), name


@settings(max_examples=3000, deadline=None)
@given(queries())
@example(("%61=1&a=2", "a"))
@example(("%ff=1&%25FF=2", "%FF"))
@example(("%c3%a9=1&%25C3%25A9=2", "%C3%A9"))
@example(("%C3%A9=1&%25C3%25A9=2", "%C3%A9"))
@example(("&&=1", ""))
@example(("a+b=c+d&a%20b=e", "a b"))
@example(("id=%ff%41+x", "id"))
def test_the_value_is_werkzeugs(case: tuple[str, str]) -> None:
    query, name = case
    assert query_value(query, name) == werkzeug_value(query, name)


@settings(max_examples=500, deadline=None)
@given(queries(), st.integers(min_value=SCANNED_PARAMETERS, max_value=40))
@example(("&=1&=2", ""), SCANNED_PARAMETERS)
def test_many_parameters_before_it_change_nothing(case: tuple[str, str], padding: int) -> None:
    """The same query behind enough other parameters to be searched, not scanned."""
    query, name = case
    padded = "&".join(["%61=", "%62", "z=%7A"] * padding) + "&" + query
    assert query_value(padded, name) == werkzeug_value(padded, name)


@pytest.mark.parametrize("query", [
    "&".join(["%61="] * 1000),  # the review's query: a thousand names to decode
    "&".join(["%69%64x="] * 700),  # near misses of "id", each matching its first two characters
    "&".join(["idx=1"] * 800),
])
def test_hostile_queries_before_the_key_still_find_it(query: str) -> None:
    assert query_value(query, "id") is None
    assert query_value(query + "&i%64=42&id=7", "id") == "42"
    assert query_value(query + "&i%64=42&id=7", "id") == werkzeug_value(query + "&i%64=42", "id")


def test_the_same_user_gets_the_same_key_however_the_name_is_spelt() -> None:
    def key(query: str) -> int:
        return request_key("query:user", lambda n: None, lambda n: query_value(query, n), None)

    spelt = ("user=alice", "%75ser=alice", "x=1&%75%73%65%72=alice&user=bob",
             "&".join(["%61="] * 50) + "&user=alice")
    assert len({key(query) for query in spelt}) == 1


@pytest.mark.parametrize("raw", ["é=1&id=2".encode(), "id=ü".encode(), b"\xff=1&id=3"])
def test_a_query_that_is_not_ascii_is_read_as_werkzeug_reads_it(raw: bytes) -> None:
    """Not from the async path (llhttp refuses such a target), but the same answer anyway:
    the request's bytes (latin-1 in the environ) read as UTF-8; None where werkzeug fails."""
    query = raw.decode("latin-1")
    for name in ("id", "é"):
        try:
            expected = werkzeug_value(query, name)
        except UnicodeDecodeError:  # werkzeug cannot read bytes that are not UTF-8
            expected = None
        assert query_value(query, name) == expected
