"""Claiming overlay addresses in ``alloc/`` (DESIGN §4.2): ``id-to-ip`` and ``ip-to-id``.

Both directions are written in one transaction, so a node holds an address only when
both say so; a free address is chosen at random (a node keeps its address across
restarts: ``id-to-ip/<node_id>`` is persistent). Runs in the caller's thread, on the
caller's :class:`~overlay.zk.client.Session`; the caller translates kazoo's errors.
"""

from __future__ import annotations

import ipaddress
import logging
import random

from kazoo.exceptions import NodeExistsError, NoNodeError, RolledBackError, RuntimeInconsistency

from overlay import addr
from overlay.errors import AllocationExhausted, AlreadyExists, RegistryError
from overlay.model import valid_name
from overlay.zk.client import Session
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)

MAX_ALLOC_ROUNDS = 8       # re-reads of id-to-ip when another process of this node races us
_SECONDARY = (RolledBackError, RuntimeInconsistency)   # a transaction's operations that did not fail


class Allocator:
    """The overlay addresses of ``subnet`` under ``layout``."""

    def __init__(self, session: Session, layout: Layout, subnet: ipaddress.IPv4Network, record_acl: list,
                 rng: random.Random | None = None):
        self._zk = session
        self._layout = layout
        self.subnet = ipaddress.IPv4Network(subnet)
        self.record_acl = record_acl
        self._rng = rng or random.SystemRandom()

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        """``node_id``'s overlay address: the one it holds (moved to ``requested`` if that
        differs), else ``requested``, else a free one at random."""
        valid_name(node_id, "node_id")
        for _ in range(MAX_ALLOC_ROUNDS):
            current = self._current_allocation(node_id)
            if current is not None:
                return self._confirm_allocation(node_id, current, requested)
            got = self._claim_requested(node_id, requested) if requested else self._claim_random(node_id)
            if got is not None:
                return got
            # another process of this node claimed an address first: read it again
        raise RegistryError(
            f"allocating an overlay address for {node_id}: alloc/id-to-ip/{node_id} kept "
            "changing; is another process running with the same node_id?"
        )

    def _current_allocation(self, node_id: str) -> str | None:
        try:
            data, _ = self._zk.get(f"{self._layout.id_to_ip}/{node_id}")
        except NoNodeError:
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            return addr.in_subnet_host(text, self.subnet)
        except ValueError as exc:
            raise RegistryError(
                f"alloc/id-to-ip/{node_id} holds {text!r}, which is not an address of the overlay "
                f"subnet {self.subnet} ({exc}); an operator must remove it"
            ) from None

    def owner_of(self, ip: str) -> str | None:
        """The node ``alloc/ip-to-id/<ip>`` names, None if it does not exist."""
        try:
            data, _ = self._zk.get(f"{self._layout.ip_to_id}/{ip}")
        except NoNodeError:
            return None
        return data.decode("utf-8", "replace")

    def _confirm_allocation(self, node_id: str, current: str, requested: str | None) -> str:
        owner = self.owner_of(current)
        if owner is None:
            # id-to-ip without ip-to-id: repair the reverse entry (both are written together,
            # so only an operator's partial clean-up leaves this)
            try:
                self._zk.wait(self._zk.client.create_async(f"{self._layout.ip_to_id}/{current}", node_id.encode(),
                                                           acl=self.record_acl))
                log.warning("node %s: restored missing alloc/ip-to-id/%s", node_id, current)
                owner = node_id
            except NodeExistsError:
                owner = self.owner_of(current)
        if owner != node_id:
            raise RegistryError(
                f"alloc/id-to-ip/{node_id} says {current}, but alloc/ip-to-id/{current} belongs to "
                f"{owner!r}; an operator must resolve the conflict"
            )
        if requested and requested != current:
            return self._move(node_id, current, requested)
        return current

    def _requested_ip(self, requested: str) -> str:
        try:
            return addr.in_subnet_host(requested, self.subnet)
        except ValueError as exc:
            raise RegistryError(f"requested overlay address {requested!r}: {exc}") from None

    def _move(self, node_id: str, current: str, requested: str) -> str:
        ip = self._requested_ip(requested)
        _, s1 = self._zk.get(f"{self._layout.id_to_ip}/{node_id}")
        _, s2 = self._zk.get(f"{self._layout.ip_to_id}/{current}")
        tx = self._zk.client.transaction()
        tx.delete(f"{self._layout.id_to_ip}/{node_id}", version=s1.version)
        tx.delete(f"{self._layout.ip_to_id}/{current}", version=s2.version)
        tx.create(f"{self._layout.ip_to_id}/{ip}", node_id.encode(), acl=self.record_acl)
        tx.create(f"{self._layout.id_to_ip}/{node_id}", ip.encode(), acl=self.record_acl)
        results = self._zk.wait(tx.commit_async())
        if isinstance(results[2], NodeExistsError):
            raise AlreadyExists(
                f"overlay address {ip} is already allocated to node {self.owner_of(ip)!r} "
                f"(alloc/ip-to-id/{ip}); {node_id} keeps {current}"
            )
        _raise_first_error(results)
        log.warning("node %s: moved overlay address %s -> %s as configured", node_id, current, ip)
        return ip

    def _claim(self, node_id: str, ip: str) -> str:
        """One transaction creating both directions. Returns ok, ip-taken or id-taken."""
        tx = self._zk.client.transaction()
        tx.create(f"{self._layout.id_to_ip}/{node_id}", ip.encode(), acl=self.record_acl)
        tx.create(f"{self._layout.ip_to_id}/{ip}", node_id.encode(), acl=self.record_acl)
        results = self._zk.wait(tx.commit_async())
        if isinstance(results[0], NodeExistsError):
            return "id-taken"
        if isinstance(results[1], NodeExistsError):
            return "ip-taken"
        _raise_first_error(results)
        return "ok"

    def _claim_requested(self, node_id: str, requested: str) -> str | None:
        ip = self._requested_ip(requested)
        outcome = self._claim(node_id, ip)
        if outcome == "ok":
            log.info("node %s: claimed requested overlay address %s", node_id, ip)
            return ip
        if outcome == "id-taken":
            return None
        owner = self.owner_of(ip)
        if owner == node_id:  # ip-to-id is ours but id-to-ip is missing: repair it
            try:
                self._zk.wait(self._zk.client.create_async(f"{self._layout.id_to_ip}/{node_id}", ip.encode(),
                                                           acl=self.record_acl))
            except NodeExistsError:
                return None
            return ip
        raise AlreadyExists(
            f"overlay address {ip} is already allocated to node {owner!r} (alloc/ip-to-id/{ip}); "
            "choose another addresses.overlay or have an operator release it"
        )

    def _claim_random(self, node_id: str) -> str | None:
        net = self.subnet
        lo, hi = int(net.network_address) + 1, int(net.broadcast_address) - 1
        total = hi - lo + 1

        def listed() -> set[int]:
            taken = set()
            for name in self._zk.children(self._layout.ip_to_id):
                try:
                    ip = int(ipaddress.IPv4Address(name))
                except ValueError:
                    continue
                if lo <= ip <= hi:
                    taken.add(ip)
            return taken

        taken = listed()
        relisted = False
        for _ in range(2 * total + 16):
            if len(taken) >= total:
                if relisted:
                    raise AllocationExhausted(
                        f"overlay subnet {net} is exhausted: all {total} addresses are allocated"
                    )
                taken, relisted = listed(), True
                continue
            ip = str(ipaddress.IPv4Address(self._pick(lo, hi, taken)))
            outcome = self._claim(node_id, ip)
            if outcome == "ok":
                log.info("node %s: allocated overlay address %s", node_id, ip)
                return ip
            if outcome == "id-taken":
                return None
            log.debug("node %s: %s was taken meanwhile, trying another", node_id, ip)
            taken.add(int(ipaddress.IPv4Address(ip)))
        raise RegistryError(f"allocating in {net}: too many collisions, giving up")

    def _pick(self, lo: int, hi: int, taken: set[int]) -> int:
        total = hi - lo + 1
        if len(taken) * 2 < total:
            for _ in range(64):
                ip = self._rng.randint(lo, hi)
                if ip not in taken:
                    return ip
        free = [i for i in range(lo, hi + 1) if i not in taken]
        return self._rng.choice(free)


def _raise_first_error(results: list) -> None:
    """Raise the error of a failed transaction (the cause, not the operations it rolled back)."""
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise next((e for e in errors if not isinstance(e, _SECONDARY)), errors[0])
