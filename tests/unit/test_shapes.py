"""tests.support.shapes: the shapes of JSON outputs, and their differences (hand-written
expectations), so that the shape tests of ``status``, ``maps`` and ``why`` can fail."""

from __future__ import annotations

import pytest

from tests.support.shapes import differences, shape


def test_shape_keeps_keys_and_types_not_values():
    doc = {"a": 1, "b": 2.5, "c": "x", "d": None, "e": True, "f": [{"g": 1}, {"g": 2}], "h": {}}
    assert shape(doc) == {"a": "number", "b": "number", "c": "str", "d": "null", "e": "bool",
                          "f": ["list", {"g": "number"}], "h": {}}


def test_data_keys_fold_into_one():
    doc = {"10.0.0.1": {"real": "x"}, "fd00::/64": {"real": "y"}, "policy:7": {"real": "z"}}
    assert shape(doc) == {"*": {"real": "str"}}
    assert shape({"held": {"web-1": [1], "web-2": [2]}}, ["held"]) == {"held": {"*": ["list", "number"]}}
    assert shape({"held": {}}, ["held"]) == {"held": {"*": None}}


def test_elements_of_two_shapes_are_alternatives():
    assert shape([1, "x", 2]) == ["list", {"anyOf": ["number", "str"]}]


@pytest.mark.parametrize("got,want,expected", [
    ({"a": 1}, {"a": 2}, []),
    ({"a": 1}, {"a": 1, "b": 1}, ["$: keys missing: b"]),
    ({"a": 1, "b": 1}, {"a": 1}, ["$: keys added: b"]),
    ({"a": "1"}, {"a": 1}, ['$.a: "str" != "number"']),
    ({"a": None}, {"a": "x"}, ['$.a: "null" != "str"']),
    ({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}]}, ["$.a[]: keys missing: c"]),
    ({"a": []}, {"a": [{"b": 1}]}, []),                        # an empty list fits
    ({"a": [1]}, {"a": {"b": 1}}, ['$.a: ["list", "number"] != {"b": "number"}']),
    ({"10.0.0.1": {"x": 1}}, {"10.0.0.2": {"x": 1}, "10.0.0.3": {"x": 2}}, []),
    ({"10.0.0.1": {"y": 1}}, {"10.0.0.2": {"x": 1}}, ["$.*: keys missing: x", "$.*: keys added: y"]),
])
def test_differences(got, want, expected):
    assert differences(shape(got), shape(want)) == expected
