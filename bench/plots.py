"""PNG plots of a results file (matplotlib, Agg backend: no display needed).

One figure per suite, ``<dir>/<suite>.png``: the median of each backend
against the peer count, with min..max as error bars; ``bare`` (no peers) is
a horizontal line with its min..max band.
"""

from __future__ import annotations

import os

COLORS = {"bare": "#444444", "iptables": "#d62728", "ebpf-tc": "#1f77b4", "core": "#2ca02c",
          "dryrun": "#1f77b4"}


def _series(rows, suite, backend, metric):
    pts = sorted((r["peers"], r["value"], r.get("min", r["value"]), r.get("max", r["value"]))
                 for r in rows
                 if (r["suite"], r["backend"], r["metric"]) == (suite, backend, metric))
    return pts


def _errorbar(ax, pts, label, color, marker="o", ls="-"):
    if not pts:
        return
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    lo = [max(0.0, p[1] - p[2]) for p in pts]
    hi = [max(0.0, p[3] - p[1]) for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], label=label, color=color, marker=marker, ls=ls,
                capsize=3)


def _bare_line(ax, rows, suite, metric, label="bare (no program)"):
    for r in rows:
        if (r["suite"], r["backend"], r["metric"]) == (suite, "bare", metric):
            ax.axhline(r["value"], color=COLORS["bare"], ls="--", label=label)
            ax.axhspan(r.get("min", r["value"]), r.get("max", r["value"]),
                       color=COLORS["bare"], alpha=0.12)
            return


def _finish(fig, ax, title, ylabel, path, logx=True, logy=False, xlabel="peers (N)"):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_all(data: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    m = data.get("machine", {})
    sub = f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, kernel {m.get('kernel', '?')}"
    made = []
    os.makedirs(out_dir, exist_ok=True)

    def fig_for(suite):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        return fig, ax

    def have(suite):
        return any(r["suite"] == suite for r in rows)

    if have("conn_setup"):
        fig, ax = fig_for("conn_setup")
        _bare_line(ax, rows, "conn_setup", "conn_per_s")
        for b in ("iptables", "ebpf-tc"):
            _errorbar(ax, _series(rows, "conn_setup", b, "conn_per_s"), b, COLORS[b])
        ax.set_ylim(bottom=0)
        _finish(fig, ax, f"conn_setup: new TCP connections/s to the last peer\n{sub}",
                "connections per second", p := os.path.join(out_dir, "conn_setup.png"))
        made.append(p)
        plt.close(fig)

    if have("rr"):
        fig, ax = fig_for("rr")
        for metric, ls in (("latency_us_p50", "-"), ("latency_us_p99", ":")):
            tag = metric.rsplit("_", 1)[1]
            for r in rows:
                if (r["suite"], r["backend"], r["metric"]) == ("rr", "bare", metric):
                    ax.axhline(r["value"], color=COLORS["bare"], ls="--" if tag == "p50" else ":",
                               label=f"bare {tag}")
            for b in ("iptables", "ebpf-tc"):
                _errorbar(ax, _series(rows, "rr", b, metric), f"{b} {tag}", COLORS[b], ls=ls)
        ax.set_ylim(bottom=0)
        _finish(fig, ax, f"rr: TCP request/response latency (64 B)\n{sub}", "microseconds",
                p := os.path.join(out_dir, "rr.png"))
        made.append(p)
        plt.close(fig)

    if have("stream"):
        fig, ax = fig_for("stream")
        _bare_line(ax, rows, "stream", "gbps")
        for b in ("iptables", "ebpf-tc"):
            _errorbar(ax, _series(rows, "stream", b, "gbps"), b, COLORS[b])
        ax.set_ylim(bottom=0)
        _finish(fig, ax, f"stream: TCP throughput, one connection\n{sub}", "Gbit/s",
                p := os.path.join(out_dir, "stream.png"))
        made.append(p)
        plt.close(fig)

    if have("update_one"):
        fig, ax = fig_for("update_one")
        _errorbar(ax, _series(rows, "update_one", "iptables", "ms"), "iptables (apply)",
                  COLORS["iptables"])
        _errorbar(ax, _series(rows, "update_one", "ebpf-tc", "ms"), "ebpf-tc (apply)",
                  COLORS["ebpf-tc"])
        _errorbar(ax, _series(rows, "update_one", "ebpf-tc", "map_write_ms"),
                  "ebpf-tc (map writes alone)", COLORS["ebpf-tc"], marker="s", ls=":")
        _errorbar(ax, _series(rows, "update_one", "core", "plan_diff_ms"),
                  "agent plan + diff (any backend)", COLORS["core"], marker="^", ls="--")
        _finish(fig, ax, f"update_one: time to apply one peer change among N\n{sub}",
                "milliseconds", p := os.path.join(out_dir, "update_one.png"), logy=True)
        made.append(p)
        plt.close(fig)

    if have("full_sync"):
        fig, ax = fig_for("full_sync")
        for b in ("iptables", "ebpf-tc"):
            _errorbar(ax, _series(rows, "full_sync", b, "ms"), b, COLORS[b])
        _finish(fig, ax, f"full_sync: time to program N peers from empty\n{sub}",
                "milliseconds", p := os.path.join(out_dir, "full_sync.png"), logy=True)
        made.append(p)
        plt.close(fig)

    if have("memory"):
        fig, ax = fig_for("memory")
        for b in ("iptables", "ebpf-tc"):
            _errorbar(ax, _series(rows, "memory", b, "kernel_bytes_per_peer"), f"{b} kernel",
                      COLORS[b])
            _errorbar(ax, _series(rows, "memory", b, "rss_bytes_per_peer"), f"{b} daemon RSS",
                      COLORS[b], marker="s", ls=":")
        ax.axhline(128, color="#999999", ls="--", label="goal: 128 B/peer kernel")
        _finish(fig, ax, f"memory: bytes per peer\n{sub}", "bytes per peer",
                p := os.path.join(out_dir, "memory.png"), logy=True)
        made.append(p)
        plt.close(fig)

    if have("fanout"):
        fig, ax = fig_for("fanout")
        for backend, label in (("bare", "bare: registry watch only"),
                               ("dryrun", "agent (dry-run datapath)")):
            for metric, ls in (("event_to_apply_ms_p99", "-"), ("event_to_apply_ms_p50", ":")):
                pts = sorted((r["agents"], r["value"], r["min"], r["max"]) for r in rows
                             if (r["suite"], r["backend"], r["metric"]) == ("fanout", backend,
                                                                         metric))
                _errorbar(ax, pts, f"{label} {metric.rsplit('_', 1)[1]}", COLORS[backend],
                          ls=ls, marker="o" if backend == "dryrun" else "s")
        peers = next((r["peers"] for r in rows if r["suite"] == "fanout"), "?")
        _finish(fig, ax, f"fanout: ZooKeeper event to datapath, {peers} peers, under churn\n{sub}",
                "milliseconds", p := os.path.join(out_dir, "fanout.png"), logx=False,
                logy=True, xlabel="watching processes (K)")
        made.append(p)
        plt.close(fig)
    return made
