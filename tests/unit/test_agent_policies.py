"""The agent with group policies: the registry's policies reach the plan, a
policy change costs only its entries, /status reports default-deny and fill
levels, and a peer held by the churn guard keeps its identity's entries."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.agent import Agent
from overlay.config import config_from_dict
from overlay.datapath.dryrun import DryRunDatapath
from overlay.model import Node, policy_from_dict
from overlay.registry import RegistryView
from overlay.status import Metrics, format_status
from tests.support.feed import FeedRegistry

HOSTS = list(ipaddress.IPv4Network("192.168.0.0/18").hosts())
SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", str(HOSTS[0]), ("db",))


def pol(pid, src, dst, proto="tcp", ports=()):
    return policy_from_dict({"v": 1, "from": {"group": src}, "to": {"group": dst}, "proto": proto,
                             "ports": list(ports)}, pid)


def peer(i, groups):
    return Node(f"n{i}", "ec2", f"10.1.0.{i}", f"198.19.0.{i}", str(HOSTS[i + 10]), tuple(groups))


class Registry:
    name = "fake"

    def __init__(self):
        self.nodes, self.policies = {}, {}

    def view(self):
        return RegistryView(nodes=dict(self.nodes), policies=dict(self.policies))


@pytest.fixture(autouse=True, params=["full", "feed"])
def registry_kind(request, monkeypatch):
    """Every test with and without the registry's change feed (incremental agent path)."""
    monkeypatch.setattr(Registry, "__new__", (lambda cls: object.__new__(cls)) if request.param == "full"
                        else (lambda cls: FeedRegistry()))
    return request.param


class FillingDryRun(DryRunDatapath):
    def fill(self):
        return {"ovl_policy": {"entries": len(self.state.get("policy", {})), "max_entries": 16}}


def make(datapath=None, threshold=20):
    cfg = config_from_dict({
        "node_id": "self", "network": "ec2", "groups": ["db"],
        "addresses": {"private": SELF.private, "public": SELF.public},
        "registry": {"backend": "static"}, "guard": {"max_change": threshold, "settle_s": 0},
    })
    reg = Registry()
    for i in range(1, 6):
        reg.nodes[f"n{i}"] = peer(i, ["web"] if i < 3 else ["app"])
    return Agent(cfg, reg, datapath or FillingDryRun(), SELF), reg


def test_policies_reach_the_datapath_and_status():
    agent, reg = make()
    agent.reconcile()
    st = agent.status()
    assert st["policy"] == {"enforced": False, "selected_by": [], "mode": "enforce"}
    assert st["fill"] == {"ovl_policy": {"entries": 0, "max_entries": 16}}

    reg.policies["web-db"] = pol("web-db", "web", "db", "tcp", [5432])
    ops = agent.reconcile()
    assert {op.table for op in ops} == {"policy", "names", "config"}
    assert agent.datapath.state["config"]["policy_enforced"] == 1
    st = agent.status()
    assert st["policy"] == {"enforced": True, "selected_by": ["web-db"], "mode": "enforce"}
    assert st["fill"]["ovl_policy"]["entries"] == 1
    assert "policy    default-deny (selected by web-db)" in format_status(st)
    assert "maps      ovl_policy=1/16" in format_status(st)
    metrics = Metrics().render(st).decode()
    assert 'overlay_map_entries{map="ovl_policy"} 1.0' in metrics

    # a second policy: only its entries and names
    reg.policies["app-db"] = pol("app-db", "app", "db", "udp", [53])
    ops = agent.reconcile()
    assert {op.table for op in ops} <= {"policy", "names", "config"}
    assert [op for op in ops if op.table == "policy"] and all(op.key[1] == 17 for op in ops if op.table == "policy")

    # deleting both: back to members / reject_all, nothing of the policies left
    reg.policies.clear()
    agent.reconcile()
    assert agent.datapath.state["policy"] == {} and agent.datapath.state["names"].keys() <= {
        ("identity", k) for k in [e.identity for e in agent.datapath.state["peers"].values()]}
    assert "policy_enforced" not in agent.datapath.state["config"]


def test_status_without_fill():
    agent, _ = make(DryRunDatapath())
    agent.reconcile()
    assert "fill" not in agent.status()


def test_guard_keeps_a_held_peers_identity_entries():
    agent, reg = make(threshold=0)
    reg.policies["app-db"] = pol("app-db", "app", "db", "tcp", [5432])
    agent.reconcile()
    before = dict(agent.datapath.state["policy"])
    app_ident = agent.datapath.state["peers"]["10.1.0.3"].identity
    assert any(k[0] == app_ident for k in before)
    # every app peer vanishes at once (a registry hiccup): the guard holds them,
    # and with them the entries of their identity
    for i in (3, 4, 5):
        del reg.nodes[f"n{i}"]
    agent.reconcile()
    assert agent.guard.tripped
    assert agent.datapath.state["peers"]["10.1.0.3"].identity == app_ident
    assert agent.datapath.state["policy"] == before
    assert ("identity", app_ident) in agent.datapath.state["names"]
