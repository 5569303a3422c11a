"""Helpers the tests share, imported as a package (``from tests.support import ...``).

``paths`` (the repository and its Python), ``wait`` (free ports, polling with a
deadline), ``zk`` (wiping prefixes, expiring sessions), ``grpc`` (controllers,
certificates, clients), ``netns`` (namespaces a test creates, veth pairs, pins),
``twonets`` (the two-network topology of the datapath suites), ``packets``
(ICMP echo by hand). Programs run inside namespaces, as
``python -m tests.support.<name>`` from the repository: ``dpctl`` (the eBPF
datapath and probes), ``iptctl`` (the iptables datapath, test servers),
``conformance`` (the conformance suite's agent and probes). Fixtures stay in the
conftest files; they import from here.
"""
