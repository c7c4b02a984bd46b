"""A resumed constrained request continues under the same grammar, from where the first worker stopped.

At the worker: a constrained output is cut after k tokens and handed back as `generated_ids` (as the
frontend does when a worker dies mid-stream); the continuation must complete a valid document for every
k, although the grammar (`grammar_replay.GrammarReplay`) starts in the middle of a JSON value. Without the
replay the continuation would start a new document after the cut one (checked: it does not validate).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from infermesh.v1 import common_pb2
from tokenizers import Tokenizer

from tests.fixtures.worker import WorkerHandle
from tests.gpu_worker.helpers import generate, stub

pytestmark = pytest.mark.engine

SCHEMA = {
    "type": "object",
    "properties": {
        "cities": {"type": "array", "minItems": 3, "maxItems": 3,
                   "items": {"type": "object", "properties": {
                       "name": {"type": "string", "maxLength": 10},
                       "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["name", "rank"], "additionalProperties": False}},
        "done": {"type": "boolean"},
    },
    "required": ["cities", "done"], "additionalProperties": False,
}
CONSTRAINT = common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA), param="response_format")


def prompt_ids(model_dir: Path) -> list[int]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "<|im_start|>user\nList three big cities as JSON.<|im_end|>\n<|im_start|>assistant\n"
    return tok.encode(text, add_special_tokens=False).ids


async def test_a_resumed_constrained_output_still_validates(real_worker: WorkerHandle, model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = prompt_ids(model_dir)
    channel, worker = stub(real_worker.address)
    async with channel:
        full = await generate(worker, prompt, max_tokens=150, temperature=0, structured=CONSTRAINT)
        assert full.finish == "stop"
        ids = full.ids[:-1] if full.choices[0].stop_token_id is not None else full.ids
        jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)
        assert len(ids) > 20
        for k in (1, 5, len(ids) // 2, len(ids) - 2):
            # Sampled (not greedy) continuations: they differ from the first output, and must still validate.
            rest = await generate(worker, prompt, generated=ids[:k], max_tokens=150, temperature=1.0, seed=k,
                                  structured=CONSTRAINT)
            assert rest.finish == "stop", (k, rest.finish)
            text = tok.decode(ids[:k] + rest.ids, skip_special_tokens=True)
            jsonschema.validate(json.loads(text), SCHEMA)
        # The same cut without the constraint's replay (a plain resume): the grammar would restart, the
        # model is free, and the output is no longer one valid document.
        free = await generate(worker, prompt, generated=ids[:len(ids) // 2], max_tokens=len(ids) // 2 + 30,
                              temperature=1.0, seed=1)
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(tok.decode(ids[:len(ids) // 2] + free.ids, skip_special_tokens=True)),
                                SCHEMA)
