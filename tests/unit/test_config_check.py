"""The config reader and its converters (overlay/config_check.py), by hand tables.

Every converter: values it takes (and what it returns) and values it refuses with the
exact reason (the reason is what the operator reads after the key path, DESIGN §4.1a);
the reader (``Section``): key paths, required keys, defaults, unknown keys and nested
sections. The expectations are written out here, not computed by the code under test.
"""

from __future__ import annotations

import pytest

from overlay import config_check as cc
from overlay.errors import InvalidConfigError, InvalidRecord

DIGEST = "ops:" + "A" * 27 + "="          # user, ':' and 28 base64 characters ending in '='

# converter, value, the value it returns
TAKES = [
    (cc.text, "x", "x"),
    (cc.boolean, True, True),
    (cc.boolean, False, False),
    (cc.int_range(0, 10), 0, 0),
    (cc.int_range(0, 10), 10, 10),
    (cc.int_range(-5, -1), -5, -5),
    (cc.seconds, 0, 0.0),
    (cc.seconds, 3600, 3600.0),
    (cc.seconds, 0.5, 0.5),
    (cc.choice("a", "b"), "b", "b"),
    (cc.host_port, "h:1", ("h", 1)),
    (cc.host_port, "[fd00::1]:2181", ("[fd00::1]", 2181)),
    (cc.host_port, "a:b:65535", ("a:b", 65535)),
    (cc.hosts_port, "zk1:2181", "zk1:2181"),
    (cc.zk_prefix, "/overlay", "/overlay"),
    (cc.zk_prefix, "/a/b-1/c.d", "/a/b-1/c.d"),
    (cc.zk_prefix, "/X", "/X"),                   # only '/' is taken off the ends, not the letters
    (cc.zk_prefix, "/a/X", "/a/X"),
    (cc.digest_id, DIGEST, DIGEST),
    (cc.digest_id, "u:" + "+/09azAZ" * 3 + "abc=", "u:" + "+/09azAZ" * 3 + "abc="),
    (cc.listen, "127.0.0.1:0", "127.0.0.1:0"),
    (cc.listen, "127.0.0.1:9470", "127.0.0.1:9470"),
    (cc.listen, "h:0", "h:0"),                    # a one-character host with port 0
    (cc.rate, 100_000, 100_000.0),
    (cc.rate, 0.001, 0.001),
    (cc.rate, 5, 5.0),
    (cc.ifname, "e" * 15, "e" * 15),
    (cc.ifname, "eth0.100", "eth0.100"),
    (cc.socket_path, "/" + "s" * 106, "/" + "s" * 106),
    (cc.abs_path, "/x//y/../z/", "/x/z"),
    (cc.abs_path, "/", "/"),
]


@pytest.mark.parametrize(("conv", "value", "out"), TAKES, ids=[f"{c.__name__}-{v!r}"[:60] for c, v, _ in TAKES])
def test_a_converter_takes(conv, value, out):
    got = conv(value)
    assert got == out and type(got) is type(out)


# converter, value, the exact reason it gives
REFUSES = [
    (cc.text, "", "must be a non-empty string, got str"),
    (cc.text, None, "must be a non-empty string, got null"),
    (cc.text, 5, "must be a non-empty string, got int"),
    (cc.boolean, 1, "must be true or false, got 1"),
    (cc.boolean, "true", "must be true or false, got 'true'"),
    (cc.int_range(0, 10), True, "must be an integer, got True"),
    (cc.int_range(0, 10), 1.0, "must be an integer, got 1.0"),
    (cc.int_range(0, 10), "1", "must be an integer, got '1'"),
    (cc.int_range(0, 10), -1, "must be between 0 and 10, got -1"),
    (cc.int_range(0, 10), 11, "must be between 0 and 10, got 11"),
    (cc.seconds, True, "must be a number of seconds, got True"),
    (cc.seconds, "5", "must be a number of seconds, got '5'"),
    (cc.seconds, -0.1, "must be between 0 and 3600 seconds, got -0.1"),
    (cc.seconds, 3600.5, "must be between 0 and 3600 seconds, got 3600.5"),
    (cc.choice("a", "b"), "c", "'c' is not one of: a, b"),
    (cc.choice("a", "b"), None, "None is not one of: a, b"),
    (cc.host_port, "h", 'expected "host:port", got \'h\''),
    (cc.host_port, 5, 'expected "host:port", got 5'),
    (cc.host_port, ":1", 'expected "host:port", got \':1\''),
    (cc.host_port, "h:", 'expected "host:port", got \'h:\''),
    (cc.host_port, "h:x1", 'expected "host:port", got \'h:x1\''),
    (cc.hosts_port, "h", 'expected "host:port", got \'h\''),
    (cc.zk_prefix, "overlay", "must be an absolute ZooKeeper path like /overlay, got 'overlay'"),
    (cc.zk_prefix, "/overlay/", "must be an absolute ZooKeeper path like /overlay, got '/overlay/'"),
    (cc.zk_prefix, "/a//b", "must be an absolute ZooKeeper path like /overlay, got '/a//b'"),
    (cc.zk_prefix, 5, "must be an absolute ZooKeeper path like /overlay, got 5"),
    (cc.zk_prefix, "/a/b c", "path element 'b c' must be 1-253 characters of letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit"),
    (cc.rate, 0, "must be a number of calls per second in (0, 100000], got 0"),
    (cc.rate, 100_000.5, "must be a number of calls per second in (0, 100000], got 100000.5"),
    (cc.rate, True, "must be a number of calls per second in (0, 100000], got True"),
    (cc.rate, "5", "must be a number of calls per second in (0, 100000], got '5'"),
    (cc.ifname, "e" * 16, "'eeeeeeeeeeeeeeee' is not a valid interface name (at most 15 characters, no '/' or spaces)"),
    (cc.ifname, "a/b", "'a/b' is not a valid interface name (at most 15 characters, no '/' or spaces)"),
    (cc.ifname, "a b", "'a b' is not a valid interface name (at most 15 characters, no '/' or spaces)"),
    (cc.ifname, "a\tb", "'a\\tb' is not a valid interface name (at most 15 characters, no '/' or spaces)"),
    (cc.ifname, "", "must be a non-empty string, got str"),
    (cc.socket_path, "/" + "s" * 107,
     f"must be an absolute path of at most 107 bytes (a unix socket), got {'/' + 's' * 107!r}"),
    (cc.socket_path, "/" + "é" * 54,           # 109 bytes in 55 characters
     f"must be an absolute path of at most 107 bytes (a unix socket), got {'/' + 'é' * 54!r}"),
    (cc.socket_path, "run/s", "must be an absolute path of at most 107 bytes (a unix socket), got 'run/s'"),
    (cc.abs_path, "x/y", "must be an absolute path, got 'x/y'"),
    (cc.abs_path, "/x\0y", "must be an absolute path, got '/x\\x00y'"),
]
DIGEST_REASON = ('expected a ZooKeeper digest id "user:<28 base64 characters>" '
                 "(`overlay zk digest USER` prints one), got ")
REFUSES += [(cc.digest_id, v, DIGEST_REASON + repr(v)) for v in (
    "ops" + "A" * 28,                     # no ':'
    ":" + "A" * 27 + "=",                 # no user
    "ops:" + "A" * 26 + "=",              # 27 characters
    "ops:" + "A" * 28 + "=",              # 29 characters
    "ops:" + "A" * 28,                    # 28 but no '=' at the end
    "ops:" + "A" * 26 + "-=",             # '-' is not base64
    "ops:" + "A" * 26 + " =",
)]
REFUSES.append((cc.listen, ":0", 'expected "host:port", got \':0\''))
REFUSES.append((cc.listen, "h", 'expected "host:port", got \'h\''))


@pytest.mark.parametrize(("conv", "value", "reason"), REFUSES,
                         ids=[f"{c.__name__}-{v!r}"[:60] for c, v, _ in REFUSES])
def test_a_converter_refuses_with_its_reason(conv, value, reason):
    with pytest.raises(ValueError) as info:
        conv(value)
    assert str(info.value) == reason


def test_a_port_out_of_range_is_refused():
    for bad in ("h:0", "h:65536"):
        with pytest.raises(ValueError):
            cc.host_port(bad)


def test_a_colon_in_a_digest_user_is_refused_by_the_converter():
    with pytest.raises(ValueError):
        cc.digest_id("o:ps:" + "A" * 27 + "=")


def test_kind_names_the_type_and_null():
    assert [cc.kind(v) for v in (None, 1, "x", [], {}, True, 1.5)] == ["null", "int", "str", "list", "dict",
                                                                        "bool", "float"]


def test_convert_turns_value_type_and_record_errors_into_one_config_error_with_the_path():
    def raising(exc):
        def conv(_value):
            raise exc
        return conv

    for exc in (ValueError("bad v"), TypeError("bad t"), InvalidRecord("bad r")):
        with pytest.raises(InvalidConfigError) as info:
            cc.convert("a.b", 1, raising(exc))
        assert (info.value.path, info.value.reason) == ("a.b", str(exc))
        assert info.value.__suppress_context__          # `from None`: no chained traceback
    inner = InvalidConfigError("a.b.c", "deeper")
    with pytest.raises(InvalidConfigError) as info:
        cc.convert("a.b", 1, raising(inner))
    assert info.value is inner                          # its own path kept
    with pytest.raises(KeyError):                       # anything else is a bug: not translated
        cc.convert("a.b", 1, raising(KeyError("k")))
    assert cc.convert("a", "7", int) == 7


def test_list_of_names_the_item():
    assert cc.list_of("p", [1, 2], str) == ("1", "2")
    assert cc.list_of("p", [], str) == ()
    with pytest.raises(InvalidConfigError) as info:
        cc.list_of("p", ["1", 2, "x"], cc.int_range(0, 9))
    assert (info.value.path, info.value.reason) == ("p[0]", "must be an integer, got '1'")
    with pytest.raises(InvalidConfigError) as info:
        cc.list_of("p", [1, 2, "x"], cc.int_range(0, 9))
    assert info.value.path == "p[2]"
    for not_list in ((1,), "ab", None, {"a": 1}):
        with pytest.raises(InvalidConfigError) as info:
            cc.list_of("p", not_list, str)
        assert (info.value.path, info.value.reason) == ("p", f"must be a list, got {cc.kind(not_list)}")


def test_controllers_one_or_a_list_without_repeats():
    assert cc.controllers("c", "a:1") == ("a:1",)
    assert cc.controllers("c", ["a:1", "b:2"]) == ("a:1", "b:2")
    cases = [
        ("a", "c", 'expected "host:port", got \'a\''),
        ([], "c", 'must name at least one controller ("host:port")'),
        (["a:1", "b:2", "a:1"], "c[2]", "'a:1' is listed twice"),
        (["a:1", "a:1"], "c[1]", "'a:1' is listed twice"),
        (["a:1", "x"], "c[1]", 'expected "host:port", got \'x\''),
        (5, "c", "must be a list, got int"),
    ]
    for value, path, reason in cases:
        with pytest.raises(InvalidConfigError) as info:
            cc.controllers("c", value)
        assert (info.value.path, info.value.reason) == (path, reason), value


def test_zk_prefix_elements_must_be_names():
    with pytest.raises(ValueError):
        cc.zk_prefix("/a/b c")
    with pytest.raises(ValueError):
        cc.zk_prefix("/")


# --- the reader --------------------------------------------------------------------------


def test_a_section_reads_keys_with_paths_and_defaults():
    s = cc.Section({"a": 1, "b": "x", "sub": {"c": 2}}, "top")
    assert s.path == "top" and s.sub("k") == "top.k"
    assert cc.Section({}, "").sub("k") == "k"                  # the root: no leading dot
    assert s.has("a") and not s.has("zz")
    assert s.get("a", cc.int_range(0, 5)) == 1
    assert s.get("a", cc.int_range(0, 5), default=4) == 4      # popped: read once
    assert s.get("missing", str) is None
    assert s.get("missing", str, default="d") == "d"
    inner = s.section("sub")
    assert inner.path == "top.sub" and inner.get("c", int) == 2
    inner.done()
    empty = s.section("nothing")
    assert empty.path == "top.nothing" and empty.get("x", str, "dflt") == "dflt"
    assert s.rest() == {"b": "x"} and s.rest() == {}
    s.done()                                                    # nothing left: no error


def test_a_section_names_the_key_path_of_each_error():
    s = cc.Section({"n": "x"}, "guard")
    with pytest.raises(InvalidConfigError) as info:
        s.get("n", cc.int_range(0, 5))
    assert (info.value.path, info.value.reason) == ("guard.n", "must be an integer, got 'x'")
    with pytest.raises(InvalidConfigError) as info:
        s.get("need", str, required=True)
    assert (info.value.path, info.value.reason) == ("guard.need", "is required")
    assert cc.Section({"opt": 1}, "g").get("opt", int, required=True) == 1


def test_a_section_must_be_a_mapping():
    assert cc.Section(None, "g").rest() == {}
    for bad, shown in (([1], "list"), ("x", "str"), (5, "int")):
        with pytest.raises(InvalidConfigError) as info:
            cc.Section(bad, "g.h")
        assert (info.value.path, info.value.reason) == ("g.h", f"must be a mapping, got {shown}")
    with pytest.raises(InvalidConfigError) as info:
        cc.Section([], "")
    assert info.value.path == "<top>"


def test_a_section_refuses_what_is_left_naming_a_near_key():
    s = cc.Section({"max_chnge": 3}, "guard")
    assert s.get("max_change", int) is None
    assert s.has("settle_s") is False
    with pytest.raises(InvalidConfigError) as info:
        s.done()
    assert (info.value.path, info.value.reason) == ("guard.max_chnge", "unknown key (did you mean max_change?)")
    s = cc.Section({"zzz": 1}, "")
    s.section("filter")
    with pytest.raises(InvalidConfigError) as info:
        s.done()
    assert (info.value.path, info.value.reason) == ("zzz", "unknown key")
    s = cc.Section({"filtr": {}}, "")
    s.section("filter")                  # asked for through section(): a known key
    with pytest.raises(InvalidConfigError) as info:
        s.done()
    assert info.value.reason == "unknown key (did you mean filter?)"
    s = cc.Section({"ab": 1}, "")
    s.has("abc")                         # asked for through has(): a known key
    with pytest.raises(InvalidConfigError) as info:
        s.done()
    assert info.value.reason == "unknown key (did you mean abc?)"
    s = cc.Section({5: 1}, "x")
    with pytest.raises(InvalidConfigError) as info:
        s.done()
    assert info.value.path == "x.5"


def test_the_section_copies_its_mapping():
    src = {"a": 1}
    s = cc.Section(src, "")
    s.get("a", int)
    assert src == {"a": 1}


def test_the_limits():
    assert (cc.MAX_SECONDS, cc.IFNAME_MAX) == (3600, 15)
