"""Hypothesis strategies for any protobuf message, built from its descriptor.

Values reach every field's whole range (huge and negative numbers, NaN and
infinities, empty and long strings, unknown enum values), with the served
model's name mixed in so that requests get past the first checks.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

F = FieldDescriptor
_INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, 1, 2, 16, 255, 4096, 8192, 100_000) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, min(high, 70_000)), st.integers(low, high))


def _scalar(field: FieldDescriptor, words: list[str]) -> st.SearchStrategy[Any]:
    if field.type in _INTS:
        return _int(*_INTS[field.type])
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        width = 32 if field.type == F.TYPE_FLOAT else 64
        return st.one_of(st.floats(width=width), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return st.one_of(st.sampled_from(words), st.text(max_size=40))
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _int(-(2**31), 2**31 - 1))
    raise TypeError(field.type)


def message(descriptor: Descriptor, words: list[str], depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`'s type with any subset of fields set to any values."""
    cls = message_factory.GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = message(field.message_type, words, depth + 1)
        else:
            value = _scalar(field, words)
        repeated = field.is_repeated
        fields[field.name] = st.lists(value, max_size=5) if repeated else value

    def build(values: dict[str, Any]) -> Any:
        msg = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                if field.type == F.TYPE_MESSAGE:
                    for item in value:
                        getattr(msg, name).add().CopyFrom(item)
                else:
                    getattr(msg, name).extend(value)
            elif field.type == F.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)
