"""The exact-vs-heuristic study script, and the objective scaling of the MIQP backends, against brute force."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidProblemError
from engine.options import SolveOptions
from engine.result import Status
from engine.solve import UnprovenOptimalityWarning, solve_block
from formulations.canonical import scaled_problem
from formulations.objective import support_objective
from formulations.problem import BlockProblem

from random_problems import make_problem

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("exact_vs_heuristic", ROOT / "scripts" / "exact_vs_heuristic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# ----------------------------------------------------------------------------------------- scaling
@pytest.mark.parametrize("kind", ["well", "ill"])
def test_scaled_problem_scales_every_objective(kind):
    p = make_problem(9, 4, seed=3, kind=kind, with_gradient=True)
    c = 123.5
    q = scaled_problem(p, c)
    rng = np.random.default_rng(0)
    for _ in range(5):
        S = np.zeros(9, dtype=bool)
        S[rng.choice(9, 4, replace=False)] = True
        assert support_objective(q, S) == pytest.approx(c * support_objective(p, S), rel=1e-10)
    dense = BlockProblem(p.weights, 4, p.damping, fisher=p.dense_hessian() - p.damping * np.eye(9))
    assert support_objective(scaled_problem(dense, c), S) == pytest.approx(c * support_objective(dense, S), rel=1e-9)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_scaled_problem_rejects_bad_scale(scale):
    with pytest.raises(InvalidProblemError, match="'scale' argument of scaled_problem\\(\\) must be a finite number > 0"):
        scaled_problem(make_problem(6, 3, seed=0), scale)


@pytest.mark.skipif(not _installed("pyomo", "pyscipopt"), reason="pyomo + pyscipopt (SCIP) not installed")
@pytest.mark.parametrize("seed", [0, 1])
def test_pyomo_proves_tiny_objective_blocks(seed):
    """Regression: before the objective was scaled to U = 1, SCIP's absolute tolerances left these blocks
    (optimum ~1e-4, λ = 1e-4) with a bound ~3 % low and Termination.ERROR."""
    p = make_problem(10, 5, seed=seed, kind="ill")
    exact = solve_block(p, "brute_force")
    assert exact.objective < 1e-2  # the regime of the bug
    res = solve_block(p, "pyomo", SolveOptions(time_limit=60))
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(exact.objective, rel=1e-9)
    assert res.bound <= exact.objective * (1 + 1e-9)
    assert res.bound >= exact.objective * (1 - 2e-5)


@pytest.mark.skipif(not _installed("cvxpy", "pyscipopt"), reason="cvxpy + pyscipopt (SCIP) not installed")
def test_cvxpy_proves_tiny_objective_block():
    p = make_problem(10, 5, seed=0, kind="ill")
    exact = solve_block(p, "brute_force")
    res = solve_block(p, "cvxpy", SolveOptions(time_limit=60))
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(exact.objective, rel=1e-9)
    assert exact.objective * (1 - 2e-5) <= res.bound <= exact.objective * (1 + 1e-9)


# ----------------------------------------------------------------------------------------- the study
def test_study_records_agree_with_brute_force(tmp_path, capsys):
    evh = _script()
    out = tmp_path / "study"
    argv = ["--sources", "random", "--random-sizes", "8", "10", "--random-seeds", "1", "--sparsities", "0.5", "0.8",
            "--exact", "highs", "--time-limit", "20", "--no-progress", "--out", str(out)]
    assert evh.main(argv) == 0
    assert str(out / "records.jsonl") in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    heuristics = evh.heuristic_names(None)
    assert {"magnitude", "woodfisher", "greedy", "cbs", "iht"} <= set(heuristics)
    instances = {(r["block"], r["sparsity"]) for r in records}
    assert len(instances) == 2 * 2 * 2  # kinds × sizes × sparsities
    assert len(records) == len(instances) * (len(heuristics) + 2)  # + bnb + highs
    oracle = {}
    for kind in ("well", "ill"):
        for n in (8, 10):
            for s in (0.5, 0.8):
                p = evh.random_instance(n, 0, kind).with_n_keep(evh.n_keep(n, s))
                oracle[(p.label, s)] = solve_block(p, "brute_force").objective
    assert set(oracle) == instances
    for r in records:
        opt = oracle[(r["block"], r["sparsity"])]
        assert r["k"] == evh.n_keep(r["n"], r["sparsity"])
        assert r["bound"] <= opt * (1 + 1e-9) + 1e-12  # every certificate is a valid lower bound
        assert r["objective"] >= opt * (1 - 1e-9)  # nobody beats the optimum
        assert r["reference_proven"] and r["reference_objective"] == pytest.approx(opt, rel=1e-9)
        assert r["gap_to_optimum"] == pytest.approx((r["objective"] - opt) / opt, rel=1e-6, abs=1e-9)
        assert r["gap_to_optimum"] >= -1e-9
        if r["role"] != "heuristic":
            assert r["proven"] and r["objective"] == pytest.approx(opt, rel=1e-9)
        assert support_objective(evh.random_instance(r["n"], 0, r["source"].split("-")[1]).with_n_keep(r["k"]),
                                 np.isin(np.arange(r["n"]), r["support"])) == pytest.approx(r["objective"], rel=1e-9)
    summary = (out / "summary.md").read_text()
    for name in heuristics + ["bnb", "highs"]:
        assert f"| {name} |" in summary
    for png in ("gap_vs_n.png", "time_vs_n.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable: a second run adds nothing
    before = (out / "records.jsonl").read_text()
    assert evh.main(argv) == 0
    assert (out / "records.jsonl").read_text() == before


def test_study_summary_counts_optimal_share():
    evh = _script()
    base = {"source": "random-well", "n": 8, "sparsity": 0.5, "time": 0.1, "gap": 0.5, "time_limit": None}
    records = [
        {**base, "block": "a", "solver": "bnb", "role": "reference", "proven": True, "objective": 1.0,
         "reference_objective": 1.0, "reference_proven": True, "gap_to_optimum": 0.0},
        {**base, "block": "b", "solver": "bnb", "role": "reference", "proven": True, "objective": 2.0,
         "reference_objective": 2.0, "reference_proven": True, "gap_to_optimum": 0.0},
        {**base, "block": "a", "solver": "greedy", "role": "heuristic", "proven": False, "objective": 1.0,
         "reference_objective": 1.0, "reference_proven": True, "gap_to_optimum": 0.0},
        {**base, "block": "b", "solver": "greedy", "role": "heuristic", "proven": False, "objective": 3.0,
         "reference_objective": 2.0, "reference_proven": True, "gap_to_optimum": 0.5},
    ]
    table = evh.summarize(records)
    assert "| greedy | 2 | 50.0 % | 25.00 % | 50.00 % | 50.00 % | 0.100 |" in table
    assert "| bnb | 2 | 100.0 % | 2/2 |" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsities", "1.5"], "argument --sparsities: must be a number in (0, 1). Got 1.5."),
        (["--time-limit", "0"], "argument --time-limit: must be a number > 0. Got 0."),
        (["--random-sizes", "1"], "argument --random-sizes: must be an integer >= 2. Got 1."),
        (["--fc1-chunks", "-1"], "argument --fc1-chunks: must be an integer >= 0. Got -1."),
        (["--heuristics", "nope"], "The '--heuristics' argument must name registered solvers"),
        (["--exact", "magnitude"], "The '--exact' argument must name exact solvers"),
    ],
)
def test_study_rejects_bad_arguments(argv, message, tmp_path, capsys):
    evh = _script()
    with pytest.raises(SystemExit) as exc:
        evh.main(argv + ["--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_study_mlpnet_blocks_are_real(shared_data, tmp_path):
    """The real blocks: every row of fc3 (n = 20) and fc2 (n = 40), fc1 chunks of the asked sizes with no
    zero gradient column, and each saved block file replays to the same problem."""
    from engine.problem_io import load_problem

    evh = _script()
    insts = evh.mlpnet_instances(shared_data, 200, 1e-3, [20, 50], 2, 0, tmp_path)
    sizes = [i.problem.n for i in insts]
    assert sizes == [20] * 10 + [40] * 20 + [20, 20, 50, 50]
    for inst in insts:
        X = inst.problem.factor_matrix()
        assert X.shape == (200, inst.problem.n)
        if "fc1" in inst.block:  # rows of fc2/fc3 may hold dead ReLU inputs (real zero columns); fc1 chunks not
            assert np.all(np.abs(X).max(axis=0) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenOptimalityWarning)
        p = insts[0].problem.with_n_keep(10)
        assert solve_block(p, "bnb").objective == pytest.approx(solve_block(p, "brute_force").objective, rel=1e-9)
    files = sorted((tmp_path / "blocks").glob("*.npz"))
    assert len(files) == len(insts)
    replay = load_problem(tmp_path / "blocks" / "fc3_weight_0.npz")
    np.testing.assert_allclose(replay.factor_matrix(), insts[0].problem.factor_matrix())


@pytest.mark.skipif(not _installed("pyomo", "pyscipopt"), reason="pyomo + pyscipopt (SCIP) not installed")
def test_pyomo_default_form_proves_tall_blocks():
    """Regression: with N ≫ n (real layers: N = 1000 gradient rows) the low-rank MIQP has N extra variables
    and SCIP did not prove k = 1 of an n = 20 MLPNet row in 30 s; the default now takes the dense form there."""
    p = make_problem(12, 2, seed=0, kind="well", N=600)
    exact = solve_block(p, "brute_force")
    res = solve_block(p, "pyomo", SolveOptions(time_limit=60))
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(exact.objective, rel=1e-9)
    assert res.extra["low_rank"] is False and res.extra.get("objective_scale") is not None
    square = make_problem(12, 6, seed=0, kind="well", N=24)  # N ≤ 2n: the low-rank form, SCIP's better one
    res = solve_block(square, "pyomo", SolveOptions(time_limit=60))
    assert res.extra["low_rank"] is True and res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(solve_block(square, "brute_force").objective, rel=1e-9)


def test_objective_scale_is_clipped():
    from formulations.canonical import MAX_OBJECTIVE_SCALE, objective_scale

    assert objective_scale(4.0) == 0.25
    assert objective_scale(2e-8) == MAX_OBJECTIVE_SCALE
    assert objective_scale(1e9) == 1 / MAX_OBJECTIVE_SCALE
    assert objective_scale(0.0) == objective_scale(-1.0) == objective_scale(math.inf) == 1.0


@pytest.mark.skipif(not _installed("pyomo", "pyscipopt"), reason="pyomo + pyscipopt (SCIP) not installed")
def test_pyomo_returns_on_a_near_zero_optimum():
    """Regression: scaled by 1/U = 5e7 (E* = 2e-8), SCIP never closed this block (no time limit: a hang);
    with the scale clipped at 1e4 it returns at once with the brute-force optimum."""
    from engine.result import Termination
    from engine.testing import conformance_problems

    p = {q.label: q for q in conformance_problems(8, (1,))}["ill-s1-k7"]
    exact = solve_block(p, "brute_force")
    assert 0 < exact.objective < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenOptimalityWarning)
        res = solve_block(p, "pyomo", SolveOptions(time_limit=30))
    assert res.termination != Termination.TIME_LIMIT
    assert res.objective == pytest.approx(exact.objective, rel=1e-9)
