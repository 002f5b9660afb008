"""kvsieve.Budget: construction and its errors, resolve, labels and their order, and the labels of every
committed run directory read back unchanged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import kvsieve
from kvsieve import Budget
from kvsieve.budget import FULL_LABEL, label_order
from kvsieve.eval.config import EvalConfig, budget_label
from kvsieve.eval.summary import summarize
from kvsieve.methods.base import check_budget, resolve_budget

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def committed_labels() -> list[str]:
    """Every distinct budget label in the committed run directories' rows files."""
    labels: dict[str, None] = {}
    for path in sorted(RESULTS.glob("*/rows*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                labels[json.loads(line)["budget"]] = None
    return list(labels)


# ------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("value", "tokens_or_fraction", "label"),
    [(2048, 2048, "2048"), (1, 1, "1"), (0.2, 0.2, "0.2"), (1.0, 1.0, "1.0"), (1e-05, 1e-05, "1e-05")],
)
def test_of_a_number(value, tokens_or_fraction, label):
    budget = Budget.of(value)
    assert budget == Budget(value) and budget.value == tokens_or_fraction
    assert budget.is_fraction is isinstance(value, float)
    assert budget.label == label == str(budget) == repr(value)
    assert repr(budget) == f"Budget({value!r})"


def test_of_a_budget_or_a_label():
    budget = Budget(0.2)
    assert Budget.of(budget) is budget
    assert Budget.of("2048") == Budget(2048) and not Budget.of("2048").is_fraction
    assert Budget.of("0.2") == Budget(0.2) and Budget.of("0.2").is_fraction
    assert Budget.of("1") == Budget(1) != Budget.of("1.0") == Budget(1.0)  # a token is not the whole prompt


def test_a_token_and_the_whole_prompt_differ_in_equality_and_hash():
    assert Budget(1) != Budget(1.0)
    assert len({Budget(1), Budget(1.0), Budget.of("1"), Budget.of("1.0")}) == 2
    assert Budget(2) != 2  # a budget is not a number


def test_a_budget_is_frozen():
    with pytest.raises(AttributeError):
        Budget(2048).value = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("value", [0, -5])
def test_a_token_count_is_at_least_one(value):
    with pytest.raises(ValueError, match=r"^budget must be >= 1 token when given as an int, got -?\d+$"):
        Budget.of(value)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, float("nan"), float("inf")])
def test_a_fraction_is_in_the_unit_interval(value):
    with pytest.raises(ValueError, match=r"^budget as a fraction of the prompt must be in \(0, 1\], got "):
        Budget.of(value)


@pytest.mark.parametrize("value", [True, None, [0.2], b"0.2"])
def test_a_budget_is_a_number(value):
    with pytest.raises(TypeError, match=r"^budget must be an int \(tokens\) or a float in \(0, 1\]"):
        Budget.of(value)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"^snapkv budget must be >= 1 token"):
        Budget.of(0, name="snapkv budget")
    with pytest.raises(TypeError, match=r"^h2o budget must be an int"):
        Budget.of(None, name="h2o budget")
    with pytest.raises(ValueError, match=r"^h2o budget label 'x' names no budget"):
        Budget.of("x", name="h2o budget")


@pytest.mark.parametrize("label", ["-", "x", "", " 0.2", "inf", "nan", "0.2.1"])
def test_a_label_that_names_no_budget(label):
    with pytest.raises(ValueError, match="names no budget"):
        Budget.of(label)


@pytest.mark.parametrize(("label", "message"), [("0", "must be >= 1 token"), ("2048.0", r"must be in \(0, 1\]")])
def test_a_label_out_of_range(label, message):
    with pytest.raises(ValueError, match=message):
        Budget.of(label)


def test_the_constructor_validates_too():
    with pytest.raises(ValueError, match="must be >= 1 token"):
        Budget(0)
    with pytest.raises(TypeError, match="must be an int"):
        Budget("0.2")  # type: ignore[arg-type]  # labels go through Budget.of


def test_check_budget_delegates_and_still_refuses_labels():
    """The methods' helper keeps today's contract: numbers only, the same one-line errors."""
    check_budget(2048)
    check_budget(0.2)
    for bad, error in [(0, ValueError), (1.5, ValueError), ("0.2", TypeError), (Budget(0.2), TypeError)]:
        with pytest.raises(error) as caught:
            check_budget(bad, "infllm budget")
        with pytest.raises(error) as expected:
            Budget.from_number(bad, "infllm budget")
        assert str(caught.value) == str(expected.value) and str(caught.value).startswith("infllm budget ")
    with pytest.raises(TypeError, match="budget must be an int"):
        kvsieve.method("snapkv", budget="0.2")


# ------------------------------------------------------------------------------------------------ resolve
@pytest.mark.parametrize(
    ("value", "n_tokens", "resolved"),
    [(2048, 100, 2048), (0.2, 2048, 410), (0.5, 2000, 1000), (0.5, 5, 2), (0.2, 3, 1), (1e-05, 10, 1), (1.0, 777, 777)],
)
def test_resolve(value, n_tokens, resolved):
    """A fraction rounds (half to even, as ``round``) and is at least 1; a token count is itself."""
    assert Budget(value).resolve(n_tokens) == resolved == resolve_budget(value, n_tokens)


# ------------------------------------------------------------------------------------------------- labels
def test_committed_labels_round_trip():
    """Every label in docs/results/*/rows*.jsonl reads back as the budget it names and writes as itself, so the
    committed run directories keep their keys, columns and order."""
    labels = committed_labels()
    assert FULL_LABEL in labels and len(labels) > 2  # the results are there to guard
    for label in labels:
        if label == FULL_LABEL:
            assert budget_label(None) == FULL_LABEL
            continue
        budget = Budget.of(label)
        assert budget.label == label == budget_label(budget) == budget_label(budget.value)
        assert Budget.of(budget.label) == budget
        assert budget.is_fraction is isinstance(json.loads(label), float)  # written as repr(int) or repr(float)


def test_committed_labels_sort_as_before():
    """The order of the rule the runner and report used before `Budget` (``-`` first, then fractions, then
    token counts, each by value), applied to the committed labels."""

    def before(label: str) -> tuple[int, float]:
        if label == "-":
            return (0, 0.0)
        value = float(label)
        return (1 if value <= 1.0 and "." in label else 2, value)

    labels = committed_labels()
    for _ in range(5):
        random.Random(_).shuffle(labels)
        assert sorted(labels, key=label_order) == sorted(labels, key=before)


def test_order_fractions_first_each_by_value():
    assert sorted([Budget.of(v) for v in [0.5, 2048, 0.1, 512]]) == [
        Budget(0.1),
        Budget(0.5),
        Budget(512),
        Budget(2048),
    ]
    assert sorted(["2048", "0.5", "-", "512", "0.1"], key=label_order) == ["-", "0.1", "0.5", "512", "2048"]
    assert Budget(1.0) < Budget(1) < Budget(2)  # the whole prompt is a fraction: before every token count
    assert max(Budget(0.9), Budget(4)) == Budget(4) and Budget(0.1) <= Budget(0.1)
    assert sorted(["zz", "4", "-"], key=label_order) == ["-", "4", "zz"]  # a label kvsieve never writes: last


def test_summary_groups_sort_by_budget():
    rows = [
        {"key": str(i), "task": "t", "mode": "m", "method": method, "budget": label, "status": "ok", "score": 1.0}
        for i, (method, label) in enumerate(
            [("full", "-"), ("snapkv", "2048"), ("snapkv", "0.5"), ("snapkv", "512"), ("snapkv", "0.1")]
        )
    ]
    assert [g["budget"] for g in summarize(rows)] == ["-", "0.1", "0.5", "512", "2048"]


def test_a_sweep_carries_budgets():
    runs = EvalConfig.from_dict({"methods": ["snapkv"], "budgets": [0.2, 2048]}).method_runs()
    assert [(r.name, r.budget, r.label) for r in runs] == [
        ("full", None, "-"),
        ("snapkv", Budget(0.2), "0.2"),
        ("snapkv", Budget(2048), "2048"),
    ]
    assert runs[1].method.budget == 0.2 and runs[2].method.budget == 2048  # methods keep the number given
    assert isinstance(runs[2].method.budget, int)
