"""`infermesh up --catalog FILE` with a versioned model: each version is a served model of its own, so it gets
its `workers` workers serving `chat@v2` with that version's engine options, its weights prepared (once per
prepared model), and CPU placement counts every version's workers. Unit tests of the plan, no process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from infermesh.common import cpus, model_prep
from infermesh.common.catalog import Catalog, load_catalog
from infermesh.common.config import ConfigError
from infermesh.supervisor import main as up
from infermesh.supervisor import mesh, ports

CATALOG = """\
format: 1
models:
  - name: chat
    aliases: [chat-small]
    stable: v1
    engine: {{max_model_len: 2048}}
    versions:
      - name: v1
        weights: {{dir: {model}}}
      - name: v2
        weights: {{dir: {model}}}
        engine: {{max_num_seqs: 4}}
        workers: 2
        traffic: 10
      - name: v3
        weights: {{dir: {model}}}
        workers: 0
  - name: embed
    task: embed
    weights: {{dir: {model}}}
"""


@pytest.fixture()
def catalog(tmp_path: Path) -> Catalog:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "catalog.yaml").write_text(CATALOG.format(model=model))
    return load_catalog(tmp_path / "catalog.yaml")


def builder(tmp_path: Path, catalog: Catalog, placement: cpus.Plan | None = None) -> mesh.MeshBuilder:
    workers = len(mesh.catalog_workers(catalog))
    return mesh.MeshBuilder(ports.block_plan(40000, workers, 1), host="127.0.0.1", log_dir=tmp_path, engine="sim",
                            model=None, policy="", worker_args=["--max-num-seqs", "8"], common_args=[],
                            placement=placement, catalog=catalog)


def test_each_version_gets_its_workers_with_its_own_options(tmp_path: Path, catalog: Catalog) -> None:
    # v3 has `workers: 0` (they run elsewhere); the versioned model itself runs no worker of its own.
    assert [m.name for m in mesh.catalog_workers(catalog)] == ["chat@v1", "chat@v2", "chat@v2", "embed"]
    directory = tmp_path / "model"
    b = builder(tmp_path, catalog)
    assert b.worker_models() == [
        ["--model", f"chat@v1={directory}", "--max-model-len", "2048"],
        ["--model", f"chat@v2={directory}", "--max-model-len", "2048", "--max-num-seqs", "4"],
        ["--model", f"chat@v2={directory}", "--max-model-len", "2048", "--max-num-seqs", "4"],
        ["--model", f"embed={directory}", "--task", "embed"]]
    children = b.workers()
    assert [c.name for c in children] == ["worker-0", "worker-1", "worker-2", "worker-3"]
    argv = children[1].argv
    # The catalog's options for the version come after those passed to every worker, so they win.
    assert argv.index("--max-num-seqs", argv.index("--model")) > argv.index("--max-num-seqs")
    assert argv[argv.index("--model") + 1] == f"chat@v2={directory}"
    assert len({c.argv[c.argv.index("--port") + 1] for c in children}) == 4


def test_cpu_placement_counts_every_versions_workers(tmp_path: Path, catalog: Catalog) -> None:
    assert mesh.placed_workers(catalog, 4) == [0, 1, 2]  # the embed worker is not pinned
    assert mesh.placed_workers(None, 2) == [0, 1]
    b = builder(tmp_path, catalog, cpus.Plan([{0}, {1}, {2}], {3}))
    children = b.workers()
    for child, cores in zip(children[:3], ["0", "1", "2"], strict=True):
        i = child.argv.index("--engine-cpus")
        assert child.argv[i:i + 4] == ["--engine-cpus", cores, "--cpus", "3"]
    assert "--engine-cpus" not in children[3].argv
    assert b.tokenizer().argv[:5] == [sys.executable, "-m", "infermesh.common.cpus", "--cpus", "3"]


def test_the_services_read_the_catalog_and_the_workers_get_their_version(tmp_path: Path, catalog: Catalog) -> None:
    b = builder(tmp_path, catalog)
    for child in (b.tokenizer(), b.scheduler(), *b.frontends()):
        assert child.argv[child.argv.index("--catalog") + 1] == str(Path(catalog.source).resolve()), child.name
    for child in b.workers():  # given their model (NAME@VERSION=DIR) and options by `up` itself
        assert "--catalog" not in child.argv and child.argv.count("--model") == 1
    # The schedulers watch every worker, whichever version it serves.
    workers = b.scheduler().argv[b.scheduler().argv.index("--workers") + 1].split(",")
    assert len(workers) == 4


def test_each_versions_weights_are_prepared_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_HOME", str(tmp_path))
    (tmp_path / "catalog.yaml").write_text(
        "format: 1\nmodels:\n"
        "  - name: chat\n    stable: v1\n    versions:\n"
        "      - {name: v1, weights: {prepared: SmolLM2-135M-Instruct}}\n"
        "      - {name: v2, weights: {prepared: SmolLM2-135M-Instruct}, workers: 0}\n"
        "      - {name: v3, weights: {prepared: Qwen2.5-Coder-0.5B-Instruct}}\n")
    prepared: list[str] = []
    monkeypatch.setattr(model_prep, "is_complete", lambda path: path.name in prepared)
    monkeypatch.setattr(model_prep, "prepare_model", lambda name: prepared.append(name))
    up.prepare_catalog_models(load_catalog(tmp_path / "catalog.yaml"))
    # Every version's weights (a version without workers too: the tokenizer loads it), each model once.
    assert prepared == ["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"]


def test_a_versions_missing_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text(
        f"format: 1\nmodels:\n  - name: chat\n    stable: v1\n    versions:\n"
        f"      - {{name: v1, weights: {{dir: {tmp_path}}}}}\n")
    with pytest.raises(ConfigError, match=f"model chat@v1: {tmp_path} is not a model directory"):
        up.prepare_catalog_models(load_catalog(tmp_path / "catalog.yaml"))
