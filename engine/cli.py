"""The ``cbs`` command line.

    cbs demo      train a small MLP on the bundled digits, prune it with every method, table + plot
    cbs prune     one-shot pruning of any torch model (zoo, FILE.py:FUNC, hf:DIR, timm:NAME): record, mask, weights
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
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import CBSError, InvalidOptionError, RunError

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


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"must be an existing file or folder. Got {text!r} (not found).")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"must be an existing folder. Got {text!r} (not found).")
    return path


class _Parser(argparse.ArgumentParser):
    """argparse, with the argument named in range errors ("argument --sparsity: must be ..."), and errors as
    one line without the usage (``--help`` shows that)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {printable(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (also used by the docs)."""
    from .models import MODEL_NAMES
    from .solvers.registry import solver_names

    parser = _Parser(prog="cbs", description="Combinatorial OBS pruning (Combinatorial Brain Surgeon) backed by solvers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="prune a small MLP trained on the bundled digits with every method (no download)")
    demo.add_argument("--out", metavar="DIR", default="results/demo", help="folder for the table, record and plot")
    demo.add_argument("--sparsities", type=SPARSITY, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    demo.add_argument("--methods", nargs="+", default=None, help="methods (default: every built-in heuristic)")
    demo.add_argument("--seed", type=NONNEG_INT, default=0)
    demo.add_argument("--epochs", type=POSITIVE_INT, default=200, help="full-batch training epochs of the small MLP")
    demo.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch and BLAS threads (default: the cores)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --out that is not a previous demo's (a previous demo's is replaced)")

    from .settings import JOB_OPTIONS, PRUNE_OPTIONS, add_flags, option

    pr = sub.add_parser("prune", help="one-shot pruning of a model: the zoo's or your own (FILE.py:FUNC, hf:DIR, timm:NAME)",
                        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=34, width=110),
                        usage="cbs prune --model SPEC --sparsity X --out DIR [options]",
                        description="Prune a trained model in one shot. Settings not given come from the "
                                    "recommendation for the model and data (it is printed on stderr); any flag "
                                    "overrides it. Advanced settings and solver parameters: --param NAME=VALUE.")
    add_flags(pr, JOB_OPTIONS)
    add_flags(pr, PRUNE_OPTIONS)
    pr.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="an advanced setting (e.g. holdout_loss=true, see docs) or a solver parameter (repeatable)")
    pr.add_argument("--out", required=True, metavar="DIR",
                    help="new or empty folder for record.json, mask.pt and model.pt (see --overwrite)")
    pr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last stage or layer (same settings)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")

    so = sub.add_parser("solve", help="solve one block problem stored in an .npz file (X, w, lam, k, optional g), "
                        "or every one in a folder")
    so.add_argument("problem", type=_existing_path, help="PROBLEM.npz with X (N×n), w (n), lam, k, optionally g (n); "
                    "or a FOLDER of them (cbs export-blocks), solved on --executor")
    so.add_argument("--solver", default=None, help=f"solver name: {', '.join(solver_names())} (default: exact where "
                    "it is fast, brute_force for tiny blocks, bnb above, else swap with its certificate)")
    so.add_argument("--time-limit", type=POSITIVE, default=None, help="seconds")
    add_flags(so, tuple(option(n) for n in ("certify_time", "executor", "workers", "ray_address")))  # shared
    so.add_argument("--seed", type=NONNEG_INT, default=0)
    so.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="solver parameter (repeatable)")
    so.add_argument("--json", action="store_true", help="write the result as JSON to stdout")
    so.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch and BLAS threads (default: the cores)")

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
    ex.add_argument("--out", required=True, metavar="DIR", help="new or empty folder for the .npz files and index.json")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch and BLAS threads (default: the cores)")

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


def split_params(items: list[str]) -> tuple[dict, dict]:
    """``--param NAME=VALUE`` items as (advanced PruneConfig settings, solver parameters): a NAME of the option
    table that is no flag is a setting (parsed and checked by its table entry), any other NAME a parameter of
    the solver's constructor."""
    from .settings import PRUNE_OPTIONS

    from .settings import JOB_OPTIONS

    advanced = {o.name: o for o in PRUNE_OPTIONS + JOB_OPTIONS if not o.public and o.name != "solver_params"}
    settings, params = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InvalidOptionError(f"The '--param' argument must look like NAME=VALUE. Got {item!r}.")
        if key in advanced:
            settings[key] = advanced[key].parse(value, "cbs prune --param")
        else:
            params[key] = parse_value(value)
    return settings, params


def prune_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The PruneConfig settings the user gave to a parsed ``cbs prune``: its flags, then ``--param`` (advanced
    settings and solver parameters). The recommendation fills the rest (:func:`engine.pipeline.prepare`)."""
    from .settings import PRUNE_OPTIONS, given_flags

    advanced, solver_params = split_params(args.param)
    settings = {k: v for k, v in given_flags(args, PRUNE_OPTIONS).items() if k != "sparsity"}
    settings.update(advanced)
    if solver_params:
        settings["solver_params"] = solver_params
    if args.no_progress:
        settings["progress"] = False
    return settings


def _set_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (None: the machine's cores); the number in force."""
    import os

    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def _cmd_prune(args: argparse.Namespace) -> int:
    import time

    from .outdir import locked
    from .resume import check_folder

    started = time.perf_counter()
    out = check_folder(args.out, "cbs prune", overwrite=bool(args.overwrite), resume=bool(args.resume))
    with locked(out, "cbs prune"):  # one run per folder: a second one stops here, exit 2
        return _prune_in(args, out, started)


def _prune_in(args: argparse.Namespace, out: Path, started: float) -> int:
    """``cbs prune`` once its output folder is checked and held."""
    import time

    from .data import default_data_dir
    from .errors import DataNotFoundError
    from .pipeline import execute, prepare
    from .userspec import ZOO, check_data_against_model, load_data_spec, load_loss_spec, load_model_spec

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if (args.model in ZOO and (args.data is None or args.checkpoint is None)) and not data_dir.is_dir():
        raise DataNotFoundError(f"The data folder {data_dir} does not exist. Pass --data-dir (a folder laid out like "
                                "../shared/data) or set CBS_DATA_DIR.")
    threads = _set_threads(args.threads)
    settings = prune_settings(args)
    from .executor import make_executor

    # where the blocks run, checked (and a Ray cluster joined) before the model and data are read
    make_executor(settings.get("executor"), settings.get("workers", 1), settings.get("ray_address"), "cbs prune")
    job = {k: settings.pop(k) for k in ("bn_samples", "bn_augment", "stage_test") if k in settings}
    user = load_model_spec(args.model, args.checkpoint, data_dir)
    train, test, data_text = load_data_spec(args.data, user, data_dir)
    loss, loss_name = load_loss_spec(args.loss, user, "loss")
    metric, metric_name = load_loss_spec(args.metric, user, "metric")
    check_data_against_model(user, train, loss, metric)
    inputs = {"model": args.model, "checkpoint": None if user.checkpoint is None else str(user.checkpoint),
              "data": data_text, "loss": loss_name, "metric": metric_name, "threads": threads}
    run = prepare(user.module, train, test, sparsity=args.sparsity, settings=settings, params=args.params,
                  loss=loss, metric=metric, bn_reestimate=args.bn_reestimate, describe_inputs=inputs, **job)
    from .resume import open_book

    book = open_book(run, str(out), bool(args.resume))  # a changed run or a damaged checkpoint: exit 2, no work
    if book.finished:
        sys.stderr.write(f"cbs prune: {out} holds this run, finished: its record, no work\n")
    else:
        sys.stderr.write(f"cbs prune: {'resuming' if book.saved else 'running'} {run.chosen}\n")
    try:
        record = execute(run, out=str(out), resume=book)
    except CBSError as exc:
        # past validation, a failure is not the user's input: exit 1, with its one-line message
        sys.stderr.write(f"cbs prune: error: {exc}\n")
        return 1
    gaps = [b["gap"] for b in record["blocks"] if b["gap"] is not None]
    lines = [f"model {record['model']}  method {record['method']}{' + update' if record['update'] else ''}  "
             f"sparsity {record['sparsity']:.4g} (achieved {record['achieved_sparsity']:.4f})"]
    if "accuracy" in record:
        lines.append(f"{metric_name} {record['dense_accuracy']:.2f} -> {record['accuracy']:.2f}   test loss "
                     f"{record['dense_test_loss']:.4f} -> {record['test_loss']:.4f}")
    if "accuracy_no_bn_reestimate" in record:
        lines.append(f"{metric_name} without BatchNorm re-estimation {record['accuracy_no_bn_reestimate']:.2f}")
    lines += [f"fisher {record['fisher_seconds']:.1f} s  prune {record['prune_seconds']:.1f} s  total "
              f"{time.perf_counter() - started:.1f} s  peak memory {record['peak_memory_mb']:.0f} MiB  blocks "
              f"{len(record['blocks'])}" + (f"  max certified gap {100 * max(gaps):.3g} %" if gaps else ""),
              f"record: {Path(args.out) / 'record.json'}"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_solvers(args: argparse.Namespace) -> int:
    from .solvers.registry import solver_info

    rows = solver_info()
    if args.json:
        sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
        return 0
    header = f"{'name':<14}{'exact':<7}{'bound':<7}{'N:M':<5}{'available':<11}install / description"
    out = [header, "-" * len(header)]
    for r in rows:
        tail = r.install or r.error or r.description
        out.append(f"{r.name:<14}{'yes' if r.exact else 'no':<7}{'yes' if r.reports_bound else 'no':<7}"
                   f"{'yes' if r.patterns else 'no':<5}{'yes' if r.available else 'no':<11}{tail}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _cmd_solve(args: argparse.Namespace) -> int:
    from .options import SolveOptions
    from .problem_io import load_problem
    from .solve import solve_block
    from .solvers.registry import get_solver

    _set_threads(args.threads)
    advanced, params = split_params(args.param)
    if advanced:
        raise InvalidOptionError(f"The '--param' argument of cbs solve takes solver parameters only. Got {', '.join(advanced)}.")
    if args.problem.is_dir():
        return _solve_folder(args, params)
    # one file is one block, solved here: --executor, --workers and --ray-address matter for a folder only
    problem = load_problem(args.problem)
    name = args.solver
    if name is None:
        from .autosolve import choose_solver

        name, chosen, reason = choose_solver(problem)
        params = {**chosen, **params}
        if args.time_limit is None:  # an exact search on a hard block may not end: bound it, keep its gap
            args.time_limit = 60.0
            reason += "; time limit 60 s (--time-limit to change)"
        sys.stderr.write(f"cbs solve: solver {name} ({reason})\n")
    try:
        solver = get_solver(name, **params)
    except InvalidOptionError as exc:  # the user typed --solver: say so, not the API's 'method'
        raise InvalidOptionError(str(exc).replace("The 'method' argument", "The '--solver' argument")) from None
    result = solve_block(problem, solver, SolveOptions(time_limit=args.time_limit, seed=args.seed,
                                                       certify_time=args.certify_time))
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


def _solve_folder(args: argparse.Namespace, params: dict) -> int:
    """``cbs solve FOLDER``: one line per block (or one JSON object per line), then the totals."""
    from .folder_solve import solve_folder

    try:
        rows = solve_folder(args.problem, args.solver, params=params, time_limit=args.time_limit,
                            certify_time=args.certify_time, seed=args.seed, executor=args.executor,
                            workers=1 if args.workers is None else args.workers, ray_address=args.ray_address,
                            where="cbs solve")
    except InvalidOptionError as exc:  # the user typed --solver: say so, not the API's 'method'
        raise InvalidOptionError(str(exc).replace("The 'method' argument", "The '--solver' argument")) from None
    if args.json:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
        return 0
    lines = [f"{'problem':<28} {'n':>6} {'k':>6} {'solver':<10} {'objective':>14} {'gap':>9} {'status':<9} {'s':>7}"]
    for r in rows:
        gap = "–" if r["gap"] is None else f"{100 * r['gap']:.3g} %"
        lines.append(f"{Path(r['problem']).name:<28} {r['n']:>6} {r['k']:>6} {r['solver']:<10} "
                     f"{r['objective']:>14.8g} {gap:>9} {r['status']:<9} {r['wall_time']:>7.2f}")
    proven = sum(r["status"] == "optimal" for r in rows)
    lines.append(f"{len(rows)} blocks, {proven} proven optimal, {sum(r['wall_time'] for r in rows):.1f} s of solver "
                 "time")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .problem_io import export_blocks

    _set_threads(args.threads)
    if args.block_mode == "chunk" and args.block_size is None:
        raise InvalidOptionError("The '--block-size' argument of cbs export-blocks is required with --block-mode chunk. Got none.")
    paths = export_blocks(
        model_name=args.model, checkpoint=args.checkpoint, data_dir=args.data_dir, out=args.out, params=args.params,
        block_mode=args.block_mode, block_size=args.block_size, sparsity=args.sparsity,
        fisher_samples=args.fisher_samples, damping=args.damping, max_blocks=args.max_blocks, seed=args.seed,
        overwrite=args.overwrite, where="cbs export-blocks",
    )
    sys.stdout.write(f"wrote {len(paths)} problems to {args.out}\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _set_threads(args.threads)
    table, paths = run_demo(out=args.out, sparsities=args.sparsities, methods=args.methods, seed=args.seed,
                            epochs=args.epochs, overwrite=args.overwrite, where="cbs demo")
    sys.stdout.write(table + "\n" + "\n".join(f"wrote {p}" for p in paths) + "\n")
    return 0


def printable(text: str) -> str:
    """``text`` with control characters (ANSI escape codes among them, e.g. from a file name or a value the
    user gave) shown escaped, so a message is one plain line on any terminal or log."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class _PlainFormatter(logging.Formatter):
    """Log lines with control characters escaped (see :func:`printable`)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cbs`` console script; returns the exit code."""
    from .train_cli import cmd_train

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on a bad argument
    handler = logging.StreamHandler()
    handler.setFormatter(_PlainFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])

    def one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        sys.stderr.write(f"cbs {args.command}: warning: {printable(str(message))}\n")

    handlers = {"prune": _cmd_prune, "solvers": _cmd_solvers, "demo": _cmd_demo, "solve": _cmd_solve,
                "export-blocks": _cmd_export, "train": cmd_train}
    shown = warnings.showwarning
    warnings.showwarning = one_line_warning  # a warning is one line too, without the source line
    try:
        return handlers[args.command](args)
    except CBSError as exc:  # a bad input: exit 2; a failure past the checks (RunError): exit 1
        sys.stderr.write(f"cbs {args.command}: error: {printable(str(exc))}\n")
        return 1 if isinstance(exc, RunError) else 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = f"; {out} holds what was complete before (outputs are written as a whole)" if out else ""
        if out and args.command == "train":
            where = f"; {out} holds the last complete epoch, if any (continue it with --resume)"
        elif out and args.command == "prune":
            where = (f"; {out} holds what was complete before (outputs are written as a whole; a multi-stage or "
                     "layer-wise run continues from its last stage or layer with --resume)")
        sys.stderr.write(f"cbs {args.command}: interrupted{where}\n")
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
