"""Run every reliability case class of issue 20 against the real CLI and write the table of docs/reliability.md.

    python scripts/reliability_cases.py [--data-dir ../shared/data] [--out docs/reliability.md]

Each case builds its inputs in a temporary folder, runs ``cbs ...`` in a subprocess (Ctrl-C and concurrent runs
included) and records the exit code and the message the user sees. Nothing here is asserted: the tests in
tests/test_reliability.py, tests/test_outdir.py and tests/test_plugin_trust.py do that; this script shows what a
user gets today, with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

#: a plug-in module the plug-in cases load with ``--solver`` after registering it (cbs's own entry point is
#: the console script; here ``python -c`` registers the solver, then calls engine.cli.main)
PLUGINS = textwrap.dedent('''
    import sys, time
    import numpy as np
    from engine.solvers.base import Capabilities, SubsetSolver
    from engine.solvers.registry import register_solver
    from engine.result import SolveResult, Status

    @register_solver("liar")
    class Liar(SubsetSolver):
        """Claims 'optimal' for the k weights of smallest magnitude (a poor support)."""
        name = "liar"
        capabilities = Capabilities(exact=True, reports_bound=True)
        def solve(self, problem, options, warm_start=None):
            s = np.zeros(problem.n, dtype=bool)
            s[np.argsort(np.abs(problem.weights))[:problem.n_keep]] = True
            return SolveResult(support=s, status=Status.OPTIMAL, solver=self.name)

    @register_solver("raiser")
    class Raiser(SubsetSolver):
        name = "raiser"
        def solve(self, problem, options, warm_start=None):
            raise ValueError("boom")

    @register_solver("none")
    class ReturnsNone(SubsetSolver):
        name = "none"
        def solve(self, problem, options, warm_start=None):
            return None

    @register_solver("sleeper")
    class Sleeper(SubsetSolver):
        """Ignores the time limit."""
        name = "sleeper"
        def solve(self, problem, options, warm_start=None):
            time.sleep(3)
            s = np.zeros(problem.n, dtype=bool)
            s[np.argsort(-np.abs(problem.weights))[:problem.n_keep]] = True
            return SolveResult(support=s, status=Status.FEASIBLE, solver=self.name)

    from engine.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@dataclass
class Case:
    item: str
    what: str
    argv: list[str]
    setup: Callable[[Path, Path], None] | None = None
    runner: str = "cli"  # "cli", "plugins" (PLUGINS registers the test plug-ins first), "sigint", "concurrent"
    test: str = ""
    result: dict = field(default_factory=dict)


def _mnist_bad_label(t: Path, d: Path) -> None:
    (t / "bad" / "mnist").mkdir(parents=True)
    for f in (d / "mnist").iterdir():
        (t / "bad" / "mnist" / f.name).symlink_to(f.resolve())
    name = "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress((d / "mnist" / name).read_bytes()))
    raw[8 + 17] = 200
    (t / "bad" / "mnist" / name).unlink()
    (t / "bad" / "mnist" / name).write_bytes(gzip.compress(bytes(raw)))


def _cifar_bad_label(t: Path, d: Path) -> None:
    (t / "badc" / "cifar10").mkdir(parents=True)
    with np.load(d / "cifar10" / "cifar10_test.npz") as a:
        data, labels = a["data"][:100], a["labels"][:100].copy()
    labels[3] = 42
    np.savez(t / "badc" / "cifar10" / "cifar10_test.npz", data=data, labels=labels)
    (t / "badc" / "cifar10" / "cifar10_train.npz").symlink_to((d / "cifar10" / "cifar10_train.npz").resolve())
    (t / "badc" / "weights").symlink_to((d / "weights").resolve())


def _cifar_corrupt(t: Path, d: Path) -> None:
    (t / "corrupt" / "cifar10").mkdir(parents=True)
    (t / "corrupt" / "cifar10" / "cifar10_test.npz").write_bytes(b"not a zip file")
    with open(d / "cifar10" / "cifar10_train.npz", "rb") as whole:  # the first 4 KiB of the real file
        (t / "corrupt" / "cifar10" / "cifar10_train.npz").write_bytes(whole.read(4096))
    (t / "corrupt" / "weights").symlink_to((d / "weights").resolve())


def _problems(t: Path, d: Path) -> None:
    rng = np.random.default_rng(0)
    base = {"X": rng.normal(size=(40, 12)), "w": rng.normal(size=12), "lam": np.float64(1e-2), "k": np.int64(6)}
    np.savez(t / "ok.npz", **base)
    for name, change in (("lam_array", {"lam": np.array([1e-3, 1e-3])}), ("x_text", {"X": np.full((40, 12), "a")}),
                         ("x_objects", {"X": np.array([[1, 2], [3]], dtype=object)}),
                         ("x_complex", {"X": base["X"] + 1j})):
        np.savez(t / f"{name}.npz", **{**base, **change})
    (t / "empty.npz").write_bytes(b"")
    (t / "text.npz").write_text("X,w\n1,2\n")


def _masks(t: Path, d: Path) -> None:
    import torch

    from engine.models import MLPNet

    shapes = {k: v.shape for k, v in MLPNet().state_dict().items() if k.endswith("weight")}
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, t / "zeros.pt")
    first = next(iter(shapes))
    torch.save({k: torch.zeros(s) if k == first else torch.ones(s) for k, s in shapes.items()}, t / "one_layer.pt")
    torch.save({k: (v * 100).to(torch.int64) for k, v in MLPNet().state_dict().items()}, t / "int.pt")
    (t / "file").write_text("x")


def _finished_run(t: Path, d: Path) -> None:
    _run([*TRAIN, "--data-dir", str(d), "--out", str(t / "run")], t)


TRAIN = ["train", "--model", "mlpnet", "--mask", "random", "--sparsity", "0.9", "--epochs", "1", "--no-progress",
         "--threads", "1"]
PRUNE = ["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "magnitude", "--no-progress"]


def _finished_prune(t: Path, d: Path) -> None:
    _run([*PRUNE, "--stages", "2", "--data-dir", str(d), "--out", str(t / "prun")], t)


def cases() -> list[Case]:
    tr = lambda *a: [*TRAIN, "--data-dir", "{D}", *a]  # noqa: E731
    return [
        Case("1", "resume with another sparsity", tr("--sparsity", "0.5", "--out", "{T}/run", "--resume"),
             _finished_run, test="test_train_resume_checks_what_it_resumes_and_the_folder_is_one_epoch"),
        Case("1", "resume with another mask source", tr("--mask", "magnitude", "--out", "{T}/run", "--resume"),
             _finished_run),
        Case("2, 12", "Ctrl-C during cbs train (SIGINT after the first epoch is written)",
             [*TRAIN, "--data-dir", "{D}", "--epochs", "20", "--out", "{T}/sig"], runner="sigint",
             test="test_train_resume_checks_what_it_resumes_and_the_folder_is_one_epoch"),
        Case("3", "cbs prune into a finished training folder", [*PRUNE, "--data-dir", "{D}", "--out", "{T}/run"],
             _finished_run, test="test_train_resume_checks_what_it_resumes_and_the_folder_is_one_epoch"),
        Case("3", "cbs train --resume into a folder that is not a training run",
             tr("--out", "{T}/notrun", "--resume"), lambda t, d: ((t / "notrun").mkdir(),
                                                                  (t / "notrun" / "record.json").write_text("{}")),
             test="test_train_resume_into_a_folder_that_is_not_a_training_run_is_refused"),
        Case("4", "two cbs train runs into one folder at once", tr("--epochs", "20", "--out", "{T}/two"),
             runner="concurrent", test="test_one_train_per_folder"),
        Case("5", "--out ''", tr("--out", ""), test="test_train_resume_into_a_folder_that_is_not_a_training_run_is_refused"),
        Case("5", "--out is a file", tr("--out", "{T}/file"), _masks),
        Case("5", "--out under a file", tr("--out", "{T}/file/x"), _masks),
        Case("5", "--out /dev/null", [*PRUNE, "--out", "/dev/null"], test="test_bad_out_paths_are_refused_before_any_work"),
        Case("7", "a MNIST training label of 200", [*TRAIN, "--data-dir", "{T}/bad", "--out", "{T}/o7"], _mnist_bad_label,
             test="test_out_of_range_labels_are_refused_at_load_naming_file_index_and_value"),
        Case("7", "a CIFAR test label of 42", [*PRUNE[:2], "resnet20", *PRUNE[3:], "--data-dir", "{T}/badc", "--out",
                                               "{T}/o7c"], _cifar_bad_label),
        Case("8", "an unknown solver parameter", ["solve", "{T}/ok.npz", "--solver", "swap", "--param", "foo_bar=3"],
             _problems, test="test_an_unknown_solver_parameter_of_cbs_solve_lists_the_solver_parameters"),
        *[Case("9", f"cbs solve on {name}.npz", ["solve", f"{{T}}/{name}.npz", "--solver", "greedy"], _problems,
               test="test_malformed_problem_files_are_one_line_exit_2")
          for name in ("lam_array", "x_text", "x_objects", "x_complex", "empty", "text")],
        Case("10", "a CIFAR .npz that is not a zip", [*PRUNE[:2], "resnet20", *PRUNE[3:], "--data-dir", "{T}/corrupt",
                                                      "--out", "{T}/o10"], _cifar_corrupt),
        Case("11", "a mask file that prunes every weight", [*TRAIN[:4], "{T}/zeros.pt", *TRAIN[7:], "--data-dir",
                                                            "{D}", "--out", "{T}/o11"], _masks,
             test="test_mask_files_that_prune_everything_are_refused_and_an_empty_layer_warns"),
        Case("11", "a mask file that empties one layer", [*TRAIN[:4], "{T}/one_layer.pt", *TRAIN[7:], "--data-dir",
                                                          "{D}", "--out", "{T}/o11b"], _masks),
        Case("13", "an integer-typed checkpoint", [*PRUNE, "--checkpoint", "{T}/int.pt", "--data-dir", "{D}", "--out",
                                                   "{T}/o13"], _masks, test="test_an_integer_checkpoint_is_refused"),
        Case("13", "--mask-samples larger than the data", [*TRAIN[:4], "snip", *TRAIN[5:], "--mask-samples", "70000",
                                                          "--data-dir", "{D}", "--out", "{T}/o13b"],
             test="test_mask_samples_larger_than_the_data_is_an_error"),
        Case("13", "ANSI codes in a file name", ["solve", "{T}/\x1b[31mred.npz"],
             test="test_messages_carry_no_terminal_escape_codes"),
        Case("14", "an exact plug-in that claims 'optimal' for a poor support", ["solve", "{T}/ok.npz", "--solver",
                                                                               "liar"], _problems, runner="plugins",
             test="tests/test_plugin_trust.py"),
        Case("15", "a plug-in that raises", ["solve", "{T}/ok.npz", "--solver", "raiser"], _problems,
             runner="plugins", test="tests/test_plugin_trust.py"),
        Case("15", "a plug-in that returns None", ["solve", "{T}/ok.npz", "--solver", "none"], _problems,
             runner="plugins", test="tests/test_plugin_trust.py"),
        Case("16", "a plug-in that sleeps 3 s past --time-limit 0.1",
             ["solve", "{T}/ok.npz", "--solver", "sleeper", "--time-limit", "0.1"], _problems, runner="plugins",
             test="tests/test_plugin_trust.py"),
        Case("17", "an unknown --solver", ["solve", "{T}/ok.npz", "--solver", "nope"], _problems),
        Case("23", "cbs prune --resume of a 2-stage run with another sparsity",
             [*PRUNE[:4], "0.6", *PRUNE[5:], "--stages", "2", "--data-dir", "{D}", "--out", "{T}/prun", "--resume"],
             _finished_prune, test="test_a_changed_run_is_refused_naming_each_difference"),
        Case("23", "an unreachable --ray-address", [*PRUNE, "--executor", "ray", "--ray-address", "127.0.0.1:1",
                                                    "--data-dir", "{D}", "--out", "{T}/o23"],
             test="test_an_unreachable_ray_address_is_one_clear_error_before_any_work"),
        Case("23", "--ray-address without --executor ray", [*PRUNE, "--ray-address", "127.0.0.1:6379", "--data-dir",
                                                             "{D}", "--out", "{T}/o23b"],
             test="test_a_ray_address_without_ray_is_refused_naming_the_flags"),
    ]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    env.pop("COLUMNS", None)
    return env


def _run(argv: list[str], t: Path, runner: str = "cli") -> dict:
    if runner == "plugins":
        cmd = [sys.executable, "-c", PLUGINS, *argv]
    else:
        cmd = [sys.executable, "-m", "engine.cli", *argv]
    start = time.perf_counter()
    if runner == "sigint":
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=t)
        out = Path(argv[argv.index("--out") + 1])
        while not (out / "record.json").exists() and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate()
        code = proc.returncode
        files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        stderr += f"\n(then {out.name} holds {', '.join(files)})"
    elif runner == "concurrent":
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=t)
        out = Path(argv[argv.index("--out") + 1])
        while not (out.parent / f".{out.name}.lock").exists() and first.poll() is None:
            time.sleep(0.1)
        time.sleep(1.0)  # the first run holds the lock by now (it takes it before loading the data)
        second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=t)
        first.send_signal(signal.SIGINT)
        first.communicate()
        code, stdout, stderr = second.returncode, second.stdout, second.stderr
    else:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=t)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    return {"code": code, "stdout": stdout, "stderr": stderr, "seconds": time.perf_counter() - start}


def _said(result: dict, t: Path, d: Path) -> str:
    lines = [ln for ln in result["stderr"].splitlines() if ln.strip() and not ln.startswith("cbs prune: running")]
    if "Traceback" in result["stderr"]:
        return "TRACEBACK: " + lines[-1]
    text = " / ".join(lines) if lines else (result["stdout"].splitlines() or [""])[-1]
    return text.replace(str(t), "$T").replace(str(d.resolve()), "$DATA").replace(str(d), "$DATA").replace("|", "\\|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--only", default=None, help="run only the cases of these items (comma-separated)")
    args = parser.parse_args()
    d = args.data_dir.resolve()
    rows = []
    chosen = [c for c in cases() if args.only is None or set(c.item.split(", ")) & set(args.only.split(","))]
    for case in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            if case.setup is not None:
                case.setup(t, d)
            argv = [a.replace("{T}", str(t)).replace("{D}", str(d)) for a in case.argv]
            result = _run(argv, t, case.runner)
            shown = " ".join(repr(a) if (not a or " " in a or "\x1b" in a) else a for a in case.argv)
            shown = shown.replace("{T}", "$T").replace("{D}", "$DATA")
            rows.append((case, shown, result["code"], _said(result, t, d)))
            print(f"[{case.item}] {case.what}: exit {result['code']} ({result['seconds']:.1f} s)", file=sys.stderr)
    table = ["| item | case | command (`cbs ...`) | exit | what the user gets now | test |", "|---|---|---|---|---|---|"]
    for case, shown, code, said in rows:
        table.append(f"| {case.item} | {case.what} | `{shown}` | {code} | {said} | {case.test or '–'} |")
    text = args.out.read_text() if args.out.exists() else ""
    begin, end = "<!-- cases:begin -->", "<!-- cases:end -->"
    block = begin + "\n" + "\n".join(table) + "\n" + end
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
