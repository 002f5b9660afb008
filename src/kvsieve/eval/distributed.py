"""Sweeps over several processes or machines, with Ray (``kvsieve eval --workers N``).

The sweep's units are split into ``N`` shards (`run_eval`'s ``shard=(k, N)``: units ``k, k + N, ...`` of the plan);
each shard is one Ray task that loads the model and runs its units into its own rows file of the one run
directory. The directory must be reachable at the same path from every worker (the local machine, or a shared
filesystem on a cluster). ``RAY_ADDRESS`` selects a running cluster; without it a local one is started, sized to
this machine. With GPUs in the cluster (and ``device`` not ``cpu``) every task reserves one and loads the model on
it: Ray shows a task only the GPU it reserved, as ``cuda``, whatever ``cuda:N`` the configuration names. Otherwise
(no GPUs, or ``device: cpu``) each takes an equal share of the CPUs, sets its torch threads to it and loads on the
CPU.

Interrupted, the sweep resumes like any other: rerun the command, with any number of workers (or none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvsieve.eval.config import EvalConfig
from kvsieve.eval.rundir import open_run_dir, run_rows
from kvsieve.eval.runner import run_eval
from kvsieve.eval.summary import format_summary, write_summary

__all__ = ["run_eval_ray", "worker_device"]


def worker_device(device: str, gpus: int) -> str:
    """Where a Ray task loads the model: the GPU it reserved (Ray's ``CUDA_VISIBLE_DEVICES`` shows it as the only
    ``cuda``), unless there are no GPUs or the sweep asks for the CPU."""
    return "cuda" if gpus and device != "cpu" else "cpu"


def _run_shard(config: dict[str, Any], out: str, k: int, n: int, threads: int | None) -> int:
    """One Ray task: shard ``k`` of ``n``; returns how many rows the run directory holds when it ends. ``config``
    names the task's own device (`worker_device`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_eval(config, out, shard=(k, n), progress=False, echo=None)
    return len(run_rows(out))


def run_eval_ray(
    config: EvalConfig | dict[str, Any], out: str | Path, workers: int, *, force: bool = False, echo=print
) -> list[dict[str, Any]]:
    """Run (or resume) the sweep ``config`` into ``out`` as ``workers`` Ray tasks; returns the summary groups."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    try:
        import ray
    except ImportError:
        raise ImportError("--workers needs Ray: pip install 'kvsieve[ray]' (or pip install ray)") from None
    say = echo or (lambda _text: None)
    if not isinstance(config, EvalConfig):
        config = EvalConfig.from_dict(config)
    config.validate()  # every error before a cluster starts
    if config.model is None:
        from kvsieve.models import DEFAULT_MODEL

        config.model = DEFAULT_MODEL
    out = Path(out).resolve()
    if open_run_dir(out, config, force, say):  # once, here: the shards then find this configuration
        groups = run_eval(config, out, echo=say)  # finished: says so and returns the summary
        return groups

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        device = worker_device(config.device, gpus)
        if device == "cuda":
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            threads = None
        else:
            cpus = max(1, int(resources.get("CPU", 1)) // workers)
            options, threads = {"num_cpus": cpus}, cpus
        task = ray.remote(max_retries=0, **options)(_run_shard)
        data = {**config.to_dict(), "device": device}  # device is no part of the run's identity: shards resume it
        futures = [task.remote(data, str(out), k, workers, threads) for k in range(workers)]
        each = "1 GPU" if device == "cuda" else f"{threads} CPUs"
        say(f"kvsieve eval: {workers} Ray tasks ({each} each) into {out}")
        ray.get(futures)
    finally:
        if started:
            ray.shutdown()
    rows = run_rows(out)
    groups = write_summary(out, rows, complete=True)  # every shard finished its units: the plan is done
    say(format_summary(groups))
    return groups
