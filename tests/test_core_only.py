"""The core install (torch, numpy, scipy, highspy) suffices for ``import engine``, the CLI, the pruner and
every built-in heuristic; the optional packages are imported lazily and, when missing, raise an error that
names the pip extra to install.

Each check runs in a fresh interpreter in which the optional packages are made absent: a ``sys.meta_path``
finder raises ``ModuleNotFoundError`` for them (and their submodules), and ``sys.modules[name] = None``
makes ``importlib.util.find_spec(name)`` return None, as it does on a real core-only install (the finder
alone would make ``find_spec`` raise instead). A top-level import of an optional package anywhere in
``engine`` or ``formulations`` makes these tests fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPTIONAL = ("pyomo", "cvxpy", "pyscipopt", "gurobipy", "matplotlib", "tqdm", "transformers", "timm", "safetensors")

_BLOCK = textwrap.dedent(f"""
    import importlib.abc, importlib.util, sys

    OPTIONAL = {OPTIONAL!r}

    class _Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in OPTIONAL:
                raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked: core-only test)", name=fullname)
            return None

    assert not any(m.split(".")[0] in OPTIONAL for m in sys.modules), "imported before the block"
    sys.meta_path.insert(0, _Absent())
    for _name in OPTIONAL:
        sys.modules[_name] = None
    for _name in OPTIONAL:
        try:
            __import__(_name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{{_name}} is importable despite the block")
        assert importlib.util.find_spec(_name) is None
""")


def _run(body: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["CBS_PROGRESS"] = "1"
    out = subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(body)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def test_every_module_imports_without_optional_packages():
    out = _run("""
        import importlib, pkgutil
        import engine, engine.cli, engine.pruner, formulations
        names, broken = [], []
        for pkg in (engine, formulations):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                try:
                    importlib.import_module(info.name)
                except ImportError:
                    raise  # an optional package imported at module level (or a real missing module)
                except Exception as exc:  # noqa: BLE001 - not this test's concern (e.g. work in progress)
                    broken.append(f"{info.name}: {type(exc).__name__}: {exc}")
                    continue
                names.append(info.name)
        assert {"engine.cli", "engine.pruner", "engine.plots", "engine.progress",
                "engine.solvers.pyomo_backend", "engine.solvers.cvxpy_backend"} <= set(names), broken
        print("not imported for other reasons:", broken)
        leaked = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in OPTIONAL)
        assert not leaked, leaked
        print("imported", len(names), "modules")
    """)
    assert "imported" in out.stdout


def test_builtin_heuristics_solve_with_the_core_alone():
    out = _run("""
        import numpy as np
        from engine.errors import SolverUnavailableError
        from engine.options import SolveOptions
        from engine.solve import solve_block
        from engine.solvers.registry import get_solver, solver_info
        from formulations.problem import BlockProblem

        rng = np.random.default_rng(0)
        n, N, k = 10, 8, 5
        problem = BlockProblem(rng.standard_normal(n), k, 0.1, factor=rng.standard_normal((N, n)) / np.sqrt(N))
        for name in ("magnitude", "woodfisher", "greedy", "cbs", "swap", "iht", "brute_force", "bnb", "highs"):
            res = solve_block(problem, get_solver(name), SolveOptions())
            assert res.support.sum() == k and np.isfinite(res.objective), name
            print("solved", name, res.status)

        hints = {"pyomo": "pip install 'cbs-prune[pyomo", "cvxpy": "pip install 'cbs-prune[cvxpy"}
        for name, hint in hints.items():
            try:
                solve_block(problem, get_solver(name), SolveOptions())
            except SolverUnavailableError as exc:
                assert hint in str(exc), str(exc)
                print("refused", name, "|", exc)
            else:
                raise AssertionError(f"solver {name} ran without its package")
        rows = {r.name: r for r in solver_info()}
        for name, hint in hints.items():
            assert not rows[name].available and hint in (rows[name].install or ""), rows[name]
        assert all(rows[m].available for m in ("magnitude", "cbs", "highs", "bnb"))
    """)
    assert out.stdout.count("solved") == 9 and out.stdout.count("refused") == 2


def test_cli_lists_missing_backends_with_their_extra():
    out = _run("""
        from engine.cli import main
        assert main(["solvers"]) == 0
    """)
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "cbs-prune[pyomo" in lines["pyomo"] and "cbs-prune[cvxpy" in lines["cvxpy"]
    assert lines["magnitude"].split()[3] == "yes" and lines["pyomo"].split()[3] == "no"


def test_progress_falls_back_and_plots_name_their_extra(tmp_path):
    out = _run(f"""
        import io
        from engine.errors import CBSError, SolverUnavailableError
        from engine.progress import progress

        buf = io.StringIO()
        real, sys.stderr = sys.stderr, buf
        try:
            got = list(progress(range(7), desc="blocks", enabled=True))
            quiet = list(progress(iter(range(3)), enabled=False))
        finally:
            sys.stderr = real
        assert got == list(range(7)) and quiet == [0, 1, 2]
        text = buf.getvalue()
        assert "\\r" in text and "blocks: 7/7" in text, repr(text)

        from engine.plots import accuracy_plot
        try:
            accuracy_plot([{{"label": "a", "sparsity": 0.5, "accuracy": 90.0}}], {str(tmp_path / "p.png")!r}, "t")
        except SolverUnavailableError as exc:
            assert isinstance(exc, CBSError) and "pip install 'cbs-prune[plots]'" in str(exc), str(exc)
            print("plots refused |", exc)
        else:
            raise AssertionError("accuracy_plot drew without matplotlib")
    """)
    assert "plots refused" in out.stdout
    assert not (tmp_path / "p.png").exists()
