"""Admin request validation, case by case (the contract's strings, then ours)."""

from __future__ import annotations

from typing import Any

import pytest

from lb.admin import ADD_TOO_MANY, RM_TOO_MANY, parse_scale_request
from lb.errors import ApiError


@pytest.mark.parametrize(("body", "expected"), [
    ({"n": 4, "hostnames": ["S5", "S4", "S10", "S11"]}, (4, ["S5", "S4", "S10", "S11"])),
    ({"n": 2, "hostnames": ["S5"]}, (2, ["S5"])),
    ({"n": 2}, (2, [])),
    ({"n": 1, "hostnames": None}, (1, [])),
    ({"n": 1, "hostnames": ["a.b_c-9"]}, (1, ["a.b_c-9"])),
    ({"n": 1, "hostnames": ["x" * 63]}, (1, ["x" * 63])),
])
def test_valid(body: dict[str, Any], expected: tuple[int, list[str]]) -> None:
    assert parse_scale_request(body, ADD_TOO_MANY) == expected


@pytest.mark.parametrize(("body", "message"), [
    ({"n": 1, "hostnames": ["a", "b"]}, ADD_TOO_MANY),
    ({"n": 3, "hostnames": ["a", "b", "c", "d"]}, ADD_TOO_MANY),
    ([1, 2], "Request body must be a JSON object"),
    ("n=1", "Request body must be a JSON object"),
    ({}, "Field 'n' is required"),
    ({"hostnames": ["a"]}, "Field 'n' is required"),
    ({"n": 0}, "Field 'n' must be a positive integer"),
    ({"n": -2}, "Field 'n' must be a positive integer"),
    ({"n": 1.5}, "Field 'n' must be a positive integer"),
    ({"n": 2.0}, "Field 'n' must be a positive integer"),
    ({"n": "2"}, "Field 'n' must be a positive integer"),
    ({"n": True}, "Field 'n' must be a positive integer"),
    ({"n": None}, "Field 'n' must be a positive integer"),
    ({"n": 1, "hostnames": "S5"}, "Field 'hostnames' must be a list of strings"),
    ({"n": 1, "hostnames": [5]}, "Field 'hostnames' must be a list of strings"),
    ({"n": 1, "hostnames": [""]}, "Invalid hostname ''"),
    ({"n": 1, "hostnames": ["-lead"]}, "Invalid hostname '-lead'"),
    ({"n": 1, "hostnames": ["has space"]}, "Invalid hostname 'has space'"),
    ({"n": 1, "hostnames": ["a/b"]}, "Invalid hostname 'a/b'"),
    ({"n": 1, "hostnames": ["x" * 64]}, "Invalid hostname"),
    ({"n": 1, "hostnames": ["naïve"]}, "Invalid hostname 'na\\xef"),
    ({"n": 2, "hostnames": ["S5", "S5"]}, "Hostname 'S5' is given more than once"),
    ({"n": 1, "hostname": ["S5"]}, "Unknown field 'hostname'"),
])
def test_invalid_is_a_400_with_a_clear_message(body: Any, message: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_scale_request(body, ADD_TOO_MANY)
    assert info.value.status == 400
    assert info.value.message.startswith(message)
    assert info.value.body() == {"message": f"<Error> {info.value.message}", "status": "failure"}


def test_rm_has_its_own_contract_string() -> None:
    with pytest.raises(ApiError) as info:
        parse_scale_request({"n": 1, "hostnames": ["a", "b"]}, RM_TOO_MANY)
    assert info.value.body() == {
        "message": "<Error> Length of hostname list is more than removable instances",
        "status": "failure"}
