"""The shape of a command's JSON output, and the recorded examples it is compared with.

A *shape* keeps the key sets and the value types of a JSON document, recursively, and
drops the values: ``{"a": 1, "b": [{"c": "x"}]}`` has the shape
``{"a": "number", "b": ["list", {"c": "str"}]}``. Where the keys of an object are data
(addresses, CIDRs, ``kind:number`` names, or an object listed in ``data_paths``), they
fold into one key ``"*"`` whose shape is that of all the values; the elements of a list
fold the same way. An empty object of data keys, or an empty list, fits any element
shape (emptiness is a value, not a shape).

The examples are real outputs committed under ``tests/data/shapes/<name>.json``
(tests/data/shapes/README.md says how to record them again when a shape changes on
purpose: ``OVERLAY_RECORD_SHAPES=1``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.support.paths import REPO

SHAPES_DIR = Path(REPO) / "tests" / "data" / "shapes"
RECORD_ENV = "OVERLAY_RECORD_SHAPES"
ANY = "*"
_NAME_KEY = re.compile(r"^[a-z]+:\d+$")


def _is_data_key(key: str) -> bool:
    if _NAME_KEY.match(key):
        return True
    try:
        ipaddress.ip_network(key, strict=False)
    except ValueError:
        return False
    return True


def _merge(a, b):
    """One shape for two elements of a collection (alternatives kept, sorted)."""
    if a == b:
        return a
    alts = []
    for s in (a, b):
        for alt in (s["anyOf"] if isinstance(s, dict) and "anyOf" in s else [s]):
            if alt not in alts:
                alts.append(alt)
    return {"anyOf": sorted(alts, key=lambda s: json.dumps(s, sort_keys=True))}


def _fold(shapes: Iterable):
    out = None
    for s in shapes:
        out = s if out is None else _merge(out, s)
    return out


def shape(value, data_paths: Iterable[str] = (), path: str = ""):
    """The shape of ``value`` (see the module doc). ``data_paths``: dotted paths of
    objects whose keys are data although they do not look like it (``guard.held``)."""
    data_paths = tuple(data_paths)
    if isinstance(value, dict):
        if path in data_paths or (value and all(_is_data_key(k) for k in value)):
            return {ANY: _fold(shape(v, data_paths, f"{path}.*".lstrip(".")) for v in value.values())}
        return {k: shape(v, data_paths, f"{path}.{k}".lstrip(".")) for k, v in value.items()}
    if isinstance(value, list):
        return ["list", _fold(shape(v, data_paths, f"{path}[]") for v in value)]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    raise TypeError(f"{path}: not a JSON value: {value!r}")


def differences(got, want, path: str = "$") -> list[str]:
    """Where shape ``got`` differs from shape ``want``, one line each."""
    if got is None or want is None:  # an empty collection's elements: fits anything
        return []
    if isinstance(want, dict) and isinstance(got, dict):
        if ("anyOf" in want) != ("anyOf" in got):
            return [f"{path}: {json.dumps(got, sort_keys=True)} != {json.dumps(want, sort_keys=True)}"]
        if "anyOf" in want:
            return [] if got == want else [f"{path}: alternatives {got['anyOf']} != {want['anyOf']}"]
        out = []
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing:
            out.append(f"{path}: keys missing: {', '.join(missing)}")
        if extra:
            out.append(f"{path}: keys added: {', '.join(extra)}")
        for k in sorted(set(want) & set(got)):
            out += differences(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        return differences(got[1], want[1], f"{path}[]")
    if got != want:
        return [f"{path}: {json.dumps(got, sort_keys=True)} != {json.dumps(want, sort_keys=True)}"]
    return []


def check_shape(name: str, example, data_paths: Iterable[str] = ()) -> None:
    """Assert that ``example`` (a command's decoded JSON output) has the shape of the
    recorded ``tests/data/shapes/<name>.json``; with ``OVERLAY_RECORD_SHAPES=1`` write
    ``example`` there instead (and skip: a recording run checks nothing)."""
    path = SHAPES_DIR / f"{name}.json"
    if os.environ.get(RECORD_ENV) == "1":
        SHAPES_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(example, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        pytest.skip(f"recorded {path.relative_to(REPO)}")
    assert path.is_file(), f"no recorded example {path} (record it: {RECORD_ENV}=1, tests/data/shapes/README.md)"
    recorded = json.loads(path.read_text(encoding="utf-8"))
    diffs = differences(shape(example, data_paths), shape(recorded, data_paths))
    assert not diffs, (f"the shape of {name} changed (if on purpose, record it again: "
                       "tests/data/shapes/README.md):\n  " + "\n  ".join(diffs))
