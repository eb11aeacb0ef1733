"""gRPC server reflection as grpcurl and other clients expect it.

Serves `grpc.reflection.v1.ServerReflection` (what current clients ask first) and
`grpc.reflection.v1alpha.ServerReflection` (older clients): the two protos differ only
in their package name, so their messages are the same on the wire. Unlike the stock
servicer, a method's name (`fastserve.v1.Gateway.Generate`, `grpc.health.v1.Health.Check`)
resolves to the file of its service, so `grpcurl describe` works on methods too.
"""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


class MethodAwareReflection(ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            service, _, method = fully_qualified_name.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                found = None
            if found is not None and method in found.methods_by_name:
                return super()._file_containing_symbol(request, service)
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Reflection v1 and v1alpha on `server`, listing `service_names` and both reflection services."""
    servicer = MethodAwareReflection([*service_names, V1, V1ALPHA])
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for name in (V1, V1ALPHA):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
