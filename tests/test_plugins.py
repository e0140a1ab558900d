"""Plug-ins: the conformance checker, the example plug-in script, entry points (good and broken)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.result import SolveResult, Status
from engine.solvers import Capabilities, SubsetSolver
from engine.testing import check_solver

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name", ["magnitude", "woodfisher", "greedy", "iht", "cbs", "brute_force", "bnb", "highs", "cvxpy", "pyomo"]
)
def test_builtin_solvers_conform(name):
    report = check_solver(name, n=7, seeds=(0,))
    assert report.problems == 6 and not report.failures


class _Liar(SubsetSolver):
    """Claims optimality it cannot prove."""

    name = "liar"
    capabilities = Capabilities()

    def solve(self, problem, options, warm_start=None):
        s = np.zeros(problem.n, dtype=bool)
        s[: problem.n_keep] = True
        return SolveResult(support=s, status=Status.OPTIMAL)


def test_checker_catches_a_broken_solver():
    with pytest.raises(AssertionError, match="not exact"):
        check_solver(_Liar(), n=6, seeds=(0,))
    report = check_solver(_Liar(), n=6, seeds=(0,), raise_on_failure=False)
    assert report.failures and "liar" in str(report)


def _env(extra_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(ROOT), env.get("PYTHONPATH", "")])
    env["CBS_PROGRESS"] = "0"
    return env


def test_example_plugin_script_conforms_and_prunes(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "example_plugin.py")], capture_output=True,
                         text=True, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "solver 'obd'" in out.stdout and "conforms" in out.stdout
    assert "test accuracy" in out.stdout


def test_entry_point_plugins_load_and_broken_ones_warn(tmp_path):
    (tmp_path / "goodplug.py").write_text(textwrap.dedent("""
        import numpy as np
        from engine.result import SolveResult
        from engine.solvers import SubsetSolver, Capabilities, top_k_support
        class Good(SubsetSolver):
            name = "goodplug"
            capabilities = Capabilities(description="plug-in test")
            def solve(self, problem, options, warm_start=None):
                return SolveResult(support=top_k_support(-np.arange(problem.n), problem.n_keep))
    """))
    dist = tmp_path / "goodplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: goodplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cbs.solvers]\ngoodplug = goodplug:Good\nbroken = no_such_module:Nope\n")
    code = textwrap.dedent("""
        import warnings, numpy as np
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from engine.solvers.registry import solver_names
            names = solver_names()
        from engine.solve import solve_block
        from formulations import BlockProblem
        p = BlockProblem(np.arange(1.0, 6.0), 2, 0.1, factor=np.eye(5))
        print("names", names)
        print("kept", solve_block(p, "goodplug").kept.tolist())
        print("warned", [str(w.message) for w in caught if "broken" in str(w.message)])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'goodplug'" in out.stdout and "'magnitude'" in out.stdout
    assert "kept [0, 1]" in out.stdout
    assert "failed to load" in out.stdout
