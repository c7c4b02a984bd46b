"""A request id from a client (x-request-id, or GenerateRequest.request_id) is carried on as
gRPC metadata and into the logs: one that is not visible ASCII, or too long, is replaced."""

from __future__ import annotations

import pytest
from infermesh.common.context import current_request_id, set_request_id


@pytest.mark.parametrize("given", ["³#^&`", "a b", "x" * 129, "line\nbreak", "\x00", ""])
def test_an_unusable_request_id_is_replaced(given: str) -> None:
    set_request_id(given)
    rid = current_request_id()
    assert rid != given and len(rid) == 32 and rid.isalnum()


@pytest.mark.parametrize("given", ["edge-test-0f3c9a", "0f3c9a2e-1b7d-4c1e-9a55-3f2d8b7e6a10", "x" * 128])
def test_a_usable_request_id_is_kept(given: str) -> None:
    set_request_id(given)
    assert current_request_id() == given
