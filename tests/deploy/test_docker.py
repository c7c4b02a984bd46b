"""The Dockerfiles, checked without a Docker engine: hadolint is clean, every
image runs as a non-root user with a HEALTHCHECK, the protobuf code is made at
build time, and the build context holds what the COPY lines need."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dockerfiles() -> list[Path]:
    return sorted(p for p in ROOT.glob("deploy/**/Dockerfile*") if not p.name.endswith(".dockerignore"))


def stages(path: Path) -> dict[str, str]:
    """Stage name -> its text."""
    parts = re.split(r"^(?=FROM )", path.read_text(), flags=re.MULTILINE)
    out = {}
    for part in parts[1:]:
        match = re.match(r"FROM \S+ AS (\S+)", part)
        assert match, part.splitlines()[0]
        out[match.group(1)] = part
    return out


def test_there_are_dockerfiles() -> None:
    assert [p.relative_to(ROOT).as_posix() for p in dockerfiles()] == ["deploy/docker/Dockerfile"]


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint_is_clean(path: Path) -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_are_non_root_with_healthchecks() -> None:
    found = stages(ROOT / "deploy" / "docker" / "Dockerfile")
    assert {"protos", "base", "cpu", "cuda"} <= set(found)
    for name in ("base", "cpu", "cuda"):
        text = found[name]
        users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
        assert users and users[-1] not in ("0", "root"), name
        assert re.search(r'^HEALTHCHECK .*CMD \["infermesh", "probe"\]$', text, re.MULTILINE), name
    assert "python tools/gen_protos.py" in found["protos"]
    assert 'pip install --extra-index-url "${TORCH_INDEX}" ".[cpu]"' in found["cpu"]
    assert "uninstall --yes torchvision torchaudio torchcodec" in found["cpu"]
    assert re.match(r"FROM \$\{VLLM_IMAGE\} AS cuda", found["cuda"])
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:\S+$", (ROOT / "deploy/docker/Dockerfile").read_text(),
                     re.MULTILINE)


def test_build_context_holds_what_copy_needs() -> None:
    dockerfile = ROOT / "deploy" / "docker" / "Dockerfile"
    ignore = [line.strip() for line in dockerfile.with_name("Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in ignore:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    sources = re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", dockerfile.read_text(), re.MULTILINE)
    assert sources
    for group in sources:
        for source in group.split():
            assert (ROOT / source).exists(), source
            assert included(source.rstrip("/")), f"{source} is excluded from the build context"
    assert not included("services/v1") and not included(".venv")
