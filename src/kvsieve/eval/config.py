"""The configuration of an evaluation sweep: YAML file, command-line overrides, validation before any work.

`EvalConfig.load(path, overrides)` reads a YAML mapping (keys = the dataclass fields), applies the command line's
values on top (the command line wins; ``params`` merge per method and key) and `validate()` checks every name and
range -- tasks, metrics, methods, their parameters and budgets, data files -- so that a typo fails at once with
the close names instead of after an hour of prefills.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvsieve.budget import FULL_LABEL, Budget

__all__ = ["LM_TASK", "MODES", "NOT_IDENTITY", "EvalConfig", "MethodRun", "budget_label"]

MODES = ("query_aware", "query_agnostic")
LM_TASK = "lm"  # long-document language modelling (teacher-forced continuation)
FULL = "full"
# settings that say how a sweep runs, not what it computes: a run directory resumes whatever they are
NOT_IDENTITY = ("device",)


def budget_label(budget: Budget | int | float | None) -> str:
    """How a budget appears in rows, keys and tables: ``"-"`` for none (the full cache), else `Budget.label`."""
    return FULL_LABEL if budget is None else Budget.of(budget).label


@dataclass(frozen=True, eq=False)  # identity: a run is one column of the sweep
class MethodRun:
    """One column of a sweep: a method at one budget, built (and so validated) up front."""

    name: str
    budget: Budget | None  # None: the method has no budget (the full cache)
    method: Any  # kvsieve.Method

    @property
    def label(self) -> str:
        return budget_label(self.budget)

    @property
    def is_full(self) -> bool:
        return self.name == FULL


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.4)
    return ", ".join(close) if close else "none"


@dataclass
class EvalConfig:
    """Everything that determines a sweep's rows (the output directory does not).

    ``methods`` are registered names (``full`` always runs as the reference, whether listed or not). ``budgets``
    apply to every method that has a ``budget`` parameter, unless ``method_budgets[name]`` or
    ``params[name]["budget"]`` says otherwise. ``params``: ``{method: {parameter: value}}``. ``tasks``: generated
    task names or ``lm``; ``data``: benchmark files (``{path, benchmark, task, group_by_context}`` or a path).
    ``samples`` per (task, length, depth); ``depths`` None: each task's default (random RULER depths).
    Given ``data`` without ``tasks``, only the files run (``tasks`` defaults to ``[passkey]`` otherwise).
    ``metrics``: ``{task: metric}`` overrides; ``task_options``: ``{task: {option: value}}`` for the generators
    (e.g. ``{kv_retrieval: {n_questions: 2}}``, ``{niah_single_2: {haystack_source: kjv}}``). ``lm_continuation``:
    tokens scored after an ``lm`` context of ``length`` tokens. ``max_new_tokens`` None: each task's own. ``chat``
    None: the tokenizer's chat template when it has one. ``share_prefill``: one prefill per sample for the methods
    that compress after it. ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the GPUs if any, else the CPU);
    it is written to ``config.yaml`` but does not make another run: a run resumes on another device
    (`NOT_IDENTITY`), where its rows would differ only by float rounding (a changed ``dtype`` does make another run).
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "auto"  # where the model runs (`kvsieve.models.devices`); not part of the run's identity
    methods: list[str] = field(default_factory=lambda: ["snapkv"])
    budgets: list[int | float] = field(default_factory=lambda: [0.2])
    method_budgets: dict[str, list[int | float]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    data: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: [2048])
    samples: int = 5
    depths: list[float] | None = None
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seed: int = 0
    chunk_size: int | None = None
    max_new_tokens: int | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm_continuation: int = 128
    chat: bool | None = None
    share_prefill: bool = True

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> EvalConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = "; ".join(f"{k!r} (closest: {_close(str(k), names)})" for k in unknown)
            raise ValueError(f"{source}: unknown setting(s) {hints}; settings: {', '.join(names)}")
        data = dict(data)
        if data.get("data") and "tasks" not in data:  # benchmark files alone: run only them, not the default task
            data["tasks"] = []
        config = cls(**data)
        config.normalize()
        return config

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
        """The YAML file at ``path`` (if any) with ``overrides`` on top (None values are ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {str(path)!r} not found")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as error:
                raise ValueError(f"{path}: not valid YAML: {error}") from None
            if loaded is not None:
                if not isinstance(loaded, dict):
                    raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
                data.update(loaded)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key == "params":  # merge per method and parameter: the command line wins key by key
                merged = {m: dict(p or {}) for m, p in (data.get("params") or {}).items()}
                for method_name, params in value.items():
                    merged.setdefault(method_name, {}).update(params)
                data["params"] = merged
            else:
                data[key] = value
        return cls.from_dict(data, str(path) if path is not None else "config")

    def normalize(self) -> None:
        """Canonical forms: lists for sequences, data entries as mappings, ``full`` first among the methods."""
        as_list = ("methods", "budgets", "tasks", "lengths", "modes")
        for name in as_list:
            value = getattr(self, name)
            if isinstance(value, str | int | float):
                value = [value]
            setattr(self, name, list(value))
        if self.depths is not None:
            self.depths = [self.depths] if isinstance(self.depths, int | float) else list(self.depths)
        self.methods = [FULL] + [m for m in dict.fromkeys(self.methods) if m != FULL]
        self.data = [{"path": str(d)} if isinstance(d, str | Path) else dict(d) for d in self.data]
        for entry in self.data:
            if "path" in entry:
                entry["path"] = str(entry["path"])
        self.params = {str(k): dict(v or {}) for k, v in (self.params or {}).items()}
        self.task_options = {str(k): dict(v or {}) for k, v in (self.task_options or {}).items()}
        self.method_budgets = {
            str(k): list(v) if isinstance(v, list | tuple) else [v] for k, v in self.method_budgets.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------------------------------- validation
    def validate(self) -> list[MethodRun]:
        """Check everything that can be checked without the model; returns the method runs of the sweep."""
        from kvsieve.eval.metrics import METRICS
        from kvsieve.eval.tasks import TASKS, load_benchmark_file
        from kvsieve.methods.base import check_budget

        if not self.tasks and not self.data:
            raise ValueError("no tasks: give --tasks (e.g. passkey,niah_single_2) or --data FILE")
        known = [*TASKS, LM_TASK]
        for task in self.tasks:
            if task not in known:
                raise ValueError(f"unknown task {task!r}; closest: {_close(task, known)}. Tasks: {', '.join(known)}")
            if task != LM_TASK and not TASKS[task].available():
                raise ValueError(f"task {task} {TASKS[task].unavailable_hint}")
        for task, metric in self.metrics.items():
            if metric not in METRICS:
                raise ValueError(
                    f"unknown metric {metric!r} for task {task!r}; closest: {_close(metric, list(METRICS))}"
                )
            if task == LM_TASK:
                raise ValueError("task lm is scored by perplexity, KL and top-1 agreement; it takes no metric")
        for task, options in self.task_options.items():
            if task not in TASKS:  # options for a task not run now are fine: one config file, several sweeps
                raise ValueError(f"task_options names unknown task {task!r}; closest: {_close(task, list(TASKS))}")
            unknown = set(options) - set(TASKS[task].options)
            if unknown:
                raise ValueError(
                    f"task {task} has no option(s) {sorted(unknown)}; it accepts {list(TASKS[task].options)}"
                )
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; closest: {_close(mode, MODES)}. Modes: {', '.join(MODES)}")
        if not self.modes:
            raise ValueError("modes is empty; use query_aware and/or query_agnostic")
        _check_positive_int("samples", self.samples, 1)
        _check_positive_int("lm_continuation", self.lm_continuation, 1)
        _check_positive_int("seed", self.seed, 0)
        if self.chunk_size is not None:
            _check_positive_int("chunk_size", self.chunk_size, 1)
        if self.max_new_tokens is not None:
            _check_positive_int("max_new_tokens", self.max_new_tokens, 1)
        if not self.lengths:
            raise ValueError("lengths is empty")
        for length in self.lengths:
            _check_positive_int("lengths", length, 16)
        if self.depths is not None:
            if not self.depths:
                raise ValueError("depths is empty; leave it out for each task's default")
            for depth in self.depths:
                if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0.0 <= depth <= 1.0:
                    raise ValueError(f"depths are fractions of the context in [0, 1], got {depth!r}")
        from kvsieve.models.devices import parse_device

        self.device = parse_device(self.device, "device")
        if self.chat not in (None, True, False):
            raise TypeError(f"chat must be true, false or null, got {self.chat!r}")
        for budget in self.budgets:
            check_budget(budget)
        for name, budgets in self.method_budgets.items():
            if name not in self.methods:
                raise ValueError(f"method_budgets names {name!r}, which is not among the methods {self.methods}")
            for budget in budgets:
                check_budget(budget, f"{name} budget")
        for name in self.params:
            if name not in self.methods:
                raise ValueError(
                    f"params name method {name!r}, which is not among the methods {self.methods} "
                    f"(closest: {_close(name, self.methods)})"
                )
        for entry in self.data:
            unknown = set(entry) - {"path", "benchmark", "task", "group_by_context"}
            if unknown or "path" not in entry:
                raise ValueError(
                    f"a data entry needs 'path' and may have benchmark, task, group_by_context; got {sorted(entry)}"
                )
            path = Path(entry["path"])
            if not path.is_file():
                raise FileNotFoundError(f"data file {str(path)!r} not found")
            load_benchmark_file(path, entry.get("benchmark"), entry.get("task"))  # DataFormatError: file and line
        return self.method_runs()

    def method_runs(self) -> list[MethodRun]:
        """Every (method, budget) of the sweep, the full cache first; each built, so bad parameters fail now."""
        from kvsieve.methods.base import method as make_method

        runs: list[MethodRun] = []
        for name in self.methods:
            params = dict(self.params.get(name, {}))
            probe = make_method(name, **params)  # unknown method or parameter: an error with the close names
            has_budget = any(f.name == "budget" for f in dataclasses.fields(probe))
            if name == FULL or not has_budget:
                runs.append(MethodRun(name, None, probe))
                continue
            budgets = [params.pop("budget")] if "budget" in params else self.method_budgets.get(name, self.budgets)
            for budget in dict.fromkeys(budgets):
                try:
                    built = make_method(name, **params, budget=budget)
                except (TypeError, ValueError) as error:
                    raise ValueError(
                        f"method {name} does not take budget {budget!r}: {error}. Give it budgets of its own "
                        f"(method_budgets: {{{name}: [...]}} in the config, or --param {name}.budget=...)"
                    ) from None
                for length in self.lengths:  # structures sized from a fraction (InfLLM) must fit every length
                    try:
                        built.for_prompt(length)
                    except ValueError as error:
                        raise ValueError(f"method {name} at length {length}: {error}") from None
                runs.append(MethodRun(name, None if budget is None else Budget.of(budget), built))
        return runs

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """Human-readable differences between this config and another's dict (for refusing to resume); the
        `NOT_IDENTITY` settings are not compared (nor missing from a run written before they existed)."""
        mine = self.to_dict()
        out = []
        for key in sorted((set(mine) | set(other)) - set(NOT_IDENTITY)):
            a, b = other.get(key, "<absent>"), mine.get(key, "<absent>")
            if _canonical(a) != _canonical(b):
                out.append(f"{key}: {a!r} -> {b!r}")
        return out


def _canonical(value: Any) -> Any:
    """Compare configs as YAML would round-trip them (tuples become lists, 1.0 equals 1.0)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _check_positive_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
