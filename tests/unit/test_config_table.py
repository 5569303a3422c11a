"""Every default and every limit of the config, as table rows.

The defaults come from their one source, the frozen dataclasses of ``overlay.config``
(``config_from_dict`` reads its defaults from them), and are checked against the
"type, default" column of docs/config.md, parsed here: the doc is the independent
reference. The limits come from the "Limits" table of docs/config.md: each end is
accepted, one step past it is refused with the key path named, and ``true`` is never
taken for a number."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re

import pytest

from overlay import config as C
from overlay.config import config_from_dict
from overlay.config_neti import NetiConfig
from overlay.errors import InvalidConfigError

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "config.md")
TLS = {"ca": "/c/ca.crt", "cert": "/c/n.crt", "key": "/c/n.key"}


def _doc() -> str:
    with open(DOC, encoding="utf-8") as fh:
        return fh.read()


def _rows(section_title: str) -> list[list[str]]:
    """The table rows (cells) of the section whose heading starts with ``section_title``."""
    text = _doc()
    start = text.index(section_title)
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start:end if end > 0 else None].splitlines():
        if line.startswith("| ") and not line.startswith("| key") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _keys(cell: str) -> list[str]:
    """`a.b.c`, `.d` -> ["a.b.c", "a.b.d"] (a leading dot continues the first key's parent)."""
    out: list[str] = []
    for k in re.findall(r"`([^`]+)`", cell):
        if k.startswith(".") and out:
            k = out[0].rsplit(".", 1)[0] + k
        out.append(k)
    return out


def _token(value: str) -> str:
    value = re.sub(r"\s*\(.*\)$", "", value.strip())   # "432000 (5 days)"
    return value.strip().strip("`")


def doc_defaults() -> dict[str, str]:
    """key -> the default docs/config.md gives for it, as written."""
    out: dict[str, str] = {}
    for cells in _rows("## Keys") + _rows("## The controller's keys"):
        keys = [k for k in _keys(cells[0]) if "*" not in k]
        values: list[str] = []
        marked = re.search(r"`([^`]+)` \(default\)", cells[1])
        if marked:
            values = [marked.group(1)]
        else:
            for part in cells[1].split(";"):
                m = re.search(r"\bdefaults? (?!:)(.*)$", part)
                if m:
                    values.append(m.group(1))
            if len(values) == 1 and "," in values[0] and not values[0].startswith("`["):
                values = values[0].split(", ")
        values = [_token(v) for v in values]
        if len(values) == 1 and len(keys) > 1:
            values = values * len(keys)   # "seconds, default 0" for min_s and max_s
        if values:
            assert len(values) == len(keys), f"docs/config.md: {cells[0]} has {len(values)} defaults"
            out.update(zip(keys, values, strict=True))
    return out


def _walk(cls, prefix: str):
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from _walk(f.default_factory, f"{prefix}{f.name}.")
        elif f.default is not dataclasses.MISSING and f.default is not None and f.name != "options":
            yield f"{prefix}{f.name}", f.default


def code_defaults() -> dict:
    """key -> default, generated from the dataclasses (the one source)."""
    out = dict(_walk(C.Config, ""))
    out |= dict(_walk(C.Discovery, "discovery."))
    out |= dict(_walk(C.ControllerConfig, "controller."))
    # registry.neti is an optional section (off by default): its keys' defaults, without the
    # required vpcflag (a default-less key whose dataclass value is only a placeholder)
    out |= {k: v for k, v in _walk(NetiConfig, "registry.neti.") if k != "registry.neti.vpcflag"}
    out["overlay_subnet"] = C.DEFAULT_SUBNET
    return out


def _as_doc(value) -> str:
    """A default as docs/config.md writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str):
        return f"{value[0]}:{value[1]}"            # status_listen
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


CODE = code_defaults()
DOCUMENTED = doc_defaults()


def test_the_tables_were_read():
    # a parser that reads nothing would make every row below vacuous
    assert len(DOCUMENTED) >= 50 and len(CODE) >= 50
    assert DOCUMENTED["guard.settle_s"] == "2" and DOCUMENTED["datapath.sizes.frag"] == "8192"


@pytest.mark.parametrize("key", sorted(CODE))
def test_every_default_is_documented(key):
    assert key in DOCUMENTED, f"docs/config.md gives no default for {key} (code: {CODE[key]!r})"
    doc = DOCUMENTED[key]
    if key == "nat_overrides":
        assert CODE[key] == () and doc == "{}"
    else:
        assert _as_doc(CODE[key]) == doc, f"{key}: code {CODE[key]!r}, docs/config.md {doc!r}"


def test_every_documented_default_is_a_key():
    assert sorted(set(DOCUMENTED) - set(CODE)) == []


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("key", sorted(CODE))
def test_a_config_without_the_key_gets_the_default(key):
    base = {"node_id": "n1", "network": "ec2", "discovery": {"provider": "aws-imds"},
            "controller": {"tls": TLS}}
    if key.startswith("registry.neti."):     # the optional section, with its required keys only
        base["registry"] = {"backend": "zookeeper", "neti": {"prefix": "/neti", "vpcflag": {"ec2": 0}}}
    cfg = config_from_dict(base)
    got = _get(cfg, key)
    if key == "overlay_subnet":
        assert got == ipaddress.IPv4Network(DOCUMENTED[key])
    else:
        assert got == CODE[key] and type(got) is type(CODE[key])


# --- limits ------------------------------------------------------------------------------


def doc_limits() -> list[tuple[str, str, str]]:
    out = []
    for cells in _rows("## Limits"):
        first = cells[0]
        inner = re.search(r"\((`.*`)\)", first)
        keys = _keys(inner.group(1) if inner and "every duration" in first else first)
        out += [(k, cells[1], cells[2]) for k in keys if k != "datapath.conntrack"]
    return out


LIMITS = doc_limits()


def _with(key: str, value) -> dict:
    d: dict = {"node_id": "n1", "network": "ec2", "throttle": {"max_s": 3600}}
    if key.startswith("controller."):
        d["controller"] = {"tls": TLS}
    if key.startswith("discovery."):
        d["discovery"] = {"provider": "aws-imds"}
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return d


def _accepts(key: str, value) -> None:
    cfg = config_from_dict(_with(key, value))
    assert _get(cfg, key) == value


def _refuses(key: str, value, words: str = "") -> None:
    with pytest.raises(InvalidConfigError) as exc:
        config_from_dict(_with(key, value))
    assert key in str(exc.value) and words in str(exc.value), str(exc.value)


def test_the_limits_table_was_read():
    keys = [k for k, _, _ in LIMITS]
    assert len(keys) == len(set(keys)) >= 35
    assert ("guard.settle_s", "0", "3600") in LIMITS and ("datapath.interface", "1", "15") in LIMITS


@pytest.mark.parametrize("key, lo, hi", [row for row in LIMITS if row[0].endswith("_s")
                                         and not row[0].startswith("datapath.conntrack.")])
def test_durations_take_0_to_3600_seconds(key, lo, hi):
    lo, hi = int(lo), int(hi)
    _accepts(key, lo)
    _accepts(key, float(hi))
    _accepts(key, hi - 0.5)
    _refuses(key, hi + 0.5, f"between {lo} and {hi}")
    _refuses(key, lo - 0.5)
    _refuses(key, True)
    _refuses(key, "5")


@pytest.mark.parametrize("key, lo, hi", [row for row in LIMITS if row[0].startswith(("guard.max", "controller.window",
                                                                                      "controller.limits.", "datapath."))
                                         and row[0] not in ("datapath.interface", "datapath.overlay_device",
                                                            "controller.limits.register_rate")])
def test_integers_take_their_range_and_no_boolean(key, lo, hi):
    lo, hi = int(lo), int(hi)
    _accepts(key, lo)
    _accepts(key, hi)
    _refuses(key, lo - 1, f"between {lo} and {hi}")
    _refuses(key, hi + 1, f"between {lo} and {hi}")
    _refuses(key, True, "integer")
    if lo <= 1:
        _refuses(key, False, "integer")   # False == 0 to Python: still not a number here
    _refuses(key, float(lo) + 0.5, "integer")


def test_register_rate_is_above_0_up_to_its_highest():
    (lo, hi), = [(lo, hi) for k, lo, hi in LIMITS if k == "controller.limits.register_rate"]
    assert lo == "above 0"
    key = "controller.limits.register_rate"
    _accepts(key, 0.001)
    _accepts(key, float(hi))
    for bad in (0, -1, int(hi) + 0.5, True):
        _refuses(key, bad)


@pytest.mark.parametrize("key", ["datapath.interface", "datapath.overlay_device"])
def test_interface_names_take_1_to_15_characters(key):
    assert (key, "1", "15") in LIMITS
    _accepts(key, "a" * 15)
    _accepts(key, "a")
    _refuses(key, "a" * 16, "at most 15 characters")
    _refuses(key, "")
    _refuses(key, "a/b")
    _refuses(key, "a b")


def test_control_socket_takes_at_most_107_bytes():
    assert ("control_socket", "2", "107") in LIMITS
    _accepts("control_socket", "/" + "s" * 106)
    _accepts("control_socket", "/s")
    _refuses("control_socket", "/" + "s" * 107, "107 bytes")
    _refuses("control_socket", "relative.sock", "absolute")


@pytest.mark.parametrize("port, ok", [(1, True), (65535, True), (0, False), (65536, False), (True, False)])
def test_ports_take_1_to_65535(port, ok):
    assert any(k.startswith("ports") or "filter.open_ports" in k for k, _, _ in LIMITS)
    rows = (("filter.open_ports", [port], "filter.open_ports[0]"),
            ("status_listen", f"127.0.0.1:{port}", "status_listen"),
            ("registry.hosts", [f"zk:{port}"], "registry.hosts[0]"))
    for key, value, path in rows:
        if isinstance(port, bool) and key != "filter.open_ports":
            continue
        if ok:
            config_from_dict(_with(key, value))
        else:
            with pytest.raises(InvalidConfigError, match=re.escape(path)):
                config_from_dict(_with(key, value))


# --- values that are not numbers ---------------------------------------------------------


@pytest.mark.parametrize("section", ["auth", "operator"])
def test_a_colon_in_a_digest_user_is_refused(section):
    # a ZooKeeper digest id is "user:hash": a ':' in the user would forge another id
    ok = {"scheme": "digest", "user": "node-1", "password": "pw"}
    assert config_from_dict(_with(f"registry.{section}", ok)).registry.__getattribute__(section).user == "node-1"
    with pytest.raises(InvalidConfigError, match=rf"registry\.{section}\.user: must not contain ':'"):
        config_from_dict(_with(f"registry.{section}", {**ok, "user": "node:1"}))


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None])
def test_reject_all_takes_only_true_or_false(value):
    _refuses("filter.reject_all", value, "true or false")
