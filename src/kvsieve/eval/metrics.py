"""Scoring functions of LongBench, InfiniteBench, RULER and LongProc, re-implemented from their descriptions.

Every metric takes the prediction, the sample's answers and keyword options, and returns a float in [0, 1]
(upstream reports the per-task mean x100; kvsieve stores [0, 1]). How the answers combine follows the benchmark:
LongBench takes the maximum over gold answers; RULER's string_match_all averages over them; InfiniteBench's
label structures are described per metric (choice and code_debug get (option text, letter), math_calc the whole
list of intermediate values).
"""

from __future__ import annotations

import csv
import difflib
import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tasks.base import Sample

__all__ = [
    "METRICS",
    "code_sim_similarity",
    "normalize_answer",
    "normalize_zh_answer",
    "rouge_l",
    "rouge_lsum",
    "score",
    "score_sample",
]

Metric = Callable[..., float]

_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》"
    + "「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---------------------------------------------------------------- shared pieces


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, in LongBench's order: lowercase, drop punctuation, drop articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lowercase, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def _token_f1(prediction: Sequence[str], gold: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _max_over(answers: Sequence[str], one: Callable[[str], float]) -> float:
    return max((one(answer) for answer in answers), default=0.0)


@functools.lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError:
        raise ImportError("the Chinese metrics (qa_f1_zh, rouge_zh) need jieba: pip install jieba==0.42.1") from None
    jieba.setLogLevel(60)
    return jieba


def _jieba_cut(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


def _lcs_table(x: Sequence[Any], y: Sequence[Any]) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, xi in enumerate(x, start=1):
        row, previous = table[i], table[i - 1]
        for j, yj in enumerate(y, start=1):
            row[j] = previous[j - 1] + 1 if xi == yj else max(previous[j], row[j - 1])
    return table


# ---------------------------------------------------------------- LongBench


def qa_f1(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """Token-multiset F1 after SQuAD normalisation, max over answers (LongBench, InfiniteBench En.QA)."""
    tokens = normalize_answer(prediction).split()
    return _max_over(answers, lambda gold: _token_f1(tokens, normalize_answer(gold).split()))


def qa_f1_zh(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """F1 over jieba words, each normalised, empty words dropped; max over answers."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_cut(text)) if w]

    tokens = words(prediction)
    return _max_over(answers, lambda gold: _token_f1(tokens, words(gold)))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as the `rouge` package (1.0.1) computes it for LongBench, or 0 where it would raise.

    Texts split into sentences on '.', whitespace collapsed; words split on single spaces; no lowercasing or
    stemming; summary-level union LCS counted over *unique* words (exclusive mode). Unlike the package, long
    sentences do not hit Python's recursion limit (which LongBench would score 0).
    """
    hypothesis = [" ".join(s.split()) for s in prediction.split(".") if len(s) > 0]
    references = [" ".join(s.split()) for s in reference.split(".") if len(s) > 0]
    if not hypothesis or not references:
        return 0.0
    hypothesis_words = [s.split(" ") for s in hypothesis]
    n_reference = len({w for s in references for w in s.split(" ")})
    n_hypothesis = len({w for s in hypothesis_words for w in s})
    union: set[str] = set()
    for sentence in references:
        words = sentence.split(" ")
        for candidate in hypothesis_words:
            union |= _lcs_words(words, candidate)
    hits = len(union)
    recall, precision = hits / n_reference, hits / n_hypothesis
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The words of one LCS of x and y, backtracked with the package's tie-breaking (prefer dropping from y)."""
    table = _lcs_table(x, y)
    i, j, words = len(x), len(y), set()
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """LongBench rouge_score: ROUGE-L F, max over answers; an empty prediction scores 0."""
    return _max_over(answers, lambda gold: rouge_l(prediction, gold))


def rouge_zh(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """LongBench rouge_zh_score: jieba words joined by spaces, then ROUGE-L."""
    spaced = " ".join(_jieba_cut(prediction))
    return _max_over(answers, lambda gold: rouge_l(spaced, " ".join(_jieba_cut(gold))))


def classification(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] | None = None, **_) -> float:
    """LongBench classification_score: 1/k when the gold label is among the k class names found in the prediction.

    Class names that are proper substrings of the gold label are dropped first, with upstream's quirk kept: it
    removes while iterating, so the entry right after a removed one is not examined.
    """
    if all_classes is None:
        raise ValueError("classification needs all_classes=, the task's label set")

    def one(gold: str) -> float:
        matches = [name for name in all_classes if name in prediction]
        position = 0
        while position < len(matches):
            term = matches[position]
            if term in gold and term != gold:
                matches.remove(term)
            position += 1
        return 1.0 / len(matches) if gold in matches else 0.0

    return _max_over(answers, one)


def _fraction_equal(numbers: Sequence[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def _retrieval(prediction: str, answers: Sequence[str], pattern: str) -> float:
    def one(gold: str) -> float:
        match = re.search(pattern, gold)
        if match is None:
            return 0.0
        return _fraction_equal(re.findall(r"\d+", prediction), match.group(1))

    return _max_over(answers, one)


def retrieval(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """LongBench retrieval_score: share of the prediction's numbers equal to the gold paragraph number."""
    return _retrieval(prediction, answers, r"Paragraph (\d+)")


def retrieval_zh(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """retrieval_score for Chinese golds (段落N)."""
    return _retrieval(prediction, answers, r"段落(\d+)")


def count(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """LongBench count_score: share of the prediction's numbers equal to the gold count."""
    numbers = re.findall(r"\d+", prediction)
    return _max_over(answers, lambda gold: _fraction_equal(numbers, str(gold)))


def _lcs_length(a: str, b: str) -> int:
    """Character LCS length, bit-parallel (Allison-Dix / Hyyroe), fast enough for long code lines."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def code_sim_similarity(a: str, b: str) -> int:
    """fuzzywuzzy's ratio with python-Levenshtein (= rapidfuzz's fuzz.ratio, rounded): 0-100, 0 if a side is empty."""
    if not a or not b:
        return 0
    if a == b:
        return 100
    return round(100 * 2 * _lcs_length(a, b) / (len(a) + len(b)))


def code_sim(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """LongBench code_sim_score: the first line without ` # or //, fuzzy ratio to the gold line / 100."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((text for text in lines if "`" not in text and "#" not in text and "//" not in text), "")
    return _max_over(answers, lambda gold: code_sim_similarity(line, gold) / 100)


# ---------------------------------------------------------------- InfiniteBench


def _first_int(prediction: str) -> str:
    return next((piece for piece in re.split(r"[^0-9]", prediction) if piece), "")


def first_int_match(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench passkey / number_string: the first digit run equals the label string (leading zeros count)."""
    return float(bool(answers) and _first_int(prediction) == answers[0])


def _replace(text: str, characters: str | Sequence[str]) -> str:
    """Each of `characters` (single characters or words) turned into a space, as InfiniteBench cleans predictions."""
    for item in characters:
        text = text.replace(item, " ")
    return text


def kv_retrieval(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench kv_retrieval: after turning \\n : " ' . , ? ! { } into spaces, the label is one of the words."""
    words = _replace(prediction, "\n:\"'.,?!{}").split()
    return float(any(answer in words for answer in answers))


def _collapse_spaces(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def choice(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench longbook_choice_eng; answers = (option text, letter)."""
    prediction = prediction.strip()
    if not prediction:
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in answers)
    if prediction in answers:
        return 1.0
    cleaned = _collapse_spaces(_replace(prediction, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        found = cleaned.find(prefix)
        if found == -1:
            continue
        if len(cleaned) < found + len(prefix) + 1:
            return 0.0
        after = cleaned[found + len(prefix) + 1 :]
        return float(any(after.startswith(answer) for answer in answers))
    for word in cleaned.split():
        if word in "ABCD":
            return float(word in answers)
    return 0.0


def code_debug(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench code_debug; answers = (function name, letter)."""
    function_name, letter = answers[0], answers[1]
    prediction = prediction.strip()
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    cleaned = _collapse_spaces(_replace(prediction, ["\n", "`", "'", '"', "-", "*", "Option", "option"]))
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        found = cleaned.find(prefix)
        if found == -1:
            continue
        if len(cleaned) < found + len(prefix) + 1:
            return 0.0
        after = cleaned[found + len(prefix) + 1 :]
        return float(after.startswith(letter) or after.startswith(function_name))
    return 0.0


def math_find(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench math_find: the first number (int or decimal) in the prediction equals the label's value."""
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None or not answers:
        return 0.0
    try:
        return float(float(match.group(0)) == float(answers[0]))
    except ValueError:  # a label that is not a number cannot be matched
        return 0.0


def math_calc(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench math_calc: leading run of correct intermediate values / number of values (signs are lost)."""
    if not answers:
        return 0.0
    numbers = [int(piece) for piece in re.split(r"[^0-9]", prediction) if piece]
    correct = 0
    for predicted, label in zip(numbers, answers):
        if predicted != int(label):
            break
        correct += 1
    return correct / len(answers)


def code_run(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench code_run: the last word, read as an int, equals the label."""
    words = _replace(prediction.strip(), "\n.`'\":").split()
    if not words or not answers:
        return 0.0
    try:
        return float(int(words[-1]) == int(answers[0]))
    except ValueError:
        return 0.0


def dialogue_name(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench longdialogue_qa_eng: the (upper-case) first label is one of the upper-cased words."""
    words = [w.upper() for w in _replace(prediction.strip(), "\n:\"'.,?!{}").split()]
    return float(bool(answers) and answers[0] in words)


def char_f1_zh(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench longbook_qa_chn: character F1 after Chinese normalisation, max over answers."""
    characters = list(normalize_zh_answer(prediction))
    return _max_over(answers, lambda gold: _token_f1(characters, list(normalize_zh_answer(gold))))


def _rouge_score_tokens(text: str) -> list[str]:
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if re.fullmatch(r"[a-z0-9]+", t)]


def rouge_lsum(prediction: str, reference: str) -> float:
    """rougeLsum F as Google's rouge_score computes it (HF evaluate's default): lowercase, alphanumeric tokens,
    no stemmer, summaries split into sentences on newlines, union LCS with clipped token counts."""
    references = [_rouge_score_tokens(s) for s in reference.split("\n") if s]
    candidates = [_rouge_score_tokens(s) for s in prediction.split("\n") if s]
    m, n = sum(map(len, references)), sum(map(len, candidates))
    if not m or not n:
        return 0.0
    reference_counts = Counter(t for s in references for t in s)
    candidate_counts = Counter(t for s in candidates for t in s)
    hits = 0
    for sentence in references:
        union: set[int] = set()
        for candidate in candidates:
            union |= _lcs_positions(sentence, candidate)
        for position in sorted(union):
            token = sentence[position]
            if reference_counts[token] > 0 and candidate_counts[token] > 0:
                hits += 1
                reference_counts[token] -= 1
                candidate_counts[token] -= 1
    recall, precision = hits / m, hits / n
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lcs_positions(reference: Sequence[str], candidate: Sequence[str]) -> set[int]:
    """Reference positions of one LCS, backtracked as rouge_score does (prefer dropping from the reference)."""
    table = _lcs_table(reference, candidate)
    i, j, positions = len(reference), len(candidate), set()
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            positions.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return positions


def rouge_lsum_metric(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """InfiniteBench longbook_sum_eng: rougeLsum F, best reference."""
    return _max_over(answers, lambda gold: rouge_lsum(prediction, gold))


# ---------------------------------------------------------------- RULER


def _ruler_clean(prediction: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """RULER: the share of answers contained in the prediction, case-insensitive."""
    text = _ruler_clean(prediction).lower()
    return sum(answer.lower() in text for answer in answers) / len(answers) if answers else 0.0


def string_match_part(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """RULER qa: 1 if any answer is contained in the prediction, case-insensitive."""
    text = _ruler_clean(prediction).lower()
    return float(any(answer.lower() in text for answer in answers))


# ---------------------------------------------------------------- LongProc


def _normalize_cell(text: str) -> str:
    return normalize_answer(text).replace(" ", "")


def _tsv_rows(text: str) -> list[tuple[str, ...]]:
    """Rows of a TSV table (header first dropped), LongProc's way: a short last row is an end marker and is
    dropped, other rows of the wrong width become N/A rows; cells normalised without spaces."""
    rows = list(csv.reader(text.strip().split("\n"), delimiter="\t"))
    header, body = rows[0], rows[1:]
    if body and len(body[-1]) != len(header):
        body = body[:-1]
    return [
        tuple(_normalize_cell(cell) for cell in (row if len(row) == len(header) else ["N/A"] * len(header)))
        for row in body
    ]


def tsv_f1(prediction: str, answers: Sequence[str], **_: Any) -> float:
    """LongProc html_to_tsv: row F1 between the ```tsv block of the prediction and the gold table; 0 on any
    parse problem (no block, no rows, different widths)."""
    block = re.search(r"(?<=```tsv)([\s\S]*)(?=```)", prediction)
    if block is None or not answers:
        return 0.0
    try:
        predicted, gold = _tsv_rows(block.group(1)), _tsv_rows(answers[0])
        if not predicted or not gold or len(predicted[0]) != len(gold[0]):
            return 0.0
        gold_set, predicted_set = set(gold), set(predicted)
        precision = sum(row in gold_set for row in predicted) / len(predicted)
        recall = sum(row in predicted_set for row in gold) / len(gold)
    except (csv.Error, IndexError):
        return 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# ---------------------------------------------------------------- registry

METRICS: dict[str, Metric] = {
    # LongBench (spec §1.5)
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge,
    "rouge_zh": rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
    # InfiniteBench (spec §2.4); En.QA uses qa_f1
    "first_int_match": first_int_match,
    "kv_retrieval": kv_retrieval,
    "choice": choice,
    "code_debug": code_debug,
    "math_find": math_find,
    "math_calc": math_calc,
    "code_run": code_run,
    "dialogue_name": dialogue_name,
    "char_f1_zh": char_f1_zh,
    "rouge_lsum": rouge_lsum_metric,
    # RULER (spec §3.5)
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    # LongProc (spec §5)
    "tsv_f1": tsv_f1,
}


def score(metric: str, prediction: str, answers: Sequence[str], **kwargs: Any) -> float:
    """Score one prediction with a named metric, in [0, 1]."""
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, list(METRICS), n=3, cutoff=0.4)
        raise ValueError(f"unknown metric {metric!r}; closest: {', '.join(close) or ', '.join(sorted(METRICS))}")
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    return float(METRICS[metric](prediction, list(answers), **kwargs))


def score_sample(sample: Sample, question_index: int, prediction: str) -> float:
    """Score a prediction for one question of a sample, applying the benchmark's per-task rules.

    LongBench keeps only the first line for trec, triviaqa, samsum and lsht; classification gets all_classes.
    """
    if sample.meta.get("first_line_only"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    kwargs = {"all_classes": sample.meta["all_classes"]} if "all_classes" in sample.meta else {}
    return score(sample.metric, prediction, sample.questions[question_index].answers, **kwargs)
