"""The gRPC API's shared half (``proto/overlay.proto``, package ``overlay.v1``; docs/grpc.md).

Used by both sides: the controller's server (:mod:`overlay.controller`) and every
client (the daemon's ``grpc`` registry backend, the operator commands).

``proto`` (the generated modules, and their one generator), ``convert`` (protobuf
messages <-> model records and journal values, field-naming validation), ``client``
(typed calls with deadlines over mutual TLS), ``status`` (the project's error kinds
<-> gRPC status codes, both ways), ``tls`` (reading the PEM files).
"""
