"""The tokenizer's series exist at zero from start, for every method and model."""

from __future__ import annotations

from pathlib import Path

from infermesh.tokenizer.models import ModelRegistry, ModelTokenizer
from infermesh.tokenizer.service import METHODS, TokenizerService
from prometheus_client import REGISTRY


def test_service_creates_method_and_model_series(model_dir: Path) -> None:
    model = ModelTokenizer.load("precreated", model_dir)
    service = TokenizerService(ModelRegistry([model]), workers=1)
    try:
        assert set(METHODS) == {"Render", "Encode", "Decode", "GetTokenizer", "ListModels"}
        for method in METHODS:
            assert REGISTRY.get_sample_value("infermesh_tokenizer_requests_total",
                                             {"method": method, "code": "OK"}) is not None
            assert REGISTRY.get_sample_value("infermesh_tokenizer_request_seconds_count",
                                             {"method": method}) is not None
        assert REGISTRY.get_sample_value("infermesh_tokenizer_tokens_total", {"model": "precreated"}) == 0
    finally:
        service.pool.shutdown()
