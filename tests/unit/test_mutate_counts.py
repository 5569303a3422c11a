"""How `make mutate` counts (scripts/mutate.py): what is a kill, what a survivor, what is
left out as a reviewed equivalent, and that a mutmut time-out is never counted as a kill
before it was tested again by itself. The expected counts are worked out by hand."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate_script", os.path.join(ROOT, "scripts", "mutate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def m(mid: int, original: str = "x = 1", mutated: str = "x = 2") -> dict:
    return {"id": mid, "original": original, "mutated": mutated}


@pytest.fixture
def listed(mutate, monkeypatch):
    """One reviewed equivalent of overlay/diff.py: original 'a | b', mutated 'a & b'."""
    monkeypatch.setattr(mutate, "equivalents", lambda: {"overlay/diff.py": [("a | b", "a & b", "why")]})


def test_the_diff_of_a_one_line_mutant_gives_its_two_lines(mutate):
    diff = "--- overlay/diff.py\n+++ overlay/diff.py\n@@ -3,1 +3,1 @@\n-    x = a + 1\n+    x = a - 1\n"
    assert mutate._diff_lines(diff) == ("x = a + 1", "x = a - 1")


def test_equivalents_are_neither_kills_nor_survivors(mutate, listed):
    r = mutate._score({"file": "overlay/diff.py"}, 8, [m(1), m(2, "a | b", "a & b")])
    # 8 killed + 1 survivor counted; the listed one apart: 8 / 9
    assert (r["mutants"], r["killed"], r["survived"], r["equivalent"], r["score"]) == (10, 8, 1, 1, 88.9)
    assert [s["id"] for s in r["survivors"]] == [1] and [s["id"] for s in r["equivalents"]] == [2]


def test_a_list_of_another_file_does_not_count(mutate, listed):
    r = mutate._score({"file": "overlay/plan.py"}, 3, [m(2, "a | b", "a & b")])
    assert (r["killed"], r["survived"], r["equivalent"], r["score"]) == (3, 1, 0, 75.0)


def test_time_outs_count_only_after_they_were_tested_again(mutate, listed, monkeypatch):
    first = mutate._score({"file": "overlay/diff.py"}, 5, [m(1)]) | {"timeouts": [m(7), m(8), m(9, "a | b", "a & b")]}
    # before the re-test: 5 killed, 1 survivor (5 / 6), the three time-outs in no count
    assert (first["killed"], first["survived"], first["score"]) == (5, 1, 83.3)
    tested = []

    def alive(path, mutants):   # 7 still fails its tests (killed); 8 and 9 pass (alive)
        tested.append((path, [x["id"] for x in mutants]))
        return [x for x in mutants if x["id"] != 7]

    monkeypatch.setattr(mutate, "_alive", alive)
    r = mutate.retest_timeouts("overlay/diff.py", first)
    assert tested == [("overlay/diff.py", [7, 8, 9])]
    # 6 killed; survivors 1 and 8; 9 is the listed equivalent: 6 / 8
    assert (r["killed"], r["survived"], r["equivalent"], r["score"], r["timeouts"]) == (6, 2, 1, 75.0, [])
    assert sorted(s["id"] for s in r["survivors"]) == [1, 8]
    assert r["timeouts_retested"] == "3 timed out under load, tested again by themselves: 1 killed"


def test_no_time_outs_no_re_test(mutate, monkeypatch):
    monkeypatch.setattr(mutate, "_alive", lambda *a: pytest.fail("nothing to test again"))
    r = mutate.retest_timeouts("overlay/diff.py", {"killed": 3, "survivors": [], "equivalents": [], "timeouts": []})
    assert r["timeouts"] == [] and r["killed"] == 3
