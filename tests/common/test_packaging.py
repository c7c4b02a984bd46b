"""The generated protocol package is importable from anywhere and never committed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_package_importable_from_any_directory(tmp_path: Path) -> None:
    code = ("import infermesh.v1.inference_pb2 as p, infermesh.v1.worker_pb2_grpc, infermesh.cli;"
            "print(p.GenerateRequest(model='m', prompt='x').model)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "m"


def test_generated_code_has_stubs_and_is_not_tracked() -> None:
    generated = ROOT / "services" / "v1"
    for name in ("common", "tokenizer", "scheduler", "worker", "inference"):
        assert (generated / f"{name}_pb2.py").is_file()
        assert (generated / f"{name}_pb2.pyi").is_file()
        assert (generated / f"{name}_pb2_grpc.pyi").is_file()
    tracked = subprocess.run(["git", "ls-files", "services/v1"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked == ""


def test_public_generate_request_has_the_contract_fields() -> None:
    from infermesh.v1 import inference_pb2

    fields = set(inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {"model", "messages", "prompt", "sampling"} <= fields
    sampling = set(inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["sampling"].message_type.fields_by_name)
    assert {"max_tokens", "temperature", "top_p", "seed", "stop"} <= sampling
    chunk = set(inference_pb2.GenerateResponse.DESCRIPTOR.fields_by_name)
    assert {"text", "token_ids", "finish_reason", "usage"} <= chunk


def test_every_cli_command_imports_and_has_help(tmp_path: Path) -> None:
    from infermesh.cli import COMMANDS

    for command in COMMANDS:
        # Run from elsewhere than the repository, as the installed `infermesh` command is.
        result = subprocess.run([str(Path(sys.executable).parent / "infermesh"), command, "--help"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"infermesh {command} --help: {result.stderr[-2000:]}"
        assert "usage" in result.stdout.lower(), command


def test_every_package_of_the_tree_is_in_the_distribution() -> None:
    # The editable install finds any subpackage; a wheel (the images) has only those listed.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    services = ROOT / "services"
    found = {"infermesh" + ("." + ".".join(p.parent.relative_to(services).parts) if p.parent != services else "")
             for p in services.rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
