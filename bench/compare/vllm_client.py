"""Runs `vllm bench serve` jobs in this process, one after another.

    python -m bench.compare.vllm_client JOBS.json

JOBS.json is a list of {"argv": [...], "out": PATH}; each argv is what one
would give `vllm bench serve`. The result dict that
`vllm.benchmarks.serve.main` returns (the same JSON `--save-result
--save-detailed` writes) goes to `out`, without the generated texts. The CPU
build of vLLM has no working `vllm` console script, so this calls the module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(jobs: list[dict]) -> None:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for job in jobs:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        result = main(parser.parse_args(job["argv"]))
        result.pop("generated_texts", None)
        Path(job["out"]).write_text(json.dumps(result))
        print(f"wrote {job['out']}", flush=True)


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
