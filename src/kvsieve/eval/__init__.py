"""Evaluation: offline tasks, loaders for user-provided benchmark files, and metrics."""

from .metrics import METRICS, score, score_sample
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
    "LMDoc",
    "PromptTemplate",
    "Rendered",
    "Sample",
    "available_tasks",
    "demo_document",
    "lm_documents",
    "load_benchmark_file",
    "make_task",
    "render",
    "score",
    "score_sample",
    "truncate_middle",
]
