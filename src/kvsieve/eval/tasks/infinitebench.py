"""InfiniteBench's synthetic retrieval tasks, regenerated offline at any length, and its prompt templates.

Formats follow InfiniteBench's construct_synthetic_dataset and its yarn-mistral (base model) templates. The
template's trailing cue ("The pass key is") is stored as the answer prefix: raw prompts are identical to upstream,
and with a chat template the cue starts the assistant turn instead of ending the user turn.
"""

from __future__ import annotations

import json
import string
import uuid

from .base import QA, PromptTemplate, Sample, TokenizerLike, fit_to_length, make_sample_id, sample_rng

__all__ = [
    "INFINITEBENCH_MAX_NEW_TOKENS",
    "INFINITEBENCH_METRICS",
    "INFINITEBENCH_TEMPLATES",
    "KV_ANSWER_PREFIX",
    "NOISE_LINE",
    "build_kv_retrieval",
    "build_number_string",
    "build_passkey",
]

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
NUMBER_STRING_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"
PASSKEY_QUESTION = "What is the pass key?"
NUMBER_STRING_QUESTION = "What is the sequence of digits?"
KV_ANSWER_PREFIX = "\nThe value associated with the specified key is: "

# Upstream DATA_NAME_TO_MAX_NEW_TOKENS, used for loaded files. The passkey generator defaults to 8 (the CPU plan):
# with a chat template the model often starts with a space or repeats the cue before the digits.
INFINITEBENCH_MAX_NEW_TOKENS = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}

INFINITEBENCH_METRICS = {
    "passkey": "first_int_match",
    "number_string": "first_int_match",
    "kv_retrieval": "kv_retrieval",
    "longbook_sum_eng": "rouge_lsum",
    "longbook_choice_eng": "choice",
    "longbook_qa_eng": "qa_f1",
    "longbook_qa_chn": "char_f1_zh",
    "longdialogue_qa_eng": "dialogue_name",
    "math_find": "math_find",
    "math_calc": "math_calc",
    "code_run": "code_run",
    "code_debug": "code_debug",
}

_INFO = "There is an important info hidden inside a lot of irrelevant text. "

# yarn-mistral templates split at the context; {question} is filled per question. The pieces that upstream
# fills from other fields (options, function names, the math_find prefix) are filled by the loader.
INFINITEBENCH_TEMPLATES: dict[str, PromptTemplate] = {
    "passkey": PromptTemplate(
        "infinitebench/passkey",
        _INFO + "Find it and memorize it. I will quiz you about the important information.\n\n",
        "\n\n{question}",
    ),
    "number_string": PromptTemplate(
        "infinitebench/number_string",
        _INFO + "Find it. I will quiz you about the important information there.\n\n",
        "\n\n{question}",
    ),
    "kv_retrieval": PromptTemplate(
        "infinitebench/kv_retrieval",
        "Extract the value corresponding to the specified key in the JSON object below.\n\n",
        "\n\n\n{question}",
    ),
    "longbook_sum_eng": PromptTemplate(
        "infinitebench/longbook_sum_eng", "Summarize the book below.\n\n", "\n\nSummary:"
    ),
    "longbook_choice_eng": PromptTemplate(
        "infinitebench/longbook_choice_eng",
        "Read the book and answer the question.\n\n",
        "\n\nQuestion: {question}\n\nThe letter of the correct answer is",
    ),
    "longbook_qa_eng": PromptTemplate(
        "infinitebench/longbook_qa_eng",
        "Read the book and answer the question. Be very concise in your answer.\n\n",
        "\n\nQuestion: {question}\nAnswer:",
    ),
    "longbook_qa_chn": PromptTemplate(
        "infinitebench/longbook_qa_chn", "阅读以下书籍然后回答问题。\n\n", "\n\n问题：{question}\n答案："
    ),
    "math_find": PromptTemplate("infinitebench/math_find", "{prefix}\n\n", "\n\n{question}"),
    "math_calc": PromptTemplate(
        "infinitebench/math_calc",
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\n"
        "Expression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: ",
        "\nValues:",
    ),
    "code_run": PromptTemplate(
        "infinitebench/code_run",
        "There is a function called {func} in the following Python code.\n\n",
        "\n\nPlease compute the exact value of {question}. The value of {question} is",
    ),
    "code_debug": PromptTemplate(
        "infinitebench/code_debug",
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it "
        "crash.\n\n",
        "\n\nOptions:\n{question}\n\nThe correct option is:",
    ),
    "longdialogue_qa_eng": PromptTemplate(
        "infinitebench/longdialogue_qa_eng",
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
        "and you should try to guess who that character is.\n\n",
        "\n\nThe name that has been replaced with $$MASK$$ is likely",
    ),
}

ANSWER_PREFIXES = {"passkey": "\n\nThe pass key is", "number_string": "\n\nThe sequence of digits is"}

# Upstream's 40 evenly spaced depths (RULER uses the same grid), the draw for samples without a requested depth.
DEPTH_GRID = tuple(round(100 * i / 39) / 100 for i in range(40))


def _random_digits(rng, count: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(count))


def _number_string_key(rng) -> str:
    """Ten digits: five random ones, then five insertions that each duplicate a digit in place (upstream)."""
    digits = list(_random_digits(rng, 5))
    for _ in range(5):
        position = rng.randrange(len(digits))
        digits.insert(position, digits[position])
    return "".join(digits)


def _build_noise_needle_task(
    task: str,
    needle: str,
    question: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None,
    key: str,
    max_new_tokens: int,
) -> Sample:
    rng = sample_rng(task, length, depth, seed, index, "depth")
    used_depth = rng.choice(DEPTH_GRID) if depth is None else depth
    template = INFINITEBENCH_TEMPLATES[task]
    qa = QA(question, (key,), ANSWER_PREFIXES[task])

    def build(n_lines: int) -> Sample:
        position = round(used_depth * n_lines)
        context = NOISE_LINE * position + needle + NOISE_LINE * (n_lines - position)
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=context,
            questions=(qa,),
            metric=INFINITEBENCH_METRICS[task],
            max_new_tokens=max_new_tokens,
            target_tokens=length,
            depth=used_depth,
            meta={
                "needle": needle,
                "needle_line": position,
                "haystack_lines": n_lines,
                "actual_depth": position / n_lines if n_lines else 0.0,
                "haystack": "noise",
                "benchmark": "infinitebench",
            },
            template=template,
        )

    return fit_to_length(build, tokenizer, length, chat=chat, start_size=16, task=task)


def build_passkey(tokenizer, length, depth, seed, index, chat=None, max_new_tokens: int = 8) -> Sample:
    """Passkey: a 5-digit key (leading zeros possible) in repeated noise lines, at `depth`."""
    key = _random_digits(sample_rng("passkey", length, depth, seed, index, "key"), 5)
    needle = PASSKEY_NEEDLE.format(key=key)
    return _build_noise_needle_task(
        "passkey", needle, PASSKEY_QUESTION, tokenizer, length, depth, seed, index, chat, key, max_new_tokens
    )


def build_number_string(tokenizer, length, depth, seed, index, chat=None, max_new_tokens: int = 12) -> Sample:
    """Number string: a 10-digit key with repeated adjacent digits in noise lines, at `depth`."""
    key = _number_string_key(sample_rng("number_string", length, depth, seed, index, "key"))
    needle = NUMBER_STRING_NEEDLE.format(key=key)
    return _build_noise_needle_task(
        "number_string",
        needle,
        NUMBER_STRING_QUESTION,
        tokenizer,
        length,
        depth,
        seed,
        index,
        chat,
        key,
        max_new_tokens,
    )


def _random_uuid(rng) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_kv_retrieval(
    tokenizer, length, depth, seed, index, chat=None, max_new_tokens: int = 50, n_questions: int = 1
) -> Sample:
    """KV retrieval: a JSON object of UUID4 keys and values; the queried pair sits at `depth` of the object.

    `n_questions` > 1 asks about further keys, at random positions, on the same context.
    """
    task = "kv_retrieval"
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    pool_rng = sample_rng(task, length, depth, seed, index, "pairs")
    pick_rng = sample_rng(task, length, depth, seed, index, "pick")
    used_depth = pick_rng.choice(DEPTH_GRID) if depth is None else depth
    extra_fractions = [pick_rng.random() for _ in range(n_questions - 1)]
    pool: list[tuple[str, str]] = []

    def build(n_pairs: int) -> Sample:
        n_pairs = max(n_pairs, n_questions)
        while len(pool) < n_pairs:
            pool.append((_random_uuid(pool_rng), _random_uuid(pool_rng)))
        pairs = pool[:n_pairs]
        queried = [round(used_depth * (n_pairs - 1))]
        for fraction in extra_fractions:
            candidates = [i for i in range(n_pairs) if i not in queried]
            queried.append(candidates[int(fraction * len(candidates))])
        context = "JSON data:\n" + json.dumps(dict(pairs))
        questions = tuple(QA(f'Key: "{pairs[i][0]}"', (pairs[i][1],), KV_ANSWER_PREFIX) for i in queried)
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=context,
            questions=questions,
            metric="kv_retrieval",
            max_new_tokens=max_new_tokens,
            target_tokens=length,
            depth=used_depth,
            meta={
                "queried_indices": queried,
                "n_pairs": n_pairs,
                "actual_depth": queried[0] / (n_pairs - 1) if n_pairs > 1 else 0.0,
                "benchmark": "infinitebench",
            },
            template=INFINITEBENCH_TEMPLATES[task],
        )

    return fit_to_length(build, tokenizer, length, chat=chat, min_size=n_questions, start_size=8, task=task)
