"""The lab: a topology file -> network namespaces, edges, ZooKeeper and daemons (docs/lab.md).

``topology`` (pure: the file, names, daemon configs, network scripts), ``lab``
(up/down/status/check), ``check`` (the expected matrix, probes, the table),
``echo`` (the test-port server). Namespaces and processes are
:mod:`overlay.netns`'s; the commands (``overlay lab ...``) are :mod:`overlay.cli.lab`.
"""
