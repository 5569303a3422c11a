"""The lab: a topology file -> network namespaces, edges, ZooKeeper and daemons (docs/lab.md).

``topology`` (pure: the file, names, daemon configs, network scripts), ``lab``
(up/down/status/check), ``check`` (the expected matrix, probes, the table),
``netns`` (namespaces and processes), ``echo`` (the test-port server),
``cli`` (``overlay lab ...``).
"""
