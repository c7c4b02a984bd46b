"""vLLM's offline `LLM.generate`, greedy, for the worker's parity test (run as a script).

usage: python -m tests.gpu_worker.offline_greedy MODEL_DIR IN.json OUT.json
IN.json: {"prompts": [[ids...], ...], "max_tokens": N, "engine": {engine args}};
OUT.json: [[ids...], ...]. Prompts run one at a time, as the test sends them.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, in_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(in_path) as f:
        spec = json.load(f)
    llm = LLM(model=model_dir, **spec["engine"])
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], detokenize=False)
    out = []
    for ids in spec["prompts"]:
        (result,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        out.append(list(result.outputs[0].token_ids))
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
