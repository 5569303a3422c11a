"""What the reliability suite (tests/reliability) shares: durations, lab topologies, and a
watcher that records every moment a daemon applied fewer peers than it should.

Durations: the CI variant by default; ``--soak-long`` (or ``OVERLAY_SOAK_LONG=1``) runs
the longer ones.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass, field

import yaml

from overlay.lab.topology import default_topology_path
from tests.support.daemons import statuses


@dataclass(frozen=True)
class Durations:
    daemon_stopped_s: float      # test 1
    controllers_down_s: float    # test 4
    churn_s: float               # test 5

    @classmethod
    def pick(cls, long: bool) -> Durations:
        return cls(900.0, 600.0, 600.0) if long else cls(300.0, 120.0, 120.0)


def soak_long(config) -> bool:
    return bool(config.getoption("--soak-long", default=False)) or os.environ.get("OVERLAY_SOAK_LONG") == "1"


def topology_file(path: str, *, ensemble: int = 1, lease_s: float | None = None,
                  extra_vpc: tuple[dict, ...] = (), drop_ec2: tuple[str, ...] = ()) -> str:
    """The default lab topology with a ZooKeeper ``ensemble``, the controllers' ``lease_s``,
    more vpc members and fewer ec2 ones; written to ``path``."""
    with open(default_topology_path(), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw = copy.deepcopy(raw)
    raw["zookeeper"]["ensemble"] = ensemble
    if lease_s is not None:
        raw.setdefault("controller", {})["lease_s"] = lease_s
    nets = {n["name"]: n for n in raw["networks"]}
    nets["ec2"]["hosts"] = [h for h in nets["ec2"]["hosts"] if h["name"] not in drop_ec2]
    nets["vpc"]["hosts"] = [*nets["vpc"]["hosts"][:-1], *extra_vpc, nets["vpc"]["hosts"][-1]]
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    return path


@dataclass
class PeerWatch:
    """Polls the ``/status`` of every daemon in ``netns`` (name -> namespace) every
    ``interval`` seconds; a daemon that answers must have applied (peers with) every
    overlay address in ``expected[name]``. Each shortfall is recorded in ``violations``
    as ``(t, name, missing overlays)``; daemons that do not answer are passed over, and
    those in ``skip`` (known to be stopped) not even asked."""

    netns: dict[str, str]
    expected: dict[str, set[str]]
    interval: float = 1.0
    violations: list[tuple[float, str, list[str]]] = field(default_factory=list)
    polls: int = 0
    skip: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PeerWatch:
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            names = [n for n in self.netns if n not in self.skip]
            for name, s in zip(names, statuses([self.netns[n] for n in names], timeout=1.0), strict=True):
                if s is None:
                    continue
                have = {p.get("overlay") for p in s.get("peers", [])}
                missing = sorted(self.expected[name] - have)
                if missing:
                    self.violations.append((time.monotonic(), name, missing))
            self.polls += 1
            self._stop.wait(self.interval)
