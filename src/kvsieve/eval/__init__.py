"""Evaluation: offline tasks, loaders for user-provided benchmark files, metrics, the sweep runner and its report."""

from .config import EvalConfig
from .metrics import METRICS, score, score_sample
from .report import write_report
from .rundir import read_rows, run_rows
from .runner import run_eval
from .summary import format_summary, summarize
from .tasks import (
    QA,
    TASKS,
    DataFormatError,
    LMDoc,
    PromptTemplate,
    Rendered,
    Sample,
    available_tasks,
    demo_document,
    lm_documents,
    load_benchmark_file,
    make_task,
    render,
    truncate_middle,
)

__all__ = [
    "METRICS",
    "QA",
    "TASKS",
    "DataFormatError",
    "EvalConfig",
    "LMDoc",
    "PromptTemplate",
    "Rendered",
    "Sample",
    "available_tasks",
    "demo_document",
    "format_summary",
    "lm_documents",
    "load_benchmark_file",
    "make_task",
    "read_rows",
    "render",
    "run_eval",
    "run_rows",
    "score",
    "score_sample",
    "summarize",
    "truncate_middle",
    "write_report",
]
