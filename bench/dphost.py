"""Holds one datapath inside a client namespace, driven by JSON lines on stdin.

Run by the orchestrator as ``nsenter --net=... python -m bench.dphost``; each
request is one JSON line, each answer one JSON line (``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``). It keeps what an agent keeps: the nodes,
the desired tables and its copy of what the datapath holds, so a change
costs what it costs the daemon. Times are ``time.perf_counter`` around
``datapath.apply(ops)`` unless named otherwise.

Requests:
  {"cmd": "start", "backend": "ebpf"|"iptables", "interface", "private", "pin_root", "sizes",
   "filter"}                                       (filter: the config's filter section)
  {"cmd": "program", "n": N, "target_real": ip}   plan N peers, diff, apply (from whatever is there)
  {"cmd": "clear"}                                 remove every peer (apply the deletes)
  {"cmd": "full_sync", "n": N, "target_real": ip, "reps": R}   R x (clear, then timed program)
  {"cmd": "update_one", "reps": R}                 R timed one-peer changes among the N
  {"cmd": "update_one_maps", "reps": R}            the same, written straight into the maps (ebpf)
  {"cmd": "plan_diff", "reps": R}                  R x plan + diff of one change (the agent's O(N) part)
  {"cmd": "prog_stats_begin"} / {"cmd": "prog_stats_end"}   tc programs' run time in between (ebpf)
  {"cmd": "memory"}                                RSS, kernel memory of our cgroup, map memlock
  {"cmd": "counters"}                              the datapath's counters (packets by reason)
  {"cmd": "teardown"} / {"cmd": "quit"}
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
import traceback

from bench import peers as fleetlib

log = logging.getLogger("bench.dphost")


# -- memory readings ------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cgroup_kmem_file() -> tuple[str, str] | None:
    """Where the kernel memory charged to this process's memory cgroup is read:
    ("v1", memory.kmem.usage_in_bytes) or ("v2", memory.stat)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            p = f"/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes"
            if os.path.exists(p):
                return "v1", p
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and controllers == "":
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                p = f"{root}{path}/memory.stat"
                if os.path.exists(p):
                    return "v2", p
    return None


def kernel_memory() -> dict:
    """Kernel memory charged to our cgroup (kmem), else the machine's slab."""
    where = _cgroup_kmem_file()
    if where is not None:
        kind, path = where
        with open(path) as f:
            text = f.read()
        if kind == "v1":
            return {"method": "cgroup-v1 memory.kmem.usage_in_bytes", "bytes": int(text.strip())}
        stat = dict(line.split() for line in text.splitlines() if line.count(" ") == 1)
        if "kernel" in stat:
            return {"method": "cgroup-v2 memory.stat kernel", "bytes": int(stat["kernel"])}
        return {"method": "cgroup-v2 memory.stat slab+percpu",
                "bytes": int(stat.get("slab", 0)) + int(stat.get("percpu", 0))}
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return {"method": "/proc/meminfo Slab+Percpu (machine-wide)",
            "bytes": info.get("Slab", 0) + info.get("Percpu", 0)}


def fd_memlock(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def pinned_map_memlock(pin_dir: str) -> dict[str, dict]:
    """memlock (bytes) and geometry of every map pinned in ``pin_dir``."""
    from overlay.datapath.ebpf import bpfsys

    out = {}
    for name in sorted(os.listdir(pin_dir)):
        path = os.path.join(pin_dir, name)
        try:
            fd = bpfsys.obj_get(path)
        except Exception:  # a program pin, or gone
            continue
        try:
            try:
                info = bpfsys.map_info(fd)
            except Exception:
                continue
            out[name] = {"memlock": fd_memlock(fd), "max_entries": info.max_entries,
                         "key_size": info.key_size, "value_size": info.value_size,
                         "type": info.type}
        finally:
            bpfsys.close(fd)
    return out


def _fdinfo_fields(fd: int, names: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in names:
                out[key] = int(value.split()[0])
    return out


class ProgStats:
    """Run time of our tc programs (``run_time_ns`` / ``run_cnt`` in the program fds'
    fdinfo), counted only while a BPF_ENABLE_STATS fd is open: the kernel stops
    counting when it is closed, or when this process dies."""

    PROGS = ("prog_overlay_egress", "prog_egress", "prog_ingress")

    def __init__(self, pin_dir: str):
        import ctypes

        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_enable_stats.argtypes = [ctypes.c_int]
        lib.bpf_enable_stats.restype = ctypes.c_int
        fd = lib.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME
        if fd < 0:
            raise OSError(-fd, "bpf_enable_stats")
        self.stats_fd = fd
        self.pin_dir = pin_dir
        self.start = self._read()

    def _read(self) -> dict[str, dict[str, int]]:
        from overlay.datapath.ebpf import bpfsys

        out = {}
        for name in self.PROGS:
            fd = bpfsys.obj_get(os.path.join(self.pin_dir, name))
            try:
                out[name] = _fdinfo_fields(fd, ("run_time_ns", "run_cnt"))
            finally:
                bpfsys.close(fd)
        return out

    def finish(self) -> dict[str, dict[str, float]]:
        try:
            end = self._read()
        finally:
            os.close(self.stats_fd)
        out = {}
        for name in self.PROGS:
            runs = end[name].get("run_cnt", 0) - self.start[name].get("run_cnt", 0)
            ns = end[name].get("run_time_ns", 0) - self.start[name].get("run_time_ns", 0)
            out[name] = {"runs": runs, "ns_per_run": ns / runs if runs else 0.0}
        return out


def ipset_size_in_memory(name: str = "OVERLAY-PEERS") -> int | None:
    proc = subprocess.run(["ipset", "list", "-t", name], capture_output=True, text=True,
                          timeout=30)
    for line in proc.stdout.splitlines():
        if line.startswith("Size in memory:"):
            return int(line.split(":")[1])
    return None


# -- the host -------------------------------------------------------------------------------


class Host:
    def __init__(self):
        self.dp = None
        self.backend = None
        self.cfg = None
        self.me = None
        self.nodes: list = []
        self.desired = None
        self.observed: dict | None = None
        self.moved_away = False
        self.args: dict = {}
        self.stats: ProgStats | None = None

    # plumbing

    def _plan(self, nodes):
        from overlay.plan import plan

        return plan(self.me, nodes, self.cfg)

    def _apply(self, ops) -> float:
        from overlay.diff import apply_ops

        t0 = time.perf_counter()
        if ops:
            self.dp.apply(ops)
        dt = time.perf_counter() - t0
        apply_ops(self.observed, ops)
        return dt * 1000.0

    # requests

    def start(self, a: dict) -> dict:
        from overlay.backends import create_datapath as create
        from overlay.config import config_from_dict
        from overlay.model import Node

        self.args = a
        self.backend = a["backend"]
        cfg = fleetlib.config_dict(self.backend, a["interface"], a["private"], a.get("pin_root"),
                                   a.get("sizes"))
        if a.get("filter"):  # e.g. a server filtering: {"reject_all": true} (its client a member)
            cfg["filter"] = a["filter"]
        self.cfg = config_from_dict(cfg)
        c = self.cfg
        self.me = Node(c.node_id, c.network, c.addresses.private, c.addresses.public,
                       c.addresses.overlay)
        t0 = time.perf_counter()
        self.dp = create(self.backend, interface=a["interface"],
                         overlay_subnet=str(c.overlay_subnet), self_private=c.addresses.private,
                         self_overlay=c.addresses.overlay, sizes=c.datapath.sizes,
                         pin_root=c.datapath.pin_root, overlay_device=c.datapath.overlay_device,
                         **({"mode": a["mode"], "cgroup": a["cgroup"]} if a.get("mode") else {}))
        self.dp.start()
        start_s = time.perf_counter() - t0
        self.observed = self.dp.observe()
        # the fixed part of the state (failsafe, config) first, as the daemon's first apply does
        ops = self._diff(self._plan([]).tables)
        self._apply(ops)
        return {"start_s": start_s, "pid": os.getpid()}

    def _diff(self, tables):
        from overlay.diff import diff

        return diff(tables, self.observed)

    def program(self, a: dict) -> dict:
        t0 = time.perf_counter()
        self.nodes = fleetlib.fleet(a["n"], a["target_real"])
        self.moved_away = False
        self.desired = self._plan(self.nodes)
        t1 = time.perf_counter()
        ops = self._diff(self.desired.tables)
        t2 = time.perf_counter()
        ms = self._apply(ops)
        return {"ms": ms, "ops": len(ops), "plan_ms": (t1 - t0) * 1000, "diff_ms": (t2 - t1) * 1000}

    def clear(self, a: dict | None = None) -> dict:
        self.nodes = []
        self.desired = self._plan([])
        ops = self._diff(self.desired.tables)
        return {"ms": self._apply(ops), "ops": len(ops)}

    def full_sync(self, a: dict) -> dict:
        times, ops = [], 0
        for _ in range(a["reps"]):
            self.clear()
            gc.collect()
            res = self.program(a)
            times.append(res["ms"])
            ops = res["ops"]
        return {"ms": times, "ops": ops}

    def _one_change(self):
        """Ops moving one peer (in the middle of the fleet) away, or back."""
        from overlay.diff import diff
        from overlay.ops import NatEntry, PeerEntry

        n = len(self.nodes)
        if n < 2:
            raise ValueError("update_one needs at least 2 peers")
        i = (n - 1) // 2
        old = self.nodes[i]
        new = fleetlib.moved(old, i, away=not self.moved_away)

        def tables(node):
            return {"nat": {node.overlay: NatEntry(node.private)},
                    "peers": {node.private: PeerEntry()}}

        ops = diff(tables(new), tables(old))
        return i, new, ops

    def update_one(self, a: dict) -> dict:
        times = []
        for _ in range(a["reps"]):
            i, new, ops = self._one_change()
            times.append(self._apply(ops))
            self.nodes[i] = new
            self.moved_away = not self.moved_away
        return {"ms": times, "ops": len(ops)}

    def update_one_maps(self, a: dict) -> dict:
        """The same change written straight into the eBPF maps, one syscall per op:
        the kernel's share of update_one, without ``MapSet.apply``'s capacity
        check (which lists every key of the maps it writes)."""
        from overlay.datapath.ebpf import bpfsys
        from overlay.datapath.ebpf.maps import raw_op
        from overlay.diff import apply_ops

        if self.backend != "ebpf":
            raise ValueError("update_one_maps is for the ebpf backend")
        maps = self.dp.maps
        layout = maps.nat_layout()
        times = []
        for _ in range(a["reps"]):
            i, new, ops = self._one_change()
            t0 = time.perf_counter()
            for op in ops:
                name, key, value = raw_op(op, layout)
                info, fd = maps.info(name), maps.fd(name)
                if value is None:
                    bpfsys.delete(fd, key, info.key_size)
                else:
                    bpfsys.update(fd, key, value, info.key_size, info.value_size)
            times.append((time.perf_counter() - t0) * 1000.0)
            apply_ops(self.observed, ops)
            self.nodes[i] = new
            self.moved_away = not self.moved_away
        return {"ms": times, "ops": len(ops)}

    def plan_diff(self, a: dict) -> dict:
        """What the agent spends per change before the datapath: plan over all N
        peers, diff against its copy of the datapath state (no apply)."""
        times = []
        for _ in range(a["reps"]):
            i, new, _ops = self._one_change()
            nodes = list(self.nodes)
            nodes[i] = new
            t0 = time.perf_counter()
            desired = self._plan(nodes)
            ops = self._diff(desired.tables)
            times.append((time.perf_counter() - t0) * 1000)
            if len(ops) != len(_ops):
                raise RuntimeError(f"plan+diff gave {len(ops)} ops, expected {len(_ops)}")
        return {"ms": times}

    def memory(self, a: dict | None = None) -> dict:
        gc.collect()
        out = {"rss": rss_bytes(), "kmem": kernel_memory(), "peers": len(self.nodes)}
        if self.backend == "ebpf":
            out["maps"] = pinned_map_memlock(self.dp.pin_dir)
        elif self.backend == "iptables":
            out["ipset_bytes"] = ipset_size_in_memory()
        return out

    def prog_stats_begin(self, a: dict | None = None) -> dict:
        if self.backend != "ebpf":
            raise ValueError("prog_stats is for the ebpf backend")
        self.stats = ProgStats(self.dp.pin_dir)
        return {}

    def prog_stats_end(self, a: dict | None = None) -> dict:
        stats, self.stats = self.stats, None
        return {"progs": stats.finish()}

    def counters(self, a: dict | None = None) -> dict:
        return {"counters": dict(self.dp.counters())}

    def teardown(self, a: dict | None = None) -> dict:
        if self.dp is not None:
            self.dp.teardown()
            self.dp = None
        return {}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s dphost %(name)s: %(message)s")
    host = Host()
    handlers = {
        "start": host.start, "program": host.program, "clear": host.clear,
        "full_sync": host.full_sync, "update_one": host.update_one,
        "plan_diff": host.plan_diff,
        "update_one_maps": host.update_one_maps, "prog_stats_begin": host.prog_stats_begin,
        "prog_stats_end": host.prog_stats_end, "memory": host.memory, "teardown": host.teardown,
        "counters": host.counters,
    }
    print(json.dumps({"ok": True, "ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            print(json.dumps({"ok": True}), flush=True)
            break
        try:
            out = handlers[cmd](req)
            print(json.dumps({"ok": True, **out}), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc()}), flush=True)
    if host.dp is not None:
        host.dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
