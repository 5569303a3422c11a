"""Mutation testing of the pure core (``make mutate``, docs/testing.md).

For each target file: copy the repository to ``build/mutate/<name>/`` (mutmut 2.x mutates
files in place, so never in the work tree), run ``mutmut run`` there on that one file
against its fast tests (``TARGETS``), then read the ids and diffs of the surviving mutants.
A survivor listed in ``tests/mutation/equivalents.txt`` (reviewed: file, original line,
mutated line, why it is equivalent) is not counted. Writes ``build/mutate/results.json``
and prints the score table (``--markdown`` for docs/testing.md).

    .venv/bin/python scripts/mutate.py                 # every target, one after another
    .venv/bin/python scripts/mutate.py overlay/guard.py
    .venv/bin/python scripts/mutate.py --report        # the table of the last runs
    .venv/bin/python scripts/mutate.py --jobs 2        # two files at a time (make mutate's default)

Runs with ``nice -n 19`` and one test process per job (``--jobs``): it is CPU-heavy (minutes per file).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "mutate")
EQUIVALENTS = os.path.join(ROOT, "tests", "mutation", "equivalents.txt")
VENV_BIN = os.path.join(ROOT, ".venv", "bin")

U = "tests/unit/"
# Each mutant runs its file's tests in a fresh pytest (-x: the first failure kills it), so the
# fast hand tables go first and pytest's Hypothesis plugin stays off where no test needs it
# (importing Hypothesis is ~1.3 s of CPU a run, most of a run of a hand table).
NO_HYPOTHESIS = "-p no:hypothesispytest"
# Left out of the config files' runs: the fuzz properties (a crash they find is a bug of its
# own, not a mutant's) and the real-process sample; each ran ~4 s a mutant under load.
CONFIG_SLOW = [f"--deselect={U}test_config.py::{t}" for t in (
    "test_config_from_dict_raises_only_invalid_config_error", "test_load_config_on_arbitrary_text",
    "test_cli_process_matches_in_process")]
TARGETS: dict[str, list[str]] = {
    "overlay/guard.py": [U + "test_guard.py", U + "test_agent.py", U + "test_agent_lifecycle.py"],
    "overlay/diff.py": [U + "test_diff.py"],
    "overlay/plan.py": [U + "test_plan_edges.py", U + "test_ownership.py", U + "test_plan.py", U + "test_policy_plan.py"],
    "overlay/policy.py": [U + "test_policy_rules.py", NO_HYPOTHESIS],
    "overlay/model.py": [U + "test_model_rules.py", NO_HYPOTHESIS],
    "overlay/agent.py": [U + "test_agent_status.py", U + "test_agent.py", U + "test_agent_lifecycle.py",
                         U + "test_agent_policies.py"],
    "overlay/config.py": [U + "test_config_reasons.py", U + "test_config_table.py", U + "test_config.py",
                          U + "test_plugins.py", U + "test_neti.py", *CONFIG_SLOW],
    "overlay/config_check.py": [U + "test_config_check.py", U + "test_config_table.py", U + "test_config.py",
                                *CONFIG_SLOW],
    "overlay/datapath/ebpf/codec.py": [U + "test_codec_table.py", U + "test_ebpf_bulk_codec.py", U + "test_ebpf_maps_codec.py",
                                       NO_HYPOTHESIS],
    "overlay/datapath/iptables_rules.py": [U + "test_iptables_rules.py", U + "test_iptables_render.py", NO_HYPOTHESIS],
}
# Minutes of each file's last full run (docs/testing.md, under load): the order of a --jobs run.
MINUTES = {"overlay/datapath/iptables_rules.py": 59, "overlay/model.py": 39, "overlay/policy.py": 34,
           "overlay/config.py": 32, "overlay/guard.py": 23, "overlay/agent.py": 20, "overlay/config_check.py": 13,
           "overlay/plan.py": 11, "overlay/datapath/ebpf/codec.py": 9, "overlay/diff.py": 3}
# A command prefix for the test processes: nice 19, in a session of their own whose scheduler
# autogroup gets nice 19 too (with autogroups on, Debian's default, sessions compete group
# against group whatever each process's nice, so a niced job would not give way to another
# terminal's work); the caller's own session is left as it is.
BACKGROUND = ["sh", "-c", 'echo 19 > /proc/self/autogroup 2>/dev/null; exec nice -n 19 "$@"', "background"]
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", ".mutmut-cache", "__pycache__", "*.egg-info",
                                ".pytest_cache", ".ruff_cache", ".hypothesis", "vagrant")


def equivalents() -> dict[str, list[tuple[str, str, str]]]:
    """file -> [(original line, mutated line, why)] from the reviewed list."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    if not os.path.exists(EQUIVALENTS):
        return out
    with open(EQUIVALENTS, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.rstrip("\n").split("\t")]
            if len(parts) != 4 or not parts[3]:
                sys.exit(f"{EQUIVALENTS}:{n}: expected 'file<TAB>original<TAB>mutated<TAB>why'")
            out.setdefault(parts[0], []).append((parts[1], parts[2], parts[3]))
    return out


def _diff_lines(diff: str) -> tuple[str, str]:
    """The changed line of a one-line mutant's diff: (original, mutated), stripped."""
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(minus), " / ".join(plus)


def _ids(work: str, kind: str) -> list[int]:
    out = subprocess.run([os.path.join(VENV_BIN, "mutmut"), "result-ids", kind], cwd=work,
                         capture_output=True, text=True).stdout.split()
    return [int(x) for x in out if x.isdigit()]


def _work(path: str) -> tuple[str, str]:
    name = path.replace("/", "_").removesuffix(".py")
    return name, os.path.join(OUT, name)


def _runner(path: str) -> str:
    # tests/mutation/exit_status.py: any failure exits 1, the only status mutmut 2 counts as a kill
    # (a mutant that breaks the import of a test module makes pytest exit 2 otherwise)
    return (f"{os.path.join(VENV_BIN, 'python')} -m pytest -x -q -p no:cacheprovider -p no:randomly "
            f"-p tests.mutation.exit_status -o addopts= --timeout=120 {' '.join(TARGETS[path])}")


def _env(work: str) -> dict:
    """Bytecode caches on: pytest keeps the rewritten test modules (compiling them again took
    two thirds of each test run). Safe for the mutated file because :func:`_precompile` made
    its cache hash-checked: Python compares the source's hash, not its mtime and size (two
    mutants of one size written within a second would otherwise share a stale cache)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": work}


def _precompile(work: str) -> None:
    subprocess.run([os.path.join(VENV_BIN, "python"), "-m", "compileall", "-q", "--invalidation-mode",
                    "checked-hash", "overlay"], cwd=work, check=True, stdout=subprocess.DEVNULL)


def run_one(path: str, resume: bool = False) -> dict:
    """One mutmut run of ``path`` in a copy of the tree. ``resume``: keep the last run's cache,
    so its killed mutants stay killed (also slow kills) and mutmut tests the others again
    against the current tests."""
    name, work = _work(path)
    cache = os.path.join(work, ".mutmut-cache")
    kept = os.path.join(OUT, f"{name}.mutmut-cache")
    if resume and os.path.exists(cache):
        shutil.move(cache, kept)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT, work, ignore=IGNORE)
    if resume and os.path.exists(kept):
        shutil.move(kept, cache)
        with sqlite3.connect(cache) as db:
            # a slow kill stays killed; a time-out is tested again (a niced run under load can time out)
            db.execute("UPDATE Mutant SET status = 'ok_killed' WHERE status = 'ok_suspicious'")
    _precompile(work)
    started = datetime.datetime.now(datetime.UTC)
    commit = _commit()   # the tree copied above
    log = os.path.join(OUT, f"{name}.log")
    with open(log, "w", encoding="utf-8") as fh:
        subprocess.run([*BACKGROUND, os.path.join(VENV_BIN, "mutmut"), "run", "--paths-to-mutate", path,
                        "--runner", _runner(path), "--tests-dir", "tests/unit", "--no-progress", "--simple-output"],
                       cwd=work, stdout=fh, stderr=subprocess.STDOUT, env=_env(work), start_new_session=True)
    result = retest_timeouts(path, collect(path, commit, started))
    result["seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds())
    return result


def collect(path: str, commit: str, started: datetime.datetime) -> dict:
    """The counts of the run in ``path``'s work directory (mutmut's cache). A mutant mutmut
    timed out (its tests ran over 10x the unmutated run's time) is not counted as killed:
    under load a niced test run can take that long and still pass, so each one is listed in
    ``timeouts`` for :func:`retest_timeouts` to run again by itself."""
    _name, work = _work(path)
    kinds = {k: _ids(work, k) for k in ("killed", "survived", "timeout", "suspicious", "skipped")}
    survived = [_mutant(work, mid) for mid in kinds["survived"]]
    killed = len(kinds["killed"]) + len(kinds["suspicious"])   # suspicious: failed, only slowly
    out = _score({"file": path, "tests": TARGETS[path], "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                  "commit": commit, "seconds": None}, killed, survived)
    out["timeouts"] = [_mutant(work, mid) for mid in kinds["timeout"]]
    return out


def _mutant(work: str, mid: int) -> dict:
    diff = subprocess.run([os.path.join(VENV_BIN, "mutmut"), "show", str(mid)], cwd=work,
                          capture_output=True, text=True).stdout
    orig, mut = _diff_lines(diff)
    return {"id": mid, "original": orig, "mutated": mut}


def _score(result: dict, killed: int, survived: list[dict]) -> dict:
    """``result`` with the counts: ``survived`` split into the reviewed equivalents and the rest
    (``timeouts`` not tested to the end yet are in neither count)."""
    known = {(o, m): why for o, m, why in equivalents().get(result["file"], [])}
    survivors = [s for s in survived if (s["original"], s["mutated"]) not in known]
    equivalent = [s for s in survived if (s["original"], s["mutated"]) in known]
    counted = killed + len(survivors)
    return result | {
        "mutants": counted + len(equivalent), "killed": killed, "equivalent": len(equivalent),
        "survived": len(survivors), "score": round(100.0 * killed / counted, 1) if counted else None,
        "survivors": survivors, "equivalents": equivalent,
    }


def _alive(path: str, mutants: list[dict]) -> list[dict]:
    """Of ``mutants`` (mutmut ids of ``path``), the ones its tests pass with: each applied by
    itself in the work directory, the test command run under ``nice -n 19`` (up to 15 min:
    longer counts as killed, as a hung test would), the file restored after each."""
    _name, work = _work(path)
    src = os.path.join(work, path)
    with open(src, encoding="utf-8") as fh:
        original = fh.read()
    _precompile(work)

    def passes() -> bool:
        try:
            return subprocess.run([*BACKGROUND, *_runner(path).split()], cwd=work, env=_env(work),
                                  capture_output=True, timeout=900, start_new_session=True).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    if not passes():    # the unmutated file must pass, or every "kill" below would be a lie
        sys.exit(f"mutate: the tests fail on the unmutated {path} in {work}: fix them first")
    alive = []
    for m in mutants:
        subprocess.run([os.path.join(VENV_BIN, "mutmut"), "apply", str(m["id"])], cwd=work, check=True,
                       capture_output=True)
        try:
            if passes():
                alive.append(m)
        finally:
            with open(src, "w", encoding="utf-8") as fh:
                fh.write(original)
    return alive


def retest_timeouts(path: str, result: dict) -> dict:
    """``result`` with its ``timeouts`` run again one at a time with a generous limit: a mutant
    whose tests fail is killed, one whose tests pass is a survivor (or a listed equivalent)."""
    timeouts = result.get("timeouts") or []
    if not timeouts:
        return result | {"timeouts": []}
    alive = _alive(path, timeouts)
    killed_now = len(timeouts) - len(alive)
    out = _score(result, result["killed"] + killed_now, [*result["survivors"], *result["equivalents"], *alive])
    out["timeouts"] = []
    out["timeouts_retested"] = f"{len(timeouts)} timed out under load, tested again by themselves: {killed_now} killed"
    return out


def rerun_survivors(path: str, result: dict) -> dict:
    """Test the survivors (and the equivalents) of the last run of ``path`` again, with the tests
    of the tree now (copied into the work directory): one mutant applied at a time. Far cheaper
    than a whole run after adding the tests that kill a few survivors."""
    _name, work = _work(path)
    shutil.rmtree(os.path.join(work, "tests"))
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(work, "tests"), ignore=IGNORE)
    tested = [*result["survivors"], *result["equivalents"]]
    still = _alive(path, tested)
    killed_now = len(tested) - len(still)
    out = _score(result, result["killed"] + killed_now, still)
    out["rerun"] = (f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}, {_commit()}: "
                    f"{killed_now} of the {len(tested)} survivors killed")
    return out


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "overlay", "tests"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def load_results() -> dict[str, dict]:
    path = os.path.join(OUT, "results.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return {}


def table(results: dict[str, dict], markdown: bool) -> str:
    rows = [results[f] for f in TARGETS if f in results]
    if markdown:
        lines = ["| file | mutants | killed | equivalent | survived | score | run (UTC), commit |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| `{r['file']}` | {r['mutants']} | {r['killed']} | {r['equivalent']} | {r['survived']} | "
                  f"{r['score']}% | {r['date']}, {r['commit']} |" for r in rows]
    else:
        lines = [f"{r['file']:40} {r['score'] if r['score'] is not None else 'n/a':>6}%  killed {r['killed']}/{r['mutants'] - r['equivalent']}"
                 f"  equivalent {r['equivalent']}  ({r['date']}, {r['commit']}, {r['seconds']} s)" for r in rows]
        for r in rows:
            lines += [f"  survived {r['file']} #{s['id']}: {s['original']!r} -> {s['mutated']!r}"
                      for s in r["survivors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help=f"target files (default: all of {', '.join(TARGETS)})")
    ap.add_argument("--report", action="store_true", help="print the table of the last runs, run nothing")
    ap.add_argument("--markdown", action="store_true", help="the table as Markdown (docs/testing.md)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the last run's mutmut cache of each file: its killed mutants stay killed, the "
                         "others are tested again (then every survivor once more, one at a time)")
    ap.add_argument("--survivors", action="store_true",
                    help="test only the last run's survivors again, with the tests as they are now")
    ap.add_argument("--collect", action="store_true",
                    help="read the counts of a run left in build/mutate/ (its mutmut cache); only its "
                         "time-outs are run again, one at a time")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="files run at once, each in its own copy of the tree (default 1; one per core)")
    ap.add_argument("--timeouts", action="store_true",
                    help="the last run of each file again from its mutmut cache, its time-outs tested by themselves")
    args = ap.parse_args(argv)
    unknown = [f for f in args.files if f not in TARGETS]
    if unknown:
        print(f"mutate: not a target: {', '.join(unknown)} (targets: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    os.makedirs(OUT, exist_ok=True)
    results = load_results()
    if not args.report:
        lock = threading.Lock()

        def one(path: str) -> None:
            print(f"==> mutate {path} ({' '.join(TARGETS[path])})", flush=True)
            if args.collect:
                result = retest_timeouts(path, collect(path, _commit(), datetime.datetime.now(datetime.UTC)))
            elif args.timeouts:   # a run of an older mutate.py counted mutmut's time-outs as kills
                last = results[path]
                result = collect(path, last["commit"], datetime.datetime.now(datetime.UTC))
                result = retest_timeouts(path, result | {"date": last["date"], "seconds": last["seconds"]})
            elif args.survivors:
                result = rerun_survivors(path, results[path])
            elif args.resume:
                # mutmut 2's cache looks a mutant up by its line's text: of two identical lines only
                # the first is tested again, so every survivor is tested once more by itself
                result = rerun_survivors(path, run_one(path, resume=True))
            else:
                result = run_one(path)
            with lock:  # each file's result is kept as soon as it is known, whatever runs beside it
                results[path] = result
                with open(os.path.join(OUT, "results.json"), "w", encoding="utf-8") as fh:
                    json.dump(results, fh, indent=1)
                print(table({path: result}, False), flush=True)

        paths = args.files or list(TARGETS)
        missing = [p for p in paths if (args.survivors or args.timeouts) and p not in results]
        if missing:
            print(f"mutate: no run of {', '.join(missing)} to read", file=sys.stderr)
            return 2
        # the longest first (the last run's time here, else MINUTES), so that the jobs end together
        paths.sort(key=lambda p: -(results.get(p, {}).get("seconds") or 60 * MINUTES.get(p, 10)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for fut in [pool.submit(one, p) for p in paths]:
                fut.result()   # a failure of one file's run is raised here, after the others
    print(table(results, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
