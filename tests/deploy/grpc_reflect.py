"""A gRPC client that knows nothing but what server reflection tells it (as grpcurl does)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


class ReflectedClient:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.database = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self) -> list[str]:
        return list(self.database.get_services())

    def _method(self, full_method: str) -> tuple[Any, type, type]:
        service_name, method_name = full_method.rsplit("/", 1)
        method = self.pool.FindServiceByName(service_name).FindMethodByName(method_name)
        return (method, message_factory.GetMessageClass(method.input_type),
                message_factory.GetMessageClass(method.output_type))

    def call_stream(self, full_method: str, request: dict[str, Any], timeout: float = 60.0,
                    metadata: tuple[tuple[str, str], ...] = ()) -> Iterator[dict[str, Any]]:
        """A server-streaming call with a JSON-like request; yields JSON-like replies."""
        method, request_cls, reply_cls = self._method(full_method)
        assert method.server_streaming
        call = self.channel.unary_stream(f"/{full_method}", request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=reply_cls.FromString)
        message = json_format.ParseDict(request, request_cls())
        for reply in call(message, timeout=timeout, metadata=metadata):
            yield json_format.MessageToDict(reply)

    def call_unary(self, full_method: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        method, request_cls, reply_cls = self._method(full_method)
        call = self.channel.unary_unary(f"/{full_method}", request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=reply_cls.FromString)
        return json_format.MessageToDict(call(json_format.ParseDict(request, request_cls()), timeout=timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ReflectedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
