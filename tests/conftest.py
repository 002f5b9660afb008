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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    a second thread only adds synchronisation, which costs milliseconds per op on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
