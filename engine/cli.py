"""The ``cbs`` command line.

    cbs demo      train a small MLP on the bundled digits, prune it with every method, table + plot
    cbs prune     one-shot pruning of MLPNet / ResNet20 from the shared checkpoints, writes record.json
    cbs solvers   the solvers known here: exact?, bound?, available?, what to install
    cbs solve     solve one block problem stored as .npz (X, w, lam, k, optional g)
    cbs export-blocks   write real blocks of a zoo model as such .npz problems
    cbs train     train a sparse mask (random, magnitude, snip, grasp, synflow, a file) plainly or with ToST

Every bad argument gets one message and exit code 2 before any work starts; other failures exit 1.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import CBSError, InvalidOptionError
from .memory import retain_freed_memory

__all__ = ["main", "build_parser", "parse_value", "number_type", "SPARSITY", "POSITIVE_INT", "NONNEG_INT", "POSITIVE"]


# ----------------------------------------------------------------------------- argument types
def number_type(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, what: str = ""):
    """An argparse type that checks a range and says which range was expected (``what``, e.g. "an
    integer >= 1"); ``low_open``/``high_open`` exclude the bound. Shared by every command line of the
    project (``cbs``, ``cbs train``, the scripts), so they all word a bad number the same way."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}. Got {text!r}.") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {what}. Got {text!r}.")
        bad = (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)
        )
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}. Got {text}.")
        return value

    return parse


SPARSITY = number_type(float, 0.0, 1.0, high_open=True, what="a number in [0, 1)")
POSITIVE_INT = number_type(int, 1, what="an integer >= 1")
NONNEG_INT = number_type(int, 0, what="an integer >= 0")
POSITIVE = number_type(float, 0.0, low_open=True, what="a number > 0")


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"must be an existing file. Got {text!r} (not found).")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"must be an existing folder. Got {text!r} (not found).")
    return path


class _Parser(argparse.ArgumentParser):
    """argparse, with the argument named in range errors ("argument --sparsity: must be ...")."""


def build_parser() -> argparse.ArgumentParser:
    """The full parser (also used by the docs)."""
    from .blocks import BLOCK_MODES
    from .models import MODEL_NAMES
    from formulations.allocation import SCHEDULES

    from .pruner import ALLOCATIONS
    from .solvers.registry import solver_names

    parser = _Parser(prog="cbs", description="Combinatorial OBS pruning (Combinatorial Brain Surgeon) backed by solvers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="prune a small MLP trained on the bundled digits with every method (no download)")
    demo.add_argument("--out", type=Path, default=Path("results/demo"), help="folder for the table, record and plot")
    demo.add_argument("--sparsities", type=SPARSITY, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 0.9])
    demo.add_argument("--methods", nargs="+", default=None, help="methods (default: every built-in heuristic)")
    demo.add_argument("--seed", type=NONNEG_INT, default=0)
    demo.add_argument("--epochs", type=POSITIVE_INT, default=200, help="full-batch training epochs of the small MLP")

    pr = sub.add_parser("prune", help="one-shot pruning of a zoo model from a checkpoint")
    pr.add_argument("--model", required=True, choices=MODEL_NAMES)
    pr.add_argument("--checkpoint", type=_existing_file, default=None,
                    help="checkpoint file (default: the shared one inside --data-dir)")
    pr.add_argument("--data-dir", type=_existing_dir, default=None,
                    help="folder laid out like ../shared/data (mnist/, cifar10/, weights/); default ../shared/data")
    pr.add_argument("--sparsity", type=SPARSITY, required=True, help="fraction of prunable weights removed, in [0, 1)")
    pr.add_argument("--method", default=None,
                    help=f"selection method: {', '.join(solver_names())}; default: our best measured configuration "
                         "for the model and sparsity (engine/defaults.py), which any flag below overrides")
    upd = pr.add_mutually_exclusive_group()
    upd.add_argument("--update", dest="update", action="store_true", default=None,
                     help="apply the CBS-U update after selection (default for every method but magnitude)")
    upd.add_argument("--no-update", dest="update", action="store_false", help="only mask, no weight update")
    pr.add_argument("--fisher-samples", type=POSITIVE_INT, default=None, help="N, gradient rows of the Fisher (1000)")
    pr.add_argument("--fisher-batch", type=POSITIVE_INT, default=None, help="samples averaged per gradient row (1)")
    pr.add_argument("--damping", type=POSITIVE, default=None, help="λ > 0 added to the Fisher (1e-3)")
    pr.add_argument("--relative-damping", action="store_true", help="λ = damping · mean(diag F)")
    pr.add_argument("--block-mode", choices=BLOCK_MODES, default=None,
                    help="layer, whole, chunk or row (default: chunk when --block-size is given, else layer)")
    pr.add_argument("--block-size", type=POSITIVE_INT, default=None, help="weights per block with --block-mode chunk")
    pr.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                    help="budget across blocks (default: magnitude, or the recommended configuration's)")
    pr.add_argument("--preset", default="default",
                    help="prunable set: default (all conv/linear weights), cbs or chita (ResNet20)")
    bn = pr.add_mutually_exclusive_group()
    bn.add_argument("--bn-reestimate", dest="bn_reestimate", action="store_true", default=None,
                    help="re-estimate BatchNorm statistics after pruning (and after every stage); default: on for "
                         "the recommended configuration of a model with BatchNorm, else off")
    bn.add_argument("--no-bn-reestimate", dest="bn_reestimate", action="store_false")
    pr.add_argument("--time-limit", type=POSITIVE, default=None, help="per-block solver time limit (s)")
    pr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="solver parameter (repeatable), e.g. --param rmp_trials=10")
    pr.add_argument("--loss-samples", type=POSITIVE_INT, default=None,
                    help="training samples scoring candidate masks (cbs); default: the Fisher samples")
    hl = pr.add_mutually_exclusive_group()
    hl.add_argument("--holdout-loss", dest="holdout_loss", action="store_true", default=None,
                    help="draw the --loss-samples disjoint from the Fisher samples (the step search and mask "
                         "scoring judge the update on samples it was not fitted to; on in the ResNet20 recommendation)")
    hl.add_argument("--no-holdout-loss", dest="holdout_loss", action="store_false")
    pr.add_argument("--evaluate-update", action="store_true",
                    help="score candidate masks after the CBS-U update (cbs; cheap at high sparsity)")
    pr.add_argument("--stages", type=POSITIVE_INT, default=None,
                    help="prune in K stages along --schedule, re-linearising at every stage (default 1)")
    pr.add_argument("--schedule", choices=SCHEDULES, default=None, help="sparsity schedule of the stages (default exp)")
    fo = pr.add_mutually_exclusive_group()
    fo.add_argument("--first-order", dest="first_order", action="store_true", default=None,
                    help="include the mean gradient g in the quadratic model (the update becomes a damped Newton step)")
    fo.add_argument("--no-first-order", dest="first_order", action="store_false")
    ss = pr.add_mutually_exclusive_group()
    ss.add_argument("--step-search", dest="step_search", action="store_true", default=None,
                    help="after each stage, take the step towards the update with the lowest training loss")
    ss.add_argument("--no-step-search", dest="step_search", action="store_false")
    sb = pr.add_mutually_exclusive_group()
    sb.add_argument("--step-search-bn", dest="step_search_bn", action="store_true", default=None,
                    help="the step search scores losses with BatchNorm on batch statistics (the loss after re-estimation)")
    sb.add_argument("--no-step-search-bn", dest="step_search_bn", action="store_false")
    fb = pr.add_mutually_exclusive_group()
    fb.add_argument("--fisher-bn-batch-stats", dest="fisher_bn_batch_stats", action="store_true", default=None,
                    help="take the gradient rows with BatchNorm on each row's batch statistics (the loss after "
                         "re-estimation; needs --fisher-batch >= 2)")
    fb.add_argument("--no-fisher-bn-batch-stats", dest="fisher_bn_batch_stats", action="store_false")
    pr.add_argument("--compensate", default=None, metavar="{rest,norm,NAME[,NAME...]}",
                    help="parameters never pruned but updated with the kept weights (needs --first-order): 'rest' "
                         "(every parameter outside the pruned set), 'norm' (normalisation layers) or names")
    cm = pr.add_mutually_exclusive_group()
    cm.add_argument("--couple-mean", dest="couple_mean", action="store_true", default=None,
                    help="couple the blocks' Newton steps through the mean gradient (needs --first-order)")
    cm.add_argument("--no-couple-mean", dest="couple_mean", action="store_false")
    pr.add_argument("--newton-step-only", action="store_true", default=None,
                    help="the step search scales only the Newton part of the update, never the compensation for the "
                         "removed weights (needs --first-order --step-search)")
    pr.add_argument("--block-steps", action="store_true", default=None,
                    help="scale each block's update by its own step, from the blocks' joint quadratic model with "
                         "the full Fisher of the gradient rows (cross-block terms included)")
    pr.add_argument("--workers", type=POSITIVE_INT, default=1, help="processes solving blocks in parallel")
    pr.add_argument("--seed", type=NONNEG_INT, default=0)
    pr.add_argument("--out", type=Path, required=True, help="folder for record.json, mask.pt and model.pt")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")

    so = sub.add_parser("solve", help="solve one block problem stored in an .npz file (X, w, lam, k, optional g)")
    so.add_argument("problem", type=_existing_file, help="PROBLEM.npz with X (N×n), w (n), lam, k, optionally g (n)")
    so.add_argument("--solver", default="brute_force", help=f"solver name: {', '.join(solver_names())}")
    so.add_argument("--time-limit", type=POSITIVE, default=None, help="seconds")
    so.add_argument("--seed", type=NONNEG_INT, default=0)
    so.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="solver parameter (repeatable)")
    so.add_argument("--json", action="store_true", help="write the result as JSON to stdout")

    ex = sub.add_parser("export-blocks", help="write real blocks of a zoo model as .npz problems for `cbs solve`")
    ex.add_argument("--model", required=True, choices=MODEL_NAMES)
    ex.add_argument("--checkpoint", type=_existing_file, default=None)
    ex.add_argument("--data-dir", type=_existing_dir, default=None)
    ex.add_argument("--params", nargs="+", default=None, help="parameter names to export (default: all prunable)")
    ex.add_argument("--block-mode", choices=("row", "chunk", "layer"), default="row")
    ex.add_argument("--block-size", type=POSITIVE_INT, default=None, help="weights per block with --block-mode chunk")
    ex.add_argument("--sparsity", type=SPARSITY, default=0.5, help="sets k = round((1 − sparsity) n) in each block")
    ex.add_argument("--fisher-samples", type=POSITIVE_INT, default=1000)
    ex.add_argument("--damping", type=POSITIVE, default=1e-3)
    ex.add_argument("--max-blocks", type=POSITIVE_INT, default=None, help="export at most this many blocks")
    ex.add_argument("--seed", type=NONNEG_INT, default=0)
    ex.add_argument("--out", type=Path, required=True)

    sv = sub.add_parser("solvers", help="list the solvers: exact?, bound?, available?, what to install")
    sv.add_argument("--json", action="store_true", help="machine-readable output")
    from .train_cli import add_train_parser

    add_train_parser(sub)
    return parser


def parse_value(text: str) -> Any:
    """The value of a KEY=VALUE flag (``cbs prune --param``, ``scripts/reproduce.py --set``): JSON
    (``true``, ``1e-3``, ``"x"``, ``[1, 2]``), else a Python literal (``True``, ``None``, ``'x'``), else the
    bare text as a string (``allocation=obs``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _solver_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InvalidOptionError(f"The '--param' argument of cbs prune must look like KEY=VALUE. Got {item!r}.")
        params[key] = parse_value(value)
    return params


def prune_settings(args: argparse.Namespace) -> tuple[dict, bool]:
    """The PruneConfig settings and the BatchNorm re-estimation switch of a parsed ``cbs prune``: the
    recommended configuration (no ``--method``) or the paper-style ``PLAIN`` one, every flag given
    overriding it."""
    from .defaults import PLAIN, describe, recommended, recommends_bn_reestimate
    from .pruner import COMPENSATE

    given = {"method": args.method, "update": args.update, "fisher_samples": args.fisher_samples,
             "fisher_batch": args.fisher_batch, "damping": args.damping, "stages": args.stages,
             "schedule": args.schedule, "first_order": args.first_order, "step_search": args.step_search,
             "step_search_bn": args.step_search_bn, "fisher_bn_batch_stats": args.fisher_bn_batch_stats,
             "loss_samples": args.loss_samples, "holdout_loss": args.holdout_loss, "allocation": args.allocation,
             "couple_mean": args.couple_mean, "newton_step_only": args.newton_step_only,
             "block_steps": args.block_steps,
             "compensate": None if args.compensate is None else (
                 args.compensate if args.compensate in COMPENSATE else tuple(args.compensate.split(","))),
             "block_mode": args.block_mode or ("chunk" if args.block_size else None)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.method is None:
        # no method named: our best measured configuration for this model and sparsity, flags override it
        base = recommended(args.model, args.sparsity)
        logging.getLogger("cbs").warning("cbs prune: no --method given; running the recommended configuration: %s",
                                         describe(base))
    else:
        base = {**PLAIN, "method": args.method}
    bn_reestimate = args.bn_reestimate
    if bn_reestimate is None:
        bn_reestimate = args.method is None and recommends_bn_reestimate(args.model)
    if not bn_reestimate and base.get("step_search_bn"):
        # the recommendation scores steps on batch statistics because it re-estimates BatchNorm after
        # every stage; without re-estimation the running statistics are the ones the model will use
        base = {**base, "step_search_bn": False}
    settings = {**base, **given}
    return settings, bn_reestimate


def _cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import PruneJob, run_prune
    from .pruner import PruneConfig
    from .solvers.registry import get_solver

    settings, bn_reestimate = prune_settings(args)
    config = PruneConfig(
        sparsity=args.sparsity, relative_damping=args.relative_damping, block_size=args.block_size,
        seed=args.seed, time_limit=args.time_limit, solver_params=_solver_params(args.param),
        progress=not args.no_progress and None, evaluate_update=args.evaluate_update,
        workers=args.workers, **settings,
    )
    solver = get_solver(config.method, **config.solver_params)  # unknown method / bad parameter: exit 2 now
    if hasattr(solver, "ensure_available"):
        solver.ensure_available()
    job = PruneJob(model=args.model, config=config, data_dir=args.data_dir, checkpoint=args.checkpoint,
                   preset=args.preset, bn_reestimate=bn_reestimate, out=args.out)
    from .models import load_model, prunable_parameters

    model = load_model(job.model, job.checkpoint)  # checkpoint mismatch: exit 2, before any work
    prunable_parameters(model, job.preset)  # unknown preset: exit 2
    try:
        record = run_prune(job, model)
    except InvalidOptionError as exc:
        # settings that do not fit the data (e.g. more Fisher samples than training images): run_prune
        # checks them right after loading the data, before any work
        sys.stderr.write(f"cbs prune: error: {exc}\n")
        return 2
    except CBSError as exc:
        # past validation, a failure is not the user's input: exit 1, but keep the one-line message
        sys.stderr.write(f"cbs prune: error: {exc}\n")
        return 1
    gaps = [b["gap"] for b in record["blocks"] if b["gap"] is not None]
    lines = [
        f"model {record['model']}  method {record['method']}{' + update' if record['update'] else ''}  "
        f"sparsity {record['sparsity']:.4g} (achieved {record['achieved_sparsity']:.4f})",
        f"accuracy {record['dense_accuracy']:.2f} % -> {record['accuracy']:.2f} %   test loss "
        f"{record['dense_test_loss']:.4f} -> {record['test_loss']:.4f}",
        f"fisher {record['fisher_seconds']:.1f} s  prune {record['prune_seconds']:.1f} s  "
        f"peak memory {record['peak_memory_mb']:.0f} MiB  blocks {len(record['blocks'])}"
        + (f"  max certified gap {100 * max(gaps):.3g} %" if gaps else ""),
        f"record: {Path(args.out) / 'record.json'}",
    ]
    if "accuracy_no_bn_reestimate" in record:
        lines.insert(2, f"accuracy without BatchNorm re-estimation {record['accuracy_no_bn_reestimate']:.2f} %")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_solvers(args: argparse.Namespace) -> int:
    from .solvers.registry import solver_info

    rows = solver_info()
    if args.json:
        sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
        return 0
    header = f"{'name':<14}{'exact':<7}{'bound':<7}{'available':<11}install / description"
    out = [header, "-" * len(header)]
    for r in rows:
        tail = r.install or r.error or r.description
        out.append(f"{r.name:<14}{'yes' if r.exact else 'no':<7}{'yes' if r.reports_bound else 'no':<7}"
                   f"{'yes' if r.available else 'no':<11}{tail}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _cmd_solve(args: argparse.Namespace) -> int:
    from .options import SolveOptions
    from .problem_io import load_problem
    from .solve import solve_block
    from .solvers.registry import get_solver

    problem = load_problem(args.problem)
    solver = get_solver(args.solver, **_solver_params(args.param))
    result = solve_block(problem, solver, SolveOptions(time_limit=args.time_limit, seed=args.seed))
    summary = {**result.summary(), "support": result.kept.tolist(), "problem": str(args.problem),
               "n": problem.n, "k": problem.n_keep, "N": problem.n_samples, "lam": problem.damping}
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        gap = "–" if summary["gap"] is None else f"{100 * summary['gap']:.4g} %"
        bound = "–" if summary["bound"] is None else f"{summary['bound']:.10g}"
        sys.stdout.write(
            f"{summary['solver']}: objective {summary['objective']:.10g}  bound {bound}  gap {gap}\n"
            f"status {summary['status']}  termination {summary['termination']}  wall time {summary['wall_time']:.3f} s\n"
            f"kept ({problem.n_keep} of {problem.n}): {summary['support']}\n"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .problem_io import export_blocks

    if args.block_mode == "chunk" and args.block_size is None:
        raise InvalidOptionError("The '--block-size' argument of cbs export-blocks is required with --block-mode chunk. Got none.")
    paths = export_blocks(
        model_name=args.model, checkpoint=args.checkpoint, data_dir=args.data_dir, out=args.out, params=args.params,
        block_mode=args.block_mode, block_size=args.block_size, sparsity=args.sparsity,
        fisher_samples=args.fisher_samples, damping=args.damping, max_blocks=args.max_blocks, seed=args.seed,
    )
    sys.stdout.write(f"wrote {len(paths)} problems to {args.out}\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    table, paths = run_demo(out=args.out, sparsities=args.sparsities, methods=args.methods, seed=args.seed,
                            epochs=args.epochs)
    sys.stdout.write(table + "\n" + "\n".join(f"wrote {p}" for p in paths) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cbs`` console script; returns the exit code."""
    from .train_cli import cmd_train

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on a bad argument
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    handlers = {"prune": _cmd_prune, "solvers": _cmd_solvers, "demo": _cmd_demo, "solve": _cmd_solve,
                "export-blocks": _cmd_export, "train": cmd_train}
    try:
        retain_freed_memory()
        return handlers[args.command](args)
    except CBSError as exc:
        sys.stderr.write(f"cbs {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
