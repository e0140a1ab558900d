"""Reproduce the one-shot benchmarks of the CBS and CHITA papers on their checkpoints, beside our methods.

    python scripts/reproduce.py --model mlpnet --data-dir ../shared/data --out results/reproduce
    python scripts/reproduce.py --model resnet20 --data-dir ../shared/data --jobs 2 --out results/reproduce

Every run is a `cbs prune` run: the same code (:func:`engine.pipeline.prepare`, :func:`engine.pipeline.execute`)
with the settings of the command line each record keeps (``command``), on the full training set of the model
(MNIST 60,000, CIFAR-10 50,000 images). A label of ``CONFIGS[model]`` is the flags of such a command: the
paper rows (``magnitude``, ``woodfisher``, their ``+update``, ``iht``, ``swap``) give the paper's setting and,
for ResNet20, ``--params cbs --bn-reestimate``; ``cbs`` is ``--method cbs``; ``multi-stage`` is the Fisher
multi-stage run from the dense model (``--objective fisher``, for ResNet20 with ``--warm-start none``),
``layerwise`` is ``--objective reconstruction``, and ResNet20's ``warm-start`` (above 0.6 only) is the Fisher
run from a layer-wise run (at 0.6 for 0.7, at 0.7 above): with ``layerwise`` up to 0.6, what ``cbs prune`` runs
without a flag.
Each is run at every sparsity (MLPNet 0.5 … 0.98, ResNet20 0.5 … 0.9) and for
every seed where the method draws at random (``seeds``: the RMP masks of cbs, the per-stage sample draws of
multi-stage). Single-stage configurations of one seed share the gradients (``execute(..., cache=...)``).

Writes under ``OUT/MODEL/``: ``records.jsonl`` (one line per run, appended as each run ends; re-running
the same command skips what is done, so an interrupted sweep resumes), ``table.md`` (accuracy mean ± std
over seeds, the published numbers beside), ``timing.md`` (seconds and peak memory of each run),
``accuracy.png``; and prints where it wrote them. ResNet20 has two tables: with BatchNorm re-estimation,
and without it (CHITA's protocol: single-stage runs measured before their final re-estimation, and
``multi-stage-no-bn`` and ``warm-start-no-bn``, those runs with ``--no-bn-reestimate``, which never
re-estimate; seed 0).

Labels outside the default sweep (``--configs`` names them): ``single-stage`` (the recommendation in one
stage with the mean-coupled Newton step and every unpruned parameter compensating), ``single-stage-lc``
(ResNet20: the paper's single-sample rows, 2,000 of them, λ = 1e-7 and the loss-curve budget).

``--jobs J`` runs the sweep in J worker processes (``--threads`` torch and BLAS threads each; by default
the cores divided by J). The runs that share cached gradients (the single-stage configurations of one
seed) go to one worker, in one unit; the largest units are handed out first, each to the next free
worker. Only the parent writes ``records.jsonl``, so a parallel sweep resumes like a serial one.
Peak memory is then per worker: the machine holds J of them.

``--bn-samples M`` (``cbs prune --param bn_samples=M``) sets the images of every ResNet20 BatchNorm
re-estimation. ``--preset NAME`` (``--params NAME``) prunes another parameter set in every run.
``--set KEY=VALUE`` (repeatable) overrides one setting of every run, for searching around a configuration
(``--configs multi-stage --set damping=1e-2 --out results/search/damping``); each record keeps its
command and settings. The test metric after every stage is measured for MLPNet only (``--param
stage_test=false`` for ResNet20, where a test pass costs 13 s; it changes no result).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from engine.cli import POSITIVE_INT, parse_value
from engine.config import PruneConfig
from engine.data import dataset_for_model, default_data_dir
from engine.errors import CBSError
from engine.models import DEFAULT_CHECKPOINTS as CHECKPOINTS
from engine.models import PRUNABLE_PRESETS, load_model
from engine.pipeline import evaluate_samples, execute, peak_memory_mb, prepare, settle
from engine.plots import accuracy_plot
from engine.progress import progress
from engine.recommend import LAYERWISE_UP_TO, PAPER, flag_form, zoo_profile
from engine.sources import Samples
from engine.published import PUBLISHED
from engine.records import append_jsonl, atomic_write_bytes, environment, read_jsonl


def _load_sibling(name: str):
    """A module of this folder (scripts are run as files, and the tests load them by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


retain_freed_memory = _load_sibling("memory_policy").retain_freed_memory

#: ResNet20 from 0.5: at 0.3 and 0.4 every method is within 0.3 points of the dense model, and on the full
#: training set a sweep from 0.3 would not fit an hour on 2 cores (--sparsities 0.3 0.4 runs them)
SPARSITIES = {"mlpnet": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98], "resnet20": [0.5, 0.6, 0.7, 0.8, 0.9]}

#: the paper settings of each model, as flags of `cbs prune` (engine.recommend.PAPER; MLPNet is a "small"
#: model, ResNet20 a "batchnorm" one): N = 10,000, λ = 1e-3, one block for MLPNet; N = 1,000, λ = 1e-5, one
#: block per layer for ResNet20, whose paper rows prune the CBS set (`--params cbs`, the 18 block convs)
BASE = {model: {k: v for k, v in PAPER[kind].items() if k != "params"}
        for model, kind in (("mlpnet", "small"), ("resnet20", "batchnorm"))}
PAPER_PARAMS = {"mlpnet": None, "resnet20": PAPER["batchnorm"]["params"]}


class Label(NamedTuple):
    """One row of the sweep as the `cbs prune` run it is: ``settings`` the PruneConfig keywords the command line
    gives (flags, ``--param``; or a function of the sparsity giving them), ``seeds`` "all" (every --seeds) or
    "one" (the first), ``params`` the ``--params`` (None: cbs prune's default, or the cbs preset that
    ``--method cbs`` picks), ``bn`` ``--bn-reestimate`` (True), ``--no-bn-reestimate`` (False) or neither
    (None: the recommendation's), ``above`` the sparsity above which the row runs (None: at every one). The
    recommendation fills the rest exactly as for `cbs prune` (:func:`engine.pipeline.settle`)."""

    settings: Any
    seeds: str
    params: str | None = None
    bn: bool | None = None
    above: float | None = None

    def runs_at(self, sparsity: float) -> bool:
        """Whether the row has a run at ``sparsity``."""
        return self.above is None or sparsity > self.above + 1e-9


def _paper(model: str, **settings: Any) -> Label:
    """A single-stage row in the paper's setting: measured with BatchNorm re-estimation and without (the record
    keeps the accuracy before the final re-estimation), on the paper's parameters."""
    return Label({**settings, **BASE[model]}, "one", PAPER_PARAMS[model], True if model == "resnet20" else None)


#: label -> Label. "multi-stage" is `cbs prune --model MODEL --sparsity S --seed K --objective fisher`, the Fisher
#: recommendation from the dense model (ResNet20: `--warm-start none`); "cbs" is `cbs prune --method cbs` (the
#: paper's setting, engine.recommend.PAPER_CBS). iht and swap get a 60 s limit per block so that a sweep stays
#: bounded.
CONFIGS: dict[str, dict[str, Label]] = {
    model: {
        "magnitude": _paper(model, method="magnitude", update=False),
        "woodfisher": _paper(model, method="woodfisher", update=False),
        "cbs": Label(dict(method="cbs"), "all", None, True if model == "resnet20" else None),
        "magnitude+update": _paper(model, method="magnitude", update=True),
        "woodfisher+update": _paper(model, method="woodfisher", update=True),
        "iht": _paper(model, method="iht", update=True, time_limit=60.0),
        "swap": _paper(model, method="swap", update=True, time_limit=60.0),
        "multi-stage": Label(dict(objective="fisher", **({"warm_start": None} if model == "resnet20" else {})),
                             "all"),
        "single-stage": Label(lambda s: dict(SINGLE), "all", None, True if model == "resnet20" else None),
    }
    for model in ("mlpnet", "resnet20")
}
#: the single-stage setting for runs judged without BatchNorm re-estimation: the recommendation in one
#: stage, its step search on running statistics, the mean-coupled Newton step and every unpruned parameter
#: compensating (design note 24)
SINGLE: dict[str, Any] = dict(stages=1, step_search_bn=False, couple_mean=True, compensate="rest")
#: ResNet20's single-stage setting at 0.7 for runs judged without BatchNorm re-estimation: the paper's
#: single-sample rows, twice as many, λ = 1e-7 and the loss-curve budget (docs/results.md)
CONFIGS["resnet20"]["single-stage-lc"] = Label(dict(method="magnitude", update=True, fisher_samples=2000,
                                                    damping=1e-7, allocation="loss_curve"), "all", "cbs", True)
#: ResNet20's Fisher run from the dense model under CHITA's protocol: no BatchNorm re-estimation, between stages
#: or after (`--no-bn-reestimate`; the step search then scores losses on running statistics)
CONFIGS["resnet20"]["multi-stage-no-bn"] = Label(dict(objective="fisher", warm_start=None), "one", None, False)
#: ResNet20's recommendation above 0.6: the Fisher multi-stage run started from the layer-wise run at 0.6 (for
#: 0.7) or 0.7 (above) (`cbs prune --model resnet20 --sparsity S`; engine.recommend.WARM_START), with and
#: without BatchNorm re-estimation
CONFIGS["resnet20"]["warm-start"] = Label(dict(objective="fisher"), "all", above=LAYERWISE_UP_TO["batchnorm"])
CONFIGS["resnet20"]["warm-start-no-bn"] = Label(dict(objective="fisher"), "one", None, False,
                                                above=LAYERWISE_UP_TO["batchnorm"])
#: layer-wise reconstruction (`cbs prune --objective reconstruction`: ADMM with the refit on 128 calibration
#: images, every pruned layer in turn, BatchNorm re-estimated after), beside the Fisher path; what `cbs prune`
#: runs for ResNet20 up to 0.6 when given no flag (engine.recommend.LAYERWISE_UP_TO)
for _model in CONFIGS:
    CONFIGS[_model]["layerwise"] = Label(dict(objective="reconstruction"), "all")
#: labels a sweep runs only when --configs names them
EXTRA = {"mlpnet": ("single-stage", "layerwise"), "resnet20": ("single-stage", "single-stage-lc")}


#: seconds of one run per stage, as measured in the sweeps of docs/results.md (MLPNet: one thread per
#: worker, --jobs 2, quiet machine; ResNet20: one thread, under load): only used to hand out the largest
#: units of a parallel sweep first
RUN_SECONDS = {
    "mlpnet": {"magnitude": 15, "woodfisher": 33, "cbs": 18, "magnitude+update": 16, "woodfisher+update": 16,
               "iht": 70, "swap": 40, "multi-stage": 0.4},
    "resnet20": {"magnitude": 15, "woodfisher": 18, "cbs": 55, "magnitude+update": 10, "woodfisher+update": 10,
                 "iht": 69, "swap": 120, "multi-stage": 60, "single-stage-lc": 350, "multi-stage-no-bn": 45,
                 "layerwise": 90, "warm-start": 90, "warm-start-no-bn": 80},
}
#: labels whose runs reuse another label's cached results beyond the gradients (the same supports, so
#: the same update; diag(H⁻¹)), so a parallel sweep keeps them in that label's unit
CACHE_GROUP = {"magnitude+update": "magnitude", "woodfisher+update": "woodfisher"}


def _key(r: dict) -> tuple:
    return (r["label"], round(r["sparsity"], 6), r["seed"])


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def accuracy_table(rows: list[dict], model: str, sparsities: list[float], field: str = "accuracy") -> str:
    """Markdown: one row per label (mean ± std over seeds of ``field``), then the published rows."""
    head = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (len(sparsities) + 1)]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = [_cell([r[field] for r in rows if r["label"] == label and abs(r["sparsity"] - s) < 1e-9 and field in r])
                 for s in sparsities]
        lines.append(f"| {label} (ours) | " + " | ".join(cells) + " |")
    for name, curve in PUBLISHED[model].items():
        if name != "dense":
            lines.append(f"| {name} | " + " | ".join(f"{curve[s]:.2f}" if s in curve else "–" for s in sparsities) + " |")
    return "\n".join(lines)


def split_by_protocol(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(runs judged with BatchNorm re-estimation, runs judged without it, CHITA's protocol). A single-stage
    run that re-estimates is in both: its record keeps the accuracy before the final re-estimation. A
    multi-stage run that re-estimates between stages is in the first only; one that never re-estimates
    (``--no-bn-reestimate``) in the second only."""
    with_bn, without = [], []
    for r in rows:
        if not r.get("bn_reestimate", True):
            without.append(r)
            continue
        with_bn.append(r)
        if "accuracy_no_bn_reestimate" in r and r.get("settings", {}).get("stages", 1) == 1:
            without.append({**r, "accuracy": r["accuracy_no_bn_reestimate"]})
    return with_bn, without


def timing_table(rows: list[dict], sparsities: list[float]) -> str:
    """Markdown: seconds of one run (Fisher + selection + update, mean over seeds) and peak memory."""
    head = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " | peak MiB |"
    lines = [head, "|" + "---|" * (len(sparsities) + 2)]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = []
        for s in sparsities:
            hit = [r["run_seconds"] for r in rows if r["label"] == label and abs(r["sparsity"] - s) < 1e-9]
            cells.append(f"{np.mean(hit):.0f} s" if hit else "–")
        peak = max(r["peak_memory_mb"] for r in rows if r["label"] == label)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {peak:.0f} |")
    return "\n".join(lines)


def run_settings(model_name: str, label: str, s: float, overrides: dict[str, Any],
                 preset: str | None = None) -> tuple[dict[str, Any], str | None, bool | None]:
    """What one run gives `cbs prune`: (PruneConfig keywords of its flags, with the --set overrides over them;
    ``--params``; ``--bn-reestimate``). ``preset`` (--preset) replaces the label's parameters."""
    entry = CONFIGS[model_name][label]
    settings = {**(entry.settings(s) if callable(entry.settings) else entry.settings), **overrides}
    return settings, preset or entry.params, entry.bn


def run_config(model_name: str, label: str, s: float, seed: int, overrides: dict[str, Any],
               preset: str | None = None) -> PruneConfig:
    """The settings of one run, as `cbs prune` settles them (:func:`engine.pipeline.settle`: the recommendation
    for the zoo model's profile with the run's flags over it), without loading the model or the data."""
    settings, _, bn = run_settings(model_name, label, s, overrides, preset)
    merged, _, _ = settle(zoo_profile(model_name), s, {**settings, "seed": seed, "progress": False}, False, bn)
    return PruneConfig(sparsity=s, **merged)


def command_line(model_name: str, label: str, s: float, seed: int, overrides: dict[str, Any],
                 preset: str | None = None) -> str:
    """The `cbs prune` command that runs the same thing as one run of the sweep."""
    settings, params, bn = run_settings(model_name, label, s, overrides, preset)
    given = " ".join(p for name, value in settings.items() for p in flag_form(name, value))
    return " ".join(x for x in [f"cbs prune --model {model_name} --sparsity {s:g} --seed {seed}", given,
                                f"--params {params}" if params else "",
                                {True: "--bn-reestimate", False: "--no-bn-reestimate"}.get(bn, "")] if x)


class _Sweep:
    """What the runs of one sweep share: the dense model and its test accuracy, the data and the cached
    gradients of the current seed (one process holds one; a parallel sweep, one per worker). Every run is
    :func:`engine.pipeline.prepare` and :func:`engine.pipeline.execute`, the code `cbs prune` runs."""

    def __init__(self, model_name: str, data_dir: str, bn_samples: int | None, overrides: dict[str, Any],
                 preset: str | None = None) -> None:
        self.model_name, self.overrides, self.preset = model_name, overrides, preset
        self.job = {} if bn_samples is None else {"bn_samples": bn_samples}
        self.base_model = load_model(model_name, Path(data_dir) / CHECKPOINTS[model_name])
        self.train = Samples(tuple(dataset_for_model(model_name, data_dir, "train")), "train")
        self.test = Samples(tuple(dataset_for_model(model_name, data_dir, "test")), "test")
        self.dense = evaluate_samples(self.base_model, self.test)
        self.caches: dict[int, dict] = {}

    def run(self, label: str, s: float, seed: int) -> dict[str, Any]:
        """Prune a copy of the dense model with the run's settings; its record (accuracy, times, memory)."""
        settings, params, bn = run_settings(self.model_name, label, s, self.overrides, self.preset)
        model = copy.deepcopy(self.base_model)
        # the per-stage test pass (records only) is skipped for ResNet20, where it costs 13 s a stage
        prepared = prepare(model, self.train, self.test, sparsity=s, params=params, bn_reestimate=bn,
                           settings={**settings, "seed": seed, "progress": False},
                           stage_test=self.model_name == "mlpnet", describe_inputs={"model": self.model_name},
                           **self.job)
        cache = None
        if prepared.config.stages == 1:
            for other in [k for k in self.caches if k[0] != seed]:  # one seed's gradients at a time
                del self.caches[other]
            cache = self.caches.setdefault((seed, tuple(prepared.names)), {})
        started = time.perf_counter()
        record = execute(prepared, cache=cache, dense=self.dense)
        blocks = record["blocks"]
        return {
            "model": self.model_name, "label": label, "sparsity": s, "seed": seed, "accuracy": record["accuracy"],
            "test_loss": record["test_loss"], "dense_accuracy": record["dense_accuracy"],
            **{k: record[k] for k in ("accuracy_no_bn_reestimate", "test_loss_no_bn_reestimate") if k in record},
            "achieved_sparsity": record["achieved_sparsity"], "n_keep": record["n_keep"],
            "run_seconds": time.perf_counter() - started, "fisher_seconds": record["fisher_seconds"],
            "prune_seconds": record["prune_seconds"],
            "objective_total": record["objective_total"],  # None: plain magnitude computes no gradients
            "max_gap": max((b["gap"] for b in blocks if b["gap"] is not None), default=None),
            "stage_accuracy": [e["accuracy"] for e in record["stages"] if "accuracy" in e],
            "stage_steps": [e["step"] for e in record["stages"]],
            "stage_block_steps": [e["block_steps"] for e in record["stages"]], "settings": record["settings"],
            "parameters": prepared.names, "bn_reestimate": record["bn_reestimate"],
            "bn_samples": record["bn_samples"],
            "command": command_line(self.model_name, label, s, seed, self.overrides, self.preset)
            + "".join(f" --param {k}={v}" for k, v in self.job.items())
            + ("" if prepared.stage_test else " --param stage_test=false"),
            "peak_memory_mb": peak_memory_mb(),
        }


def _units(model_name: str, todo: list[tuple[str, float, int]], overrides: dict[str, Any]) -> list[list[tuple]]:
    """The runs of a parallel sweep, grouped and ordered: single-stage runs of one seed (and cache group)
    form one unit, as they share cached gradients; every multi-stage run is a unit of its own. Units come
    largest first by the estimate ``RUN_SECONDS`` × stages (the longest-processing-time-first rule)."""
    units: dict[tuple, list[tuple]] = {}
    cost: dict[tuple, float] = {}
    for label, s, seed in todo:
        stages = run_config(model_name, label, s, seed, overrides).stages
        key = (CACHE_GROUP.get(label, label), seed) if stages == 1 else (label, s, seed)
        units.setdefault(key, []).append((label, s, seed))
        cost[key] = cost.get(key, 0.0) + RUN_SECONDS[model_name].get(label, 60.0) * stages
    return [units[k] for k in sorted(units, key=lambda k: -cost[k])]


def _worker(tasks: Any, results: Any, threads: int, sweep_args: tuple) -> None:
    """A worker process of a parallel sweep: runs the units it takes from ``tasks`` until a None, and
    sends ("record", rec) for every run, then ("done", None); ("error", traceback) if a run fails."""
    try:
        retain_freed_memory()  # spawned: the parent's malloc settings do not carry over
        torch.set_num_threads(threads)
        sweep = _Sweep(*sweep_args)
        parent = mp.parent_process()
        while (unit := tasks.get()) is not None:
            for label, s, seed in unit:
                if parent is not None and not parent.is_alive():  # the sweep was killed: stop, nobody records
                    return
                results.put(("record", sweep.run(label, s, seed)))
        results.put(("done", None))
    except BaseException:  # noqa: BLE001 - the parent reports it and stops the other workers
        results.put(("error", traceback.format_exc()))


#: the thread-count variables a worker's BLAS (OpenBLAS, MKL) and OpenMP read when they load
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _parallel(units: list[list[tuple]], jobs: int, threads: int, sweep_args: tuple):
    """Run ``units`` in ``jobs`` spawned worker processes; yield each run's record as it arrives. A failed
    run stops the sweep with its traceback (the records already yielded are kept by the caller)."""
    ctx = mp.get_context("spawn")  # not fork: a forked torch/OpenMP runtime can hang in the child
    tasks, results = ctx.Queue(), ctx.Queue()
    for unit in units:
        tasks.put(unit)
    for _ in range(jobs):
        tasks.put(None)
    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    os.environ.update({v: str(threads) for v in _THREAD_VARS})  # read by the children's BLAS at import
    try:
        procs = [ctx.Process(target=_worker, args=(tasks, results, threads, sweep_args)) for _ in range(jobs)]
        for p in procs:
            p.start()
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    finished = 0
    try:
        while finished < jobs:
            try:
                kind, payload = results.get(timeout=5.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a sweep worker died (exit code {dead[0]}; out of memory?)") from None
                continue
            if kind == "record":
                yield payload
            elif kind == "error":
                raise RuntimeError(f"a sweep worker failed:\n{payload}")
            else:
                finished += 1
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PUBLISHED), required=True)
    ap.add_argument("--data-dir", type=Path, default=None, help="folder laid out like ../shared/data")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="labels of CONFIGS to run (default: all but "
                         + "; ".join(f"{m}: {', '.join(x)}" for m, x in EXTRA.items()) + ")")
    ap.add_argument("--sparsities", type=float, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=POSITIVE_INT, default=None,
                    help="torch (and BLAS, with --jobs) threads of each process (default: torch's own choice; "
                         "with --jobs J, the cores divided by J)")
    ap.add_argument("--jobs", type=POSITIVE_INT, default=1,
                    help="worker processes running the sweep's runs side by side (default 1: in this process)")
    ap.add_argument("--out", type=Path, default=Path("results/reproduce"))
    ap.add_argument("--report", action="store_true", help="only rebuild the tables and the plot from the records")
    ap.add_argument("--bn-samples", type=POSITIVE_INT, default=None,
                    help="ResNet20: training images of each BatchNorm re-estimation, x2 augmented copies "
                         "(cbs prune --param bn_samples=M; default: cbs prune's)")
    ap.add_argument("--preset", choices=PRUNABLE_PRESETS, default=None,
                    help="parameters every run prunes (cbs prune --params NAME; default: each label's: the CBS "
                         "paper's set for the paper rows, cbs prune's default for multi-stage)")
    ap.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                    help="override one PruneConfig setting of every run (repeatable; JSON, a Python literal or a "
                         "bare word, as cbs prune --param: --set damping=1e-2 --set first_order=true "
                         "--set allocation=obs); use a separate --out for such runs")
    args = ap.parse_args(argv)
    retain_freed_memory()
    model_name = args.model
    configs = CONFIGS[model_name]
    labels = args.configs or [c for c in configs if c not in EXTRA[model_name]]
    unknown = [c for c in labels if c not in configs]
    if unknown:
        ap.error(f"argument --configs: unknown label(s) {unknown}; choose from {', '.join(configs)}")
    overrides: dict[str, Any] = {}
    fields = set(PruneConfig.__dataclass_fields__) - {"sparsity", "seed", "progress"}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            ap.error(f"argument --set: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}. Got {item!r}.")
        overrides[key] = parse_value(text)  # JSON, a Python literal, or a bare word (allocation=obs)
    sparsities = args.sparsities or SPARSITIES[model_name]
    if any(not 0 <= s < 1 for s in sparsities):
        ap.error(f"argument --sparsities: every value must be in [0, 1). Got {sparsities}.")
    try:  # every selected run's settings with the overrides: a bad value fails here, before any work
        for label in labels:
            for s in filter(configs[label].runs_at, sparsities):
                run_config(model_name, label, s, 0, overrides, args.preset)
    except (CBSError, TypeError) as exc:
        ap.error(f"argument --set: {exc}")
    data_dir = args.data_dir or default_data_dir()
    # the data folder is checked before any work; ResNet20's BatchNorm re-estimation uses --bn-samples
    # training images (x2 augmented copies), after every stage and at the end
    for path in [Path(data_dir) / CHECKPOINTS[model_name]]:
        if not path.is_file():
            ap.error(f"argument --data-dir: {path} not found (a folder laid out like ../shared/data is needed)")
    out = args.out / model_name
    records = out / "records.jsonl"
    done = {_key(r): r for r in read_jsonl(records)} if records.exists() else {}

    runs = [(label, s, seed) for seed in args.seeds for label in labels for s in sparsities
            if (configs[label].seeds == "all" or seed == args.seeds[0]) and configs[label].runs_at(s)]
    todo = [] if args.report else [r for r in runs if (r[0], round(r[1], 6), r[2]) not in done]
    jobs = min(args.jobs, max(len(todo), 1))
    threads = args.threads or (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)
    sweep_args = (model_name, str(data_dir), args.bn_samples, overrides, args.preset)

    def keep(rec: dict) -> None:
        rec["jobs"], rec["threads"] = jobs, threads
        if not done:
            rec["environment"] = environment()
        append_jsonl(records, rec)
        done[_key(rec)] = rec
        sys.stdout.write(f"{rec['label']:>18} s={rec['sparsity']:<5} seed={rec['seed']} acc={rec['accuracy']:.2f} "
                         f"({rec['run_seconds']:.0f} s)\n")
        sys.stdout.flush()

    started = time.perf_counter()
    if jobs > 1:
        units = _units(model_name, todo, overrides)
        for rec in progress(_parallel(units, jobs, threads, sweep_args), total=len(todo),
                            desc=f"reproduce {model_name} ({jobs} jobs)"):
            keep(rec)
    else:
        if threads:
            torch.set_num_threads(threads)
        sweep = _Sweep(*sweep_args)
        for label, s, seed in progress(todo, total=len(todo), desc=f"reproduce {model_name}"):
            keep(sweep.run(label, s, seed))
    wall = time.perf_counter() - started
    dense_acc = next((r["dense_accuracy"] for r in done.values()), None)
    if dense_acc is None:  # nothing recorded yet (e.g. --report on an empty folder)
        dense_acc, _ = evaluate_samples(load_model(model_name, Path(data_dir) / CHECKPOINTS[model_name]),
                                        Samples(tuple(dataset_for_model(model_name, data_dir, "test")), "test"))

    rows = [r for r in done.values() if r["label"] in labels]
    with_bn, without_bn = split_by_protocol(rows) if model_name == "resnet20" else (rows, [])
    table = accuracy_table(with_bn, model_name, sparsities)
    parts = [f"Dense accuracy here: {dense_acc:.2f} %.", "", table]
    if model_name == "resnet20":
        parts += ["", "Without BatchNorm re-estimation (CHITA's protocol):", "",
                  accuracy_table(without_bn, model_name, sparsities)]
    timing = timing_table(rows, sparsities)
    if todo:
        timing += (f"\n\nLast invocation: {len(todo)} runs in {wall:.0f} s wall "
                   f"(--jobs {jobs}, --threads {threads or torch.get_num_threads()}).")
    atomic_write_bytes(out / "table.md", ("\n".join(parts) + "\n").encode())
    atomic_write_bytes(out / "timing.md", (timing + "\n").encode())
    refs = {k: v for k, v in PUBLISHED[model_name].items() if k != "dense"}
    mean_rows = []
    for label in dict.fromkeys(r["label"] for r in rows):
        for s in sparsities:
            hit = [r for r in rows if r["label"] == label and abs(r["sparsity"] - s) < 1e-9]
            if hit:
                mean_rows.append({"label": label, "sparsity": s, "accuracy": float(np.mean([h["accuracy"] for h in hit]))})
    accuracy_plot(mean_rows, out / "accuracy.png", f"One-shot pruning of {model_name} (no fine-tuning)",
                  references=refs, dense=PUBLISHED[model_name]["dense"], suffix=" (ours)")
    sys.stdout.write("\n".join(parts) + "\n\n" + timing + "\n")
    sys.stdout.write(f"wrote {records}, {out / 'table.md'}, {out / 'timing.md'}, {out / 'accuracy.png'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
