"""The constraint class the frontend sends with admission: one per grammar, whichever field gave it."""

from __future__ import annotations

from infermesh.frontend.request.prepare import constraint_hash
from infermesh.v1 import common_pb2


def sampling(param: str, schema: str) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(structured=common_pb2.StructuredOutput(json_schema=schema, param=param))


def test_the_same_schema_is_one_class_and_another_is_not() -> None:
    a = constraint_hash(sampling("response_format", '{"type": "object"}'))
    assert a == constraint_hash(sampling("guided_json", '{"type": "object"}')) != 0
    assert a != constraint_hash(sampling("response_format", '{"type": "array"}'))
    assert a != constraint_hash(common_pb2.SamplingParams(structured=common_pb2.StructuredOutput(json_object=True)))
    assert constraint_hash(common_pb2.SamplingParams(max_tokens=5)) == 0
