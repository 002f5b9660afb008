"""Loaders for LongBench, InfiniteBench and RULER JSONL files: published formats load, bad lines are named."""

from __future__ import annotations

import json

import pytest

from eval_fixtures import DATA_DIR, StubTokenizer
from kvsieve.eval import DataFormatError, load_benchmark_file, render, score_sample, truncate_middle
from kvsieve.eval.tasks.longbench import LONGBENCH_TEMPLATES


def _raw(sample, index=0):
    return render(sample, index, None, chat=False).full_text


def test_longbench_rows_load_with_templates_metrics_and_rules():
    samples = load_benchmark_file(DATA_DIR / "longbench" / "mixed.jsonl")
    assert [s.task for s in samples] == ["longbench/qasper", "longbench/trec", "longbench/passage_retrieval_en"]
    assert [s.metric for s in samples] == ["qa_f1", "classification", "retrieval"]
    assert [s.max_new_tokens for s in samples] == [128, 64, 32]
    qasper, trec, retrieval = samples
    assert qasper.sample_id == "longbench/qasper/lb-qasper-1"
    assert _raw(qasper).startswith("You are given a scientific article and a question.")
    assert "Article: The expedition left the harbour of Westhaven" in _raw(qasper)
    assert _raw(qasper).endswith("Question: Which harbour did the expedition leave from?\n\nAnswer:")
    assert "{braces}" in _raw(qasper)  # braces in the context survive the template
    assert qasper.template.chat and not trec.template.chat  # pred.py feeds trec raw
    assert trec.meta["all_classes"] == ["Number", "Person", "Location", "Other location"]
    assert score_sample(trec, 0, "\nLocation\nsomething else") == 1.0  # first line only, then classification
    assert score_sample(retrieval, 0, "Paragraph 1") == 1.0
    assert _raw(retrieval).endswith('"Paragraph 2", etc.\n\nThe answer is: ')


def test_longbench_templates_rebuild_the_published_prompt():
    template = LONGBENCH_TEMPLATES["repobench-p"]
    assert template.before_context == "Please complete the code given below. \n"
    assert template.after_context == "{question}Next line of code:\n"


def test_longbench_e_buckets():
    samples = load_benchmark_file(DATA_DIR / "longbench" / "qasper_e.jsonl")
    assert {s.meta["benchmark"] for s in samples} == {"longbench-e"}
    assert [s.meta["length_bucket"] for s in samples] == ["0-4k", "4-8k", "8k+"]
    assert {s.task for s in samples} == {"longbench/qasper"}


def test_infinitebench_files_load():
    passkey = load_benchmark_file(DATA_DIR / "infinitebench" / "passkey.jsonl")
    assert len(passkey) == 3 and passkey[0].metric == "first_int_match" and passkey[0].max_new_tokens == 6
    upstream = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
        "about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"
    )
    row = json.loads((DATA_DIR / "infinitebench" / "passkey.jsonl").read_text().splitlines()[0])
    assert _raw(passkey[0]) == upstream.format(context=row["context"], input=row["input"])
    assert score_sample(passkey[0], 0, " 04521.") == 1.0

    choice = load_benchmark_file(DATA_DIR / "infinitebench" / "longbook_choice_eng.jsonl")
    assert [s.questions[0].answers for s in choice] == [("north", "B"), ("by the river", "D"), ("rye", "A")]
    assert _raw(choice[0]).endswith(
        "Question: Where did Ann sail?\nA. south\nB. north\nC. east\nD. west\n\nThe letter of the correct answer is"
    )
    assert score_sample(choice[0], 0, "B") == 1.0

    kv = load_benchmark_file(DATA_DIR / "infinitebench" / "kv_retrieval.jsonl")
    row = json.loads((DATA_DIR / "infinitebench" / "kv_retrieval.jsonl").read_text().splitlines()[0])
    expected = (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        f"{row['context']}\n\n{row['input']}"
    )
    assert _raw(kv[0]) == expected and kv[0].questions[0].question == 'Key: "k0-b"'
    assert score_sample(kv[0], 0, '"v0-b"') == 1.0


def test_ruler_files_load_and_split_at_the_context():
    path = DATA_DIR / "ruler" / "niah_single_1" / "validation.jsonl"
    samples = load_benchmark_file(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s.task for s in samples] == ["ruler/niah_single_1"] * 3  # task from the folder RULER writes
    for sample, row in zip(samples, rows):
        assert _raw(sample) == row["input"] + row["answer_prefix"]
        assert sample.meta["split"] == "marker" and not sample.template.chat
        assert sample.context.startswith("The grass is green.") and sample.context.endswith("back again.")
        assert sample.questions[0].question.startswith("What is the special magic number for ")
        assert sample.max_new_tokens == 128 and sample.metric == "string_match_all"
    assert score_sample(samples[0], 0, " 1234567.") == 1.0


def test_old_ruler_files_keep_the_answer_prefix_in_the_input():
    path = DATA_DIR / "ruler" / "vt" / "validation.jsonl"
    samples = load_benchmark_file(path, benchmark="ruler")
    row = json.loads(path.read_text().splitlines()[0])
    sample = samples[0]
    assert _raw(sample) == row["input"]
    assert sample.questions[0].answer_prefix.startswith(" Answer: According to the chain(s)")
    assert sample.context.startswith("The grass is green.") and "VAR AAAAA = 12340" in sample.context
    assert sample.max_new_tokens == 30


def test_group_by_context_gives_several_questions(tmp_path):
    rows = [
        {
            "input": f"Q{i}?",
            "context": "One shared document.",
            "answers": [f"a{i}"],
            "dataset": "multifieldqa_en",
            "_id": str(i),
        }
        for i in range(3)
    ]
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sample,) = load_benchmark_file(path, group_by_context=True)
    assert [q.question for q in sample.questions] == ["Q0?", "Q1?", "Q2?"]
    assert len(load_benchmark_file(path)) == 3


def test_truncation_keeps_head_and_tail(tmp_path):
    context = " ".join(f"w{i}" for i in range(400))
    path = tmp_path / "long.jsonl"
    row = {"input": "Which word?", "context": context, "answers": ["w1"], "dataset": "multifieldqa_en"}
    path.write_text(json.dumps(row))
    tokenizer = StubTokenizer()
    (sample,) = load_benchmark_file(path, tokenizer=tokenizer, max_length=300)
    assert sample.meta["truncation"] == "prompt" and sample.meta["truncated_from_tokens"] > 300
    assert sample.context.startswith("w0 w1 ") and sample.context.endswith("w399")
    assert len(tokenizer.encode(_raw(sample))) <= 301
    assert truncate_middle(sample, tokenizer, 10_000) is sample


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_LONGBENCH = json.dumps({"input": "q", "context": "c", "answers": ["a"], "dataset": "qasper"})


@pytest.mark.parametrize(
    ("second_line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"input": "q", "context": "c", "dataset": "qasper"}), "missing field 'answers'"),
        (json.dumps({"input": "q", "context": "c", "answers": "a", "dataset": "qasper"}), "'answers' must be list"),
        (json.dumps({"input": "q", "context": "c", "answers": ["a"], "dataset": "qasperr"}), "closest: qasper"),
        (json.dumps({"input": "q", "context": "c", "answers": ["a"], "dataset": "trec"}), "all_classes"),
    ],
)
def test_malformed_longbench_line_names_file_and_line(tmp_path, second_line, problem):
    path = _write(tmp_path, "bad.jsonl", [GOOD_LONGBENCH, second_line, GOOD_LONGBENCH])
    with pytest.raises(DataFormatError, match=problem) as caught:
        load_benchmark_file(path, benchmark="longbench")
    assert f"{path}:2:" in str(caught.value)


def test_malformed_infinitebench_and_ruler_lines(tmp_path):
    good = json.dumps({"id": 0, "context": "c", "input": "Where?", "answer": ["x"], "options": ["x", "y", "z", "w"]})
    bad = json.dumps({"id": 1, "context": "c", "input": "Where?", "answer": ["v"], "options": ["x", "y", "z", "w"]})
    path = _write(tmp_path, "longbook_choice_eng.jsonl", [good, good, bad])
    with pytest.raises(DataFormatError, match=r"longbook_choice_eng.jsonl:3: 'answer' must be one of the options"):
        load_benchmark_file(path)
    path = _write(tmp_path, "niah.jsonl", [json.dumps({"input": "x", "outputs": [1]})])
    with pytest.raises(DataFormatError, match=r"niah.jsonl:1: field 'outputs' must be a non-empty list of strings"):
        load_benchmark_file(path, benchmark="ruler")
    path = _write(tmp_path, "mystery.jsonl", [json.dumps({"question": "x"})])
    with pytest.raises(DataFormatError, match="cannot tell the benchmark"):
        load_benchmark_file(path)
    empty = _write(tmp_path, "empty.jsonl", [""])
    with pytest.raises(DataFormatError, match="no rows"):
        load_benchmark_file(empty, benchmark="ruler")
    assert issubclass(DataFormatError, ValueError)


def test_unterminated_string_and_non_utf8_lines_read_cleanly(tmp_path):
    path = tmp_path / "qasper.jsonl"
    path.write_text('{"input": "q", "context": "an unterminated string')
    with pytest.raises(DataFormatError, match=r"qasper.jsonl:1: invalid JSON") as caught:
        load_benchmark_file(path)
    assert str(caught.value).endswith("invalid JSON (Unterminated string starting at column 27)")  # not "at at"
    path.write_bytes(b'{"input": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"qasper.jsonl:1: not UTF-8 text \(byte 0xe9 at offset 14 of the line\)"):
        load_benchmark_file(path)
