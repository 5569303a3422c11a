"""The gRPC controller's server side (``overlay controller``, DESIGN §4.2a; docs/grpc.md).

``store`` (ZooKeeper and the change journal), ``servicer`` (authorisation,
validation; errors leave as status codes through :mod:`overlay.rpc.status`),
``server`` (the ``grpc.aio`` server with health and reflection), ``certs``
(``overlay certs``). What clients share with it (the generated code, conversions,
the client, status codes) is :mod:`overlay.rpc`.
"""
