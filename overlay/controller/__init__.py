"""The gRPC controller (``overlay controller``, DESIGN §4.2a; docs/grpc.md).

``store`` (ZooKeeper and the change journal), ``servicer`` (authorisation,
validation, status codes), ``server`` (the ``grpc.aio`` server with health and
reflection), ``certs`` (``overlay certs``), ``client`` (calls with deadlines),
``cli`` (the commands), ``proto`` (the generated code of proto/overlay.proto).
"""
