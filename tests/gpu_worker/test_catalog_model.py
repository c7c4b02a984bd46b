"""`infermesh worker --catalog FILE --model NAME`: the catalog's weights, engine options and task for that model,
flags on the command line still winning; a directory or NAME=DIR is taken as it is."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from infermesh.common.model_prep import model_dir
from infermesh.gpu_worker.catalog_model import expand
from infermesh.v1 import worker_pb2, worker_pb2_grpc

from tests.harness import ServiceProcess, free_port

DEMO = str(Path(__file__).resolve().parents[2] / "deploy" / "catalog" / "demo.yaml")
QWEN = "Qwen2.5-Coder-0.5B-Instruct"


def test_a_catalog_name_becomes_its_weights_engine_options_and_task() -> None:
    args = expand(["--catalog", DEMO, "--model", "chat-large", "--port", "1", "--max-num-seqs", "4"], environ={})
    assert args[args.index("--model") + 1] == f"{QWEN}={model_dir(QWEN)}"
    assert args[:args.index("--model")] == ["--max-model-len", "2048", "--max-num-seqs", "8", "--kv-cache-gb", "1",
                                            "--enforce-eager"]
    assert args[-2:] == ["--max-num-seqs", "4"]  # given on the command line: after the catalog's, so it wins
    embed = expand(["--model=all-MiniLM-L6-v2"], environ={"INFERMESH_CATALOG": DEMO})
    assert "--task" in embed and embed[embed.index("--task") + 1] == "embed"


def test_directories_and_specs_pass_unchanged(tmp_path: Path) -> None:
    for argv in (["--catalog", DEMO, "--model", str(tmp_path)], ["--catalog", DEMO, "--model", f"x={tmp_path}"],
                 ["--model", "chat-large"]):
        assert expand(argv, environ={}) == argv


def test_a_name_the_catalog_does_not_have_is_refused() -> None:
    with pytest.raises(SystemExit, match="not a model of the catalog"):
        expand(["--catalog", DEMO, "--model", "auto"], environ={})


def test_a_worker_started_by_name_serves_that_model(tmp_path: Path) -> None:
    port = free_port()
    proc = ServiceProcess("sim-worker-by-name", ["worker", "--engine", "sim", "--catalog", DEMO, "--model",
                                                 "chat-large", "--port", str(port), "--metrics-port", "0"],
                          port=port, log_dir=tmp_path).start().wait_healthy(60)
    try:
        with grpc.insecure_channel(proc.address) as ch:
            info = worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=10)
        assert info.model == QWEN and info.max_model_len == 2048 and info.max_num_seqs == 8
    finally:
        proc.stop()
