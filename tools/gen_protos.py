"""Generate the Python protobuf and gRPC code from protos/ into services/v1/.

The result is the package `infermesh.v1` (with .pyi type stubs), never
committed. `make proto` runs this when a .proto file changes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "services" / "v1"


def main() -> int:
    # protoc finds the mypy-protobuf plugins on PATH, next to this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "infermesh" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        generated = Path(tmp) / "infermesh" / "v1"
        staging = OUT.with_name("v1.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(generated, staging)
        (staging / "__init__.py").write_text('"""Generated from protos/infermesh/v1 by tools/gen_protos.py."""\n')
        (staging / "py.typed").write_text("")
        shutil.rmtree(OUT, ignore_errors=True)
        staging.rename(OUT)
    print(f"generated {len(protos)} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
