"""Constrained decoding that resumes: a vLLM logits processor whose grammar first replays the tokens already produced.

A request that migrates (its worker died mid-stream) reaches the next worker as
its prompt plus the tokens generated so far. Under vLLM's own structured-output
backend its grammar would start again at the first of the new tokens, though
the output is halfway through a JSON value. A resumed constrained request
therefore runs under this processor instead: it compiles the same grammar with
the same backend class (vLLM's `XgrammarBackend`, from the same
`StructuredOutputsParams` fields; `structured.vllm_fields`), advances it over
the last `replay` prompt tokens (the ones generated elsewhere), and then masks
every step's logits to what the grammar allows, advancing over each token
sampled. The continuation is thus exactly what the first worker's grammar
would have allowed, and the whole output still matches.

The worker loads it into every generate engine (`logits_processors`); a request
without `EXTRA_ARG` in its `extra_args` costs it nothing. It never raises in the
engine (that would fail the whole batch): a grammar that cannot be built or
advanced (never seen: the worker compiled the same grammar before it admitted
the request) ends that request at once by allowing only its stop tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

logger = logging.getLogger(__name__)

# SamplingParams.extra_args key: {"fields": StructuredOutputsParams fields, "replay": tokens to replay}.
EXTRA_ARG = "infermesh_grammar"
QUALNAME = "infermesh.gpu_worker.grammar_replay:GrammarReplay"


def extra_args(fields: dict[str, Any], replay: int) -> dict[str, Any]:
    return {EXTRA_ARG: {"fields": fields, "replay": replay}}


@dataclass
class _Constrained:
    grammar: Any  # vLLM's StructuredOutputGrammar, or None once broken
    output: list[int]  # the request's live output token ids (vLLM appends to it)
    seen: int = 0  # output tokens the grammar has accepted


class GrammarReplay(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.vllm_config = vllm_config
        self.requests: dict[int, _Constrained] = {}
        self._backend: Any = None
        self._bitmask: Any = None
        self._stop_ids: list[int] = []
        self._vocab = 0

    def is_argmax_invariant(self) -> bool:
        return False  # it masks tokens: greedy sampling sees it too

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if spec is None:
            return
        if not isinstance(spec, dict) or not isinstance(spec.get("fields"), dict) \
                or not isinstance(spec.get("replay"), int) or spec["replay"] < 0:
            raise ValueError(f"{EXTRA_ARG} must be {{'fields': {{...}}, 'replay': N}}")

    # -- the backend: built on first use, in the engine's process ------------------------------------
    def backend(self) -> Any:
        if self._backend is None:
            import xgrammar as xgr
            from vllm.tokenizers import cached_tokenizer_from_config
            from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

            model_config = self.vllm_config.model_config
            tokenizer = cached_tokenizer_from_config(model_config=model_config)
            vocab_size = model_config.get_vocab_size()
            self._backend = XgrammarBackend(self.vllm_config, tokenizer=tokenizer, vocab_size=vocab_size)
            self._vocab = vocab_size
            self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
            eos = getattr(tokenizer, "eos_token_id", None)
            self._stop_ids = [eos] if isinstance(eos, int) else []
        return self._backend

    def compile(self, fields: dict[str, Any]) -> Any:
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams
        from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar
        from vllm.v1.structured_output.request import get_structured_output_key

        backend = self.backend()
        params = SamplingParams(structured_outputs=StructuredOutputsParams(**fields))
        validate_xgrammar_grammar(params)  # as vLLM's own path: a choice list becomes a grammar
        assert params.structured_outputs is not None
        kind, spec = get_structured_output_key(params.structured_outputs)
        return backend.compile_grammar(kind, spec)

    # -- the batch -------------------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            spec = (params.extra_args or {}).get(EXTRA_ARG) if params is not None else None
            if spec is None:
                self.requests.pop(index, None)
                continue
            self.requests[index] = self._start(spec, prompt_ids or [], output_ids)
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if first is not None:
                self.requests[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.requests[a] = second

    def _start(self, spec: dict[str, Any], prompt_ids: list[int], output_ids: list[int]) -> _Constrained:
        replay = spec["replay"]
        try:
            grammar = self.compile(spec["fields"])
            tokens = list(prompt_ids[len(prompt_ids) - replay:]) if replay else []
            if not grammar.accept_tokens("replay", tokens):
                logger.error("a resumed request's tokens do not match its grammar; ending it")
                grammar = None
        except Exception:
            logger.exception("a resumed request's grammar could not be built; ending it")
            grammar = None
        return _Constrained(grammar, output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        import xgrammar as xgr

        for index, state in self.requests.items():
            if index >= logits.shape[0]:
                continue
            grammar = state.grammar
            new = state.output[state.seen:]
            if grammar is not None and new:
                if not grammar.accept_tokens("resumed", [t for t in new if t >= 0]):
                    logger.error("a resumed request sampled a token its grammar refuses; ending it")
                    state.grammar = grammar = None
                state.seen = len(state.output)
            row = logits[index:index + 1]
            if grammar is None or grammar.is_terminated():
                self._only_stop(row)
                continue
            grammar.fill_bitmask(self._bitmask, 0)
            vocab = min(row.shape[-1], self._vocab)
            xgr.apply_token_bitmask_inplace(row, self._bitmask.to(row.device), vocab_size=vocab)
        return logits

    def _only_stop(self, row: torch.Tensor) -> None:
        keep = row[0, self._stop_ids].clone() if self._stop_ids else None
        row.fill_(float("-inf"))
        if keep is not None:
            row[0, self._stop_ids] = keep
