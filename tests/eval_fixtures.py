"""Helpers for the evaluation-layer tests: a tiny stub tokenizer and the folder of JSONL fixtures.

Import what a test file needs, e.g. `from eval_fixtures import DATA_DIR, StubTokenizer`.
"""

from __future__ import annotations

import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


class StubTokenizer:
    """Words, single punctuation marks and whitespace runs are tokens; no chat template, optional BOS.

    Deterministic, invertible and fast: enough to test length fitting and needle placement without a model.
    """

    _PIECES = re.compile(r"\w+|[^\w\s]|\s+")

    def __init__(self, bos: bool = False) -> None:
        self.bos = bos
        self.vocab: dict[str, int] = {"<bos>": 0}
        self.inverse: dict[int, str] = {0: "<bos>"}

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab)
            self.inverse[self.vocab[piece]] = piece
        return self.vocab[piece]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(piece) for piece in self._PIECES.findall(text)]
        return [0, *ids] if add_special_tokens and self.bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.inverse[i] for i in ids if not (skip_special_tokens and i == 0))
