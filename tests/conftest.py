"""Shared fixtures. The real default model and its tokenizer are loaded once per test run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once (converted on first use, then ~1 s)."""
    import kvsieve

    model, tokenizer = kvsieve.load_model()
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer(default_model):
    """The default model's tokenizer."""
    return default_model[1]
