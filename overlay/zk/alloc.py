"""Claiming overlay addresses in ``alloc/`` (DESIGN §4.2): ``id-to-ip`` and ``ip-to-id``.

Both directions are written in one transaction, so a node holds an address only when
both say so; a free address is chosen at random (a node keeps its address across
restarts: ``id-to-ip/<node_id>`` is persistent). Runs in the caller's thread, on the
caller's :class:`~overlay.zk.client.Session`; the caller translates kazoo's errors.

With ``registry.neti`` (``neti``: the old layout's paths) the address space is shared with the
old system: an address in its ``ip-to-id`` is never taken, a claim also creates the old
``id-to-ip/<id>`` and ``ip-to-id/<ip>`` in the same transaction (so an old allocator, which
creates ``ip-to-id/<ip>`` too, fails on it and picks another), and a node the old system
already gave an address (its old ``id-to-ip/<id>``, confirmed by the old ``ip-to-id``) keeps
that address: that is how a host moves from the old system keeping its overlay address.
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
from overlay.zk.neti import NetiPaths

log = logging.getLogger(__name__)

MAX_ALLOC_ROUNDS = 8       # re-reads of id-to-ip when another process of this node races us
_SECONDARY = (RolledBackError, RuntimeInconsistency)   # a transaction's operations that did not fail


class Allocator:
    """The overlay addresses of ``subnet`` under ``layout``."""

    def __init__(self, session: Session, layout: Layout, subnet: ipaddress.IPv4Network, record_acl: list,
                 rng: random.Random | None = None, neti: NetiPaths | None = None):
        self._zk = session
        self._neti = neti
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
            old = self._old_allocation(node_id) if self._neti is not None else None
            if old is not None:
                got = self._claim_old(node_id, old, requested)
            else:
                got = self._claim_requested(node_id, requested) if requested else self._claim_random(node_id)
            if got is not None:
                return got
            # another process of this node claimed an address first: read it again
        raise RegistryError(
            f"allocating an overlay address for {node_id}: alloc/id-to-ip/{node_id} kept "
            "changing; is another process running with the same node_id?"
        )

    def _current_allocation(self, node_id: str) -> str | None:
        return self._address_at(f"{self._layout.id_to_ip}/{node_id}", f"alloc/id-to-ip/{node_id}")

    def _address_at(self, path: str, shown: str) -> str | None:
        """The overlay address an ``id-to-ip`` entry holds (None: no entry); an address outside
        the subnet is an operator's problem."""
        try:
            data, _ = self._zk.get(path)
        except NoNodeError:
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            return addr.in_subnet_host(text, self.subnet)
        except ValueError as exc:
            raise RegistryError(
                f"{shown} holds {text[:40]!r}, which is not an address of the overlay subnet {self.subnet} "
                f"({exc}); an operator must remove it"
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
        if self._neti is not None:
            self._mirror(node_id, current)
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
        if self._neti is not None:   # the old layout moves with it (_mirror made it match)
            tx.delete(f"{self._neti.id_to_ip}/{node_id}")
            tx.delete(f"{self._neti.ip_to_id}/{current}")
            tx.create(f"{self._neti.ip_to_id}/{ip}", node_id.encode(), acl=self.record_acl)
            tx.create(f"{self._neti.id_to_ip}/{node_id}", ip.encode(), acl=self.record_acl)
        results = self._zk.wait(tx.commit_async())
        if isinstance(results[2], NodeExistsError) or (len(results) > 4 and isinstance(results[6], NodeExistsError)):
            raise AlreadyExists(
                f"overlay address {ip} is already allocated to node {self.owner_of(ip)!r} "
                f"(alloc/ip-to-id/{ip}); {node_id} keeps {current}"
            )
        _raise_first_error(results)
        log.warning("node %s: moved overlay address %s -> %s as configured", node_id, current, ip)
        return ip

    def _claim(self, node_id: str, ip: str, old_version: int | None = None) -> str:
        """One transaction creating both directions (and, with ``registry.neti``, the old layout's
        two, or checking its ``ip-to-id/<ip>`` at ``old_version`` when the old system allocated
        it to this node). Returns ok, ip-taken or id-taken."""
        tx = self._zk.client.transaction()
        tx.create(f"{self._layout.id_to_ip}/{node_id}", ip.encode(), acl=self.record_acl)
        tx.create(f"{self._layout.ip_to_id}/{ip}", node_id.encode(), acl=self.record_acl)
        if self._neti is not None and old_version is None:
            tx.create(f"{self._neti.id_to_ip}/{node_id}", ip.encode(), acl=self.record_acl)
            tx.create(f"{self._neti.ip_to_id}/{ip}", node_id.encode(), acl=self.record_acl)
        elif self._neti is not None:
            tx.check(f"{self._neti.ip_to_id}/{ip}", old_version)
        results = self._zk.wait(tx.commit_async())
        if isinstance(results[0], NodeExistsError) or (len(results) == 4 and isinstance(results[2], NodeExistsError)):
            return "id-taken"
        if isinstance(results[1], NodeExistsError) or (len(results) == 4 and isinstance(results[3], NodeExistsError)):
            return "ip-taken"
        _raise_first_error(results)
        return "ok"

    # --- registry.neti: the old layout ----------------------------------------------------

    def _old_owner(self, ip: str) -> tuple[str | None, int]:
        try:
            data, stat = self._zk.get(f"{self._neti.ip_to_id}/{ip}")
        except NoNodeError:
            return None, -1
        return data.decode("utf-8", "replace").strip(), stat.version

    def _old_allocation(self, node_id: str) -> str | None:
        """The address the old system gave ``node_id`` (its ``id-to-ip``), if any."""
        return self._address_at(f"{self._neti.id_to_ip}/{node_id}", f"the old layout's {self._neti.id_to_ip}/{node_id}")

    def _claim_old(self, node_id: str, ip: str, requested: str | None) -> str | None:
        """Take over the old system's allocation of ``node_id`` (the host keeps its address)."""
        if requested and self._requested_ip(requested) != ip:
            raise RegistryError(f"{node_id} has overlay address {ip} in the old layout "
                                f"({self._neti.id_to_ip}/{node_id}) but addresses.overlay asks for {requested}; "
                                "remove addresses.overlay (the host keeps its address) or release the old one")
        owner, version = self._old_owner(ip)
        if owner != node_id:
            raise RegistryError(f"the old layout gives {node_id} {ip} ({self._neti.id_to_ip}/{node_id}) but "
                                f"{self._neti.ip_to_id}/{ip} names {owner!r}; an operator must resolve the conflict")
        outcome = self._claim(node_id, ip, old_version=version)
        if outcome == "ok":
            log.info("node %s: kept overlay address %s of the old layout", node_id, ip)
            return ip
        if outcome == "id-taken":
            return None
        raise AlreadyExists(f"overlay address {ip} of {node_id} in the old layout is allocated to node "
                            f"{self.owner_of(ip)!r} in alloc/ip-to-id; an operator must resolve the conflict")

    def _mirror(self, node_id: str, ip: str) -> None:
        """An allocation made before ``registry.neti`` was on gets its old-layout entries too."""
        old = self._old_allocation(node_id)
        owner, _ = self._old_owner(ip)
        if old == ip and owner == node_id:
            return
        if old is not None and old != ip:
            raise RegistryError(f"{node_id} holds {ip} in alloc/id-to-ip but {old} in the old layout "
                                f"({self._neti.id_to_ip}/{node_id}); an operator must release one")
        if owner is not None and owner != node_id:
            raise AlreadyExists(f"{node_id}'s overlay address {ip} is allocated to {owner!r} in the old layout "
                                f"({self._neti.ip_to_id}/{ip}); an operator must resolve the conflict")
        for path, data in ((f"{self._neti.ip_to_id}/{ip}", node_id), (f"{self._neti.id_to_ip}/{node_id}", ip)):
            try:
                self._zk.wait(self._zk.client.create_async(path, data.encode(), acl=self.record_acl))
            except NodeExistsError:
                pass
        owner, _ = self._old_owner(ip)
        if owner != node_id:   # an old allocator took it meanwhile
            raise AlreadyExists(f"{node_id}'s overlay address {ip} was just allocated to {owner!r} in the old "
                                f"layout ({self._neti.ip_to_id}/{ip}); an operator must resolve the conflict")
        log.info("node %s: wrote its allocation %s to the old layout too", node_id, ip)

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

        parents = [self._layout.ip_to_id] + ([self._neti.ip_to_id] if self._neti is not None else [])

        def listed() -> set[int]:
            taken = set()
            for name in (n for p in parents for n in self._zk.children(p)):
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
