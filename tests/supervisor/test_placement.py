"""`infermesh up` on a machine without an accelerator: each worker's model gets its own cores,
everything else runs on the cores left over (see infermesh.common.cpus)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from infermesh.common import cpus
from infermesh.supervisor import mesh, ports

WRAP = [sys.executable, "-m", "infermesh.common.cpus", "--cpus"]


def builder(tmp_path: Path, placement: cpus.Plan | None, workers: int = 1) -> mesh.MeshBuilder:
    return mesh.MeshBuilder(ports.block_plan(40000, workers, 1), host="127.0.0.1", log_dir=tmp_path, engine="vllm",
                            model=tmp_path, policy="", worker_args=["--enforce-eager"], common_args=[],
                            placement=placement)


def test_with_a_spare_core_the_rest_of_the_mesh_runs_on_it(tmp_path: Path) -> None:
    b = builder(tmp_path, cpus.Plan([{0, 1}, {2}], {3}), workers=2)
    for child in [b.tokenizer(), b.scheduler(), *b.frontends(), b.envoy(Path("/bin/envoy"))]:
        assert child.argv[:len(WRAP) + 2] == [*WRAP, "3", "--"], child.argv
    workers = b.workers()
    for child, model in zip(workers, ["0-1", "2"], strict=True):
        assert child.argv[:3] == [sys.executable, "-m", "infermesh.cli"]
        i = child.argv.index("--engine-cpus")
        assert child.argv[i:i + 4] == ["--engine-cpus", model, "--cpus", "3"]
        assert "--enforce-eager" in child.argv
    assert b.envoy(Path("/bin/envoy")).argv[len(WRAP) + 2] == "/bin/envoy"


def test_without_a_spare_core_only_the_models_are_placed(tmp_path: Path) -> None:
    b = builder(tmp_path, cpus.Plan([{0}, {1}], None), workers=2)
    assert b.tokenizer().argv[:3] == [sys.executable, "-m", "infermesh.cli"]
    assert b.envoy(Path("/bin/envoy")).argv[0] == "/bin/envoy"
    argv = b.workers()[1].argv
    i = argv.index("--engine-cpus")
    assert argv[i:i + 4] == ["--engine-cpus", "1", "--cpus", "all"]


def test_no_placement_changes_nothing(tmp_path: Path) -> None:
    b = builder(tmp_path, None)
    assert "--engine-cpus" not in b.workers()[0].argv
    assert b.frontends()[0].argv[:3] == [sys.executable, "-m", "infermesh.cli"]


def test_the_plan_follows_the_machine_and_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("VLLM_CPU_OMP_THREADS_BIND", "INFERMESH_ENGINE_CPUS", "INFERMESH_CPUS"):
        monkeypatch.delenv(variable, raising=False)
    assert mesh.cpu_engine(), "the test machine runs vLLM's CPU build"
    assert mesh.cpu_plan("vllm", 2, []) == cpus.plan(2, cpus.allowed())
    assert mesh.cpu_plan("sim", 1, []) is None
    assert mesh.cpu_plan("vllm", 1, ["--cpus", "1"]) is None
    assert mesh.cpu_plan("vllm", 1, ["--engine-cpus=0"]) is None
    assert mesh.cpu_plan("vllm", 1, ["--tensor-parallel-size", "2"]) is None
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert mesh.cpu_plan("vllm", 1, []) is None
