"""Metrics against hand-computed values, upstream edge cases, and the reference packages where installed."""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest

from kvsieve.eval import METRICS, QA, PromptTemplate, Sample, score, score_sample
from kvsieve.eval import metrics as m


def approx(value: float) -> object:
    return pytest.approx(value, abs=1e-6)


# ---------------------------------------------------------------- LongBench


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert m.normalize_answer("An apple, the  PIE.") == "apple pie"
    assert m.normalize_answer("Theatre and a-ha") == "theatre and aha"  # whole words only; '-' is punctuation


def test_qa_f1():
    assert score("qa_f1", "The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert score("qa_f1", "a big dog", ["the dog"]) == approx(2 / 3)  # [big, dog] vs [dog]
    assert score("qa_f1", "cat", ["dog"]) == 0.0
    assert score("qa_f1", "", ["dog"]) == 0.0
    assert score("qa_f1", "red", ["blue", "red"]) == 1.0  # max over golds
    assert score("qa_f1", "red red", ["red red blue"]) == approx(0.8)  # multiset counts: p=1, r=2/3
    assert score("qa_f1", "red red", ["red"]) == approx(2 / 3)


@pytest.mark.skipif(importlib.util.find_spec("jieba") is None, reason="jieba not installed")
def test_chinese_qa_f1_and_rouge():
    assert score("qa_f1_zh", "北京。", ["北京"]) == 1.0
    assert score("qa_f1_zh", "上海", ["北京"]) == 0.0
    assert score("rouge_zh", "我爱北京", ["我爱北京"]) == approx(1.0)
    assert score("rouge_zh", "", ["我爱北京"]) == 0.0


def test_chinese_metrics_name_the_missing_package(monkeypatch):
    m._jieba.cache_clear()
    monkeypatch.setitem(sys.modules, "jieba", None)
    try:
        with pytest.raises(ImportError, match="jieba"):
            score("qa_f1_zh", "北京", ["北京"])
    finally:
        m._jieba.cache_clear()


def test_rouge_l_by_hand():
    # unique words: prediction 6, reference 5, union LCS 5 -> r = 1, p = 5/6, F = 10/11
    assert m.rouge_l("the cat was found under the bed", "the cat was under the bed") == approx(10 / 11)
    assert score("rouge", "the cat sat", ["the cat sat"]) == approx(1.0)
    assert score("rouge", "The cat", ["the cat"]) == approx(0.5)  # no lowercasing
    assert score("rouge", "dog. cat", ["cat. dog"]) == approx(1.0)  # summary level: union over sentences


@pytest.mark.parametrize("prediction", ["", "...", " . . "])
def test_rouge_on_empty_text_is_zero(prediction):
    assert score("rouge", prediction, ["a reference summary"]) == 0.0
    assert score("rouge", "a prediction", [prediction or "."]) == 0.0


@pytest.mark.skipif(importlib.util.find_spec("rouge") is None, reason="rouge not installed")
def test_rouge_l_matches_the_rouge_package():
    from rouge import Rouge

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "The", "ran", "."]
    for _ in range(200):
        prediction = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        reference = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        try:
            expected = Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
        except Exception:  # LongBench scores any exception 0
            expected = 0.0
        assert m.rouge_l(prediction, reference) == approx(expected), (prediction, reference)


def test_classification_substring_rule():
    classes = ["city", "capital city", "country"]
    assert score("classification", "capital city", ["capital city"], all_classes=classes) == 1.0  # 'city' dropped
    assert score("classification", "city or country", ["country"], all_classes=classes) == 0.5
    assert score("classification", "a river", ["country"], all_classes=classes) == 0.0
    # upstream removes while iterating: after dropping 'ab' the next entry 'a' is skipped, so it stays
    assert score("classification", "abc", ["abc"], all_classes=["ab", "a", "b", "abc"]) == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        score("classification", "x", ["y"])


def test_retrieval_and_count():
    assert score("retrieval", "Paragraph 3", ["Paragraph 3"]) == 1.0
    assert score("retrieval", "Paragraph 3 or 5", ["Paragraph 3"]) == 0.5
    assert score("retrieval", "I do not know", ["Paragraph 3"]) == 0.0
    assert score("retrieval", "Paragraph 13", ["Paragraph 3"]) == 0.0
    assert score("retrieval_zh", "段落3", ["段落3"]) == 1.0
    assert score("count", "There are 12 unique paragraphs.", ["12"]) == 1.0
    assert score("count", "12 or 13", ["12"]) == 0.5
    assert score("count", "twelve", ["12"]) == 0.0


def test_code_sim():
    assert score("code_sim", "", ["x = 1"]) == 0.0
    assert score("code_sim", "\n\n```python\n# set x\nx = 1\n", ["x = 1"]) == 1.0  # first line without ` # //
    assert score("code_sim", "x = 2", ["x = 1"]) == approx(0.8)  # LCS 4 of 5+5 chars -> 80
    assert score("code_sim", "// only comments\n# here", ["x = 1"]) == 0.0


@pytest.mark.skipif(importlib.util.find_spec("rapidfuzz") is None, reason="rapidfuzz not installed")
def test_code_sim_ratio_matches_rapidfuzz():
    from rapidfuzz import fuzz

    rng = random.Random(1)
    alphabet = "abc xyz=()_.;"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert m.code_sim_similarity(a, b) == round(fuzz.ratio(a, b))


# ---------------------------------------------------------------- InfiniteBench


def test_first_int_match_keeps_leading_zeros():
    assert score("first_int_match", "The pass key is 01234.", ["01234"]) == 1.0
    assert score("first_int_match", "1234", ["01234"]) == 0.0
    assert score("first_int_match", "It is 5 then 01234", ["01234"]) == 0.0  # only the first digit run
    assert score("first_int_match", "", ["01234"]) == 0.0


def test_kv_retrieval_strips_punctuation():
    assert score("kv_retrieval", 'The value is "a1b2-c3d4".', ["a1b2-c3d4"]) == 1.0
    assert score("kv_retrieval", '{"a1b2-c3d4"}', ["a1b2-c3d4"]) == 1.0
    assert score("kv_retrieval", "a1b2-c3d4x", ["a1b2-c3d4"]) == 0.0


def test_choice():
    answers = ["blue", "B"]
    assert score("choice", "B. blue", answers) == 1.0
    assert score("choice", "A", answers) == 0.0
    assert score("choice", "blue", answers) == 1.0
    assert score("choice", "The answer is: blue", answers) == 1.0
    assert score("choice", "I think it is option B", answers) == 1.0  # first word found in "ABCD"
    assert score("choice", "   ", answers) == 0.0


def test_code_debug():
    answers = ["parse_row", "C"]
    assert score("code_debug", "C. parse_row", answers) == 1.0
    assert score("code_debug", "The correct option is: parse_row", answers) == 1.0
    assert score("code_debug", "The answer is: A", answers) == 0.0


def test_math_and_code_run():
    assert score("math_find", "The largest number is 42.", ["42"]) == 1.0
    assert score("math_find", "It is 3.5", ["3.5"]) == 1.0
    assert score("math_find", "none", ["42"]) == 0.0
    assert score("math_calc", "[1, 4, 8]", ["1", "4", "9"]) == approx(2 / 3)
    assert score("math_calc", "9, 4, 8", ["1", "4", "8"]) == 0.0  # the leading run stops at the first miss
    assert score("code_run", "The value is 5.", ["5"]) == 1.0
    assert score("code_run", "-3", ["-3"]) == 1.0
    assert score("code_run", "five", ["5"]) == 0.0


def test_dialogue_and_chinese_char_f1():
    assert score("dialogue_name", "It is probably john.", ["JOHN"]) == 1.0
    assert score("dialogue_name", "MARY", ["JOHN"]) == 0.0
    assert score("char_f1_zh", "北京市", ["北京"]) == approx(0.8)


def test_rouge_lsum_by_hand():
    assert score("rouge_lsum", "The cat sat", ["the cat"]) == approx(0.8)  # lowercased, hits 2, p 2/3, r 1
    assert score("rouge_lsum", "", ["the cat"]) == 0.0
    assert m.rouge_lsum("cat sat\nthe dog", "the dog\ncat sat") == approx(1.0)  # newline-separated sentences


# ---------------------------------------------------------------- RULER and LongProc


def test_string_match():
    assert score("string_match_all", " The numbers are 123 and 456.", ["123", "456", "789"]) == approx(2 / 3)
    assert score("string_match_all", "ABC-Def", ["abc-def"]) == 1.0
    assert score("string_match_all", "12\x0034", ["12\n34"]) == 1.0  # control characters become newlines
    assert score("string_match_part", "Paris, France", ["London", "paris"]) == 1.0
    assert score("string_match_part", "", ["London"]) == 0.0


def test_tsv_f1():
    prediction = "Here it is:\n```tsv\nname\tage\nThe Ann\t30\nBob\t41\n```"
    gold = "name\tage\nann\t30\nCid\t25"
    assert score("tsv_f1", prediction, [gold]) == 0.5  # 'The Ann' normalises to 'ann'
    assert score("tsv_f1", "name\tage\nann\t30", [gold]) == 0.0  # no ```tsv block
    assert score("tsv_f1", "```tsv\nname\nann\n```", [gold]) == 0.0  # different widths


# ---------------------------------------------------------------- registry


def test_unknown_metric_names_the_closest():
    with pytest.raises(ValueError, match="string_match_all"):
        score("string_match_al", "x", ["x"])
    with pytest.raises(TypeError):
        score("qa_f1", "x", "x")


def test_every_metric_stays_in_unit_interval():
    rng = random.Random(2)
    pieces = ["A", "B.", "answer is:", "12", "Paragraph 3", "x", "```tsv\na\tb\n1\t2\n```", "\n", " "]
    for name, metric in METRICS.items():
        if name in ("qa_f1_zh", "rouge_zh") and importlib.util.find_spec("jieba") is None:
            continue
        answers = ["a\tb\n1\t2"] if name == "tsv_f1" else ["Paragraph 3", "B"] if name != "math_calc" else ["1", "2"]
        kwargs = {"all_classes": ["A", "B"]} if name == "classification" else {}
        for _ in range(30):
            prediction = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            assert 0.0 <= metric(prediction, answers, **kwargs) <= 1.0, (name, prediction)


def test_score_sample_applies_longbench_first_line_rule():
    sample = Sample(
        "longbench/trec",
        "t/1",
        "ctx",
        (QA("q", ("Location",)),),
        "classification",
        64,
        meta={"first_line_only": True, "all_classes": ["Location", "Number"]},
        template=PromptTemplate(),
    )
    assert score_sample(sample, 0, "\n\nLocation\nNumber") == 1.0
    assert score("classification", "Location\nNumber", ["Location"], all_classes=["Location", "Number"]) == 0.5
