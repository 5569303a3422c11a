"""ZooKeeper pieces both the daemon's registry and the controller's store use (docs/registry.md).

``client`` (the kazoo client with persistent recursive watches: ``addWatch``, its
notifications, connecting and closing; the one connection-error set; error translation),
``acl`` (who may read and write what), ``layout`` (the paths of DESIGN §4.2 and the
operator's bootstrap), ``worker`` (the one thread that drains a watcher's events),
``alloc`` (claiming overlay addresses in ``alloc/``), ``server`` (a standalone ZooKeeper
from Debian's package, for tests, the lab and benchmarks). Only :mod:`overlay.registry`
and :mod:`overlay.controller` import this package.
"""
