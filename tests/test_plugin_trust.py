"""Plug-ins are checked, not trusted: refuted claims, failing calls, ignored time limits, broken entry points.

The lying, raising, None-returning and sleeping solvers below are real SubsetSolver plug-ins (the fixtures).
Only the sleeping one depends on the clock, and only in the robust direction: it sleeps longer than its
limit plus the engine's grace, so it is flagged whatever the machine's load.
"""

import copy
import itertools
import json
import time
import warnings
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch
from torch import nn

import engine.solve as solve_mod
from engine.cli import main
from engine.errors import InvalidOptionError, SolverError
from engine.models import prunable_parameters
from engine.options import SolveOptions
from engine.problem_io import save_problem
from engine.pruner import PruneConfig, prune
from engine.result import SolveResult, Status, Termination
from engine.solve import (
    SolverAnswerError,
    SolverCallError,
    TimeLimitExceededWarning,
    forget_overshoot_warnings,
    overshoot_warned,
    solve_block,
    time_limit_grace,
)
from engine.solvers import Capabilities, SubsetSolver, registry, top_k_support
from engine.testing import check_solver
from formulations.objective import optimal_update, support_objective
from formulations.problem import BlockProblem

LIMIT = 0.05
#: the sleeper's nap: past the limit by more than the grace (max(1 s, 10 %)) whatever the load
NAP = LIMIT + time_limit_grace(LIMIT) + 0.1


def _problem(n=8, k=4, seed=0, gradient=False, label="b1"):
    rng = np.random.default_rng(seed)
    g = 0.1 * rng.normal(size=n) if gradient else None
    return BlockProblem(rng.normal(size=n), k, 0.1, factor=rng.normal(size=(2 * n, n)) / np.sqrt(2 * n),
                        gradient=g, label=label)


def _optimum(p):
    best = None
    for kept in itertools.combinations(range(p.n), p.n_keep):
        s = np.zeros(p.n, dtype=bool)
        s[list(kept)] = True
        value = support_objective(p, s)
        if best is None or value < best[0]:
            best = (value, s)
    return best


class _Liar(SubsetSolver):
    """Declares itself exact, keeps the k smallest |w| and claims what it is told: 'optimal' with no bound or
    with bound = its objective, or a given bound."""

    name = "liar"
    capabilities = Capabilities(exact=True, reports_bound=True)

    def __init__(self, bound="none", status=Status.OPTIMAL, support=None):
        self.bound, self.status, self.support = bound, status, support

    def solve(self, problem, options, warm_start=None):
        s = top_k_support(-np.abs(problem.weights), problem.n_keep) if self.support is None else self.support
        bound = None if self.bound == "none" else optimal_update(problem, s).objective if self.bound == "objective" \
            else self.bound
        return SolveResult(support=s, bound=bound, status=self.status, termination=Termination.OPTIMAL)


class _Raiser(SubsetSolver):
    name = "boom"
    capabilities = Capabilities()

    def __init__(self, error=None):
        self.error = error or ValueError("boom\nsecond line of a long message")

    def solve(self, problem, options, warm_start=None):
        raise self.error


class _Returns(SubsetSolver):
    name = "returns"
    capabilities = Capabilities()

    def __init__(self, value=None):
        self.value = value

    def solve(self, problem, options, warm_start=None):
        return self.value


class _Sleeper(SubsetSolver):
    """Magnitude, but naps NAP seconds whenever it is given a time limit (it ignores it)."""

    name = "sleeper"
    capabilities = Capabilities()

    def solve(self, problem, options, warm_start=None):
        if options.time_limit is not None:
            time.sleep(NAP)
        return SolveResult(support=top_k_support(np.abs(problem.weights), problem.n_keep))


# ------------------------------------------------------------------------------------------- item 14
@pytest.mark.parametrize("bound", ["none", "objective"])
@pytest.mark.parametrize("n, k, how", [(8, 4, "all C"), (30, 15, "single swap"), (9, 1, "single swap")])
def test_a_false_optimal_claim_is_refuted(bound, n, k, how):
    p = _problem(n, k, seed=n)
    with pytest.raises(SolverAnswerError, match=rf"Solver 'liar' claimed the optimal objective .* block 'b1'.*{how}"):
        solve_block(p, _Liar(bound))


def test_a_bound_between_the_optimum_and_the_objective_is_refuted():
    p = _problem()
    opt, _ = _optimum(p)
    s = top_k_support(-np.abs(p.weights), p.n_keep)
    value = support_objective(p, s)
    assert value > 2 * opt  # the lie is a gross one
    with pytest.raises(SolverAnswerError, match="returned the bound .* is refuted"):
        solve_block(p, _Liar((opt + value) / 2, status=Status.FEASIBLE))
    with pytest.raises(SolverError):  # SolverAnswerError is a SolverError (exit 1 in the CLI)
        solve_block(p, _Liar(opt * 1.01 + 1e-3, status=Status.FEASIBLE))


@pytest.mark.parametrize("gradient", [False, True])
@pytest.mark.parametrize("n, k", [(8, 4), (8, 1), (8, 7), (30, 15)])
def test_true_claims_and_valid_bounds_stand(gradient, n, k):
    p = _problem(n, k, seed=3, gradient=gradient)
    if n == 30:  # the optimum is unknown here; any support's own objective is no bound, a lower one is
        s = top_k_support(np.abs(p.weights), k)
        r = solve_block(p, _Liar(support_objective(p, s) - 10.0, status=Status.FEASIBLE, support=s))
        assert r.status == Status.FEASIBLE
        return
    opt, best = _optimum(p)
    r = solve_block(p, _Liar("objective", support=best))
    assert r.status == Status.OPTIMAL and r.objective == pytest.approx(opt, rel=1e-12)
    r = solve_block(p, _Liar(opt - 1e-3, status=Status.FEASIBLE, support=~best if k * 2 == n else best))
    assert r.bound >= opt - 1e-3


class _PatternLiar(_Liar):
    capabilities = Capabilities(exact=True, reports_bound=True, patterns=True)


def test_claims_on_an_n_m_block_are_judged_among_the_pattern_supports():
    from formulations.patterns import pattern_violation, top_per_group

    _Liar = _PatternLiar  # noqa: N806 - the same liar, declaring that it honours patterns

    rng = np.random.default_rng(0)
    p = BlockProblem(rng.normal(size=8), 4, 0.1, factor=rng.normal(size=(16, 8)) / 4, label="b1", pattern=(2, 4))
    ranked = sorted((optimal_update(p, s).objective, tuple(s)) for s in (
        np.array(bits, dtype=bool) for bits in itertools.product([0, 1], repeat=8)) if s.sum() == 4)
    allowed = [(v, np.array(s)) for v, s in ranked if pattern_violation(np.array(s), (2, 4)) is None]
    assert ranked[0][0] < allowed[0][0]  # the unstructured optimum breaks the pattern: it refutes nothing
    r = solve_block(p, _Liar("objective", support=allowed[0][1]))
    assert r.status == Status.OPTIMAL and r.objective == pytest.approx(allowed[0][0], rel=1e-12)
    with pytest.raises(SolverAnswerError, match="all 2:4 supports"):
        solve_block(p, _Liar("objective", support=allowed[-1][1]))
    with pytest.raises(SolverError, match="breaks the 2:4 pattern of block 'b1': group 0"):
        solve_block(p, _Liar(support=np.arange(8) < 4))
    big = BlockProblem(rng.normal(size=32), 16, 0.1, factor=rng.normal(size=(64, 32)) / 8, label="b2", pattern=(2, 4))
    with pytest.raises(SolverAnswerError, match="single swap: drop (\\d+), keep (\\d+)") as info:
        solve_block(big, _Liar(support=top_per_group(-np.abs(big.weights), (2, 4))))
    drop, keep = map(int, __import__("re").search(r"drop (\d+), keep (\d+)", str(info.value)).groups())
    assert drop // 4 == keep // 4  # the refuting swap stays inside its group of 4


def test_the_swap_values_of_the_check_are_exact():
    fisher = np.cov(np.random.default_rng(0).normal(size=(10, 30)))
    for p in (_problem(12, 5, seed=1), _problem(12, 5, seed=2, gradient=True),
              BlockProblem(np.linspace(-1, 2, 10), 4, 0.05, fisher=fisher)):
        s = top_k_support(-np.abs(p.weights), p.n_keep)
        base = support_objective(p, s)
        swaps = []
        for q in np.flatnonzero(s):
            for j in np.flatnonzero(~s):
                t = s.copy()
                t[q], t[j] = False, True
                swaps.append(support_objective(p, t) - base)
        found = [support_objective(p, t) - base for t in solve_mod._swap_candidates(p, s)]
        assert found == pytest.approx(sorted(swaps)[: len(found)], rel=1e-9, abs=1e-12) and len(found) == 3


def test_blocks_beyond_the_swap_budget_are_not_searched(monkeypatch):
    monkeypatch.setattr(solve_mod, "SWAP_PASS_MAX_FLOPS", 0.0)
    assert solve_block(_problem(30, 15), _Liar()).status == Status.OPTIMAL  # documented: not checked


# ------------------------------------------------------------------------------------------- item 15
def test_a_raising_or_misbehaving_solver_is_one_line_naming_it():
    p = _problem()
    with pytest.raises(SolverCallError, match=r"^Solver 'boom' failed on block 'b1': ValueError: boom$") as info:
        solve_block(p, _Raiser())
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(SolverCallError, match=r"^Solver 'returns' returned None on block 'b1', not a SolveResult\.$"):
        solve_block(p, _Returns(None))
    with pytest.raises(SolverCallError, match="returned a tuple of 2"):
        solve_block(p, _Returns((np.ones(8, bool), 1.0)))
    with pytest.raises(InvalidOptionError, match="mine"):  # our own errors pass unchanged
        solve_block(p, _Raiser(InvalidOptionError("The 'x' argument of mine() must be 1. Got 2.")))
    with pytest.raises(KeyboardInterrupt):  # untouched
        solve_block(p, _Raiser(KeyboardInterrupt()))


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(40, 6)
    return model, [n for n, _ in prunable_parameters(model)], (x, torch.randint(0, 3, (40,)))


@pytest.mark.parametrize("solver, workers, match", [
    (_Raiser(), 1, r"Solver 'boom' failed on block '0\.weight': ValueError: boom"),
    (_Raiser(), 2, r"Solver 'boom' failed on block '.*': ValueError: boom"),
    (_Returns(None), 1, "returned None on block '0.weight', not a SolveResult"),
    (_Liar(), 1, "claimed the optimal objective"),
    (_Raiser(KeyboardInterrupt()), 1, None),
])
def test_prune_with_a_failing_plugin_raises_one_line_and_restores_the_model(solver, workers, match):
    model, names, data = _tiny_model()
    before = copy.deepcopy(model.state_dict())
    config = PruneConfig(sparsity=0.5, method=solver, fisher_samples=20, block_mode="layer", workers=workers)
    with pytest.raises(KeyboardInterrupt if match is None else SolverError, match=match):
        prune(model, names, data, config)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def _cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    for cls in (_Liar, _Raiser, _Returns):
        registry.register_solver(f"{cls.name}_cli")(cls)
    path = tmp_path / "p.npz"
    save_problem(path, _problem())
    return path


@pytest.mark.parametrize("name, message", [
    ("liar_cli", "Solver 'liar' claimed the optimal objective"),
    ("boom_cli", "Solver 'boom' failed on block 'b1': ValueError: boom"),
    ("returns_cli", "Solver 'returns' returned None"),
])
def test_cli_solve_with_a_failing_plugin_is_one_line_exit_1(cli_problem, capsys, name, message):
    code, out, err = _cli(["solve", str(cli_problem), "--solver", name], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err, err


def test_cli_solve_json_records_the_time_limit_and_overshoot(cli_problem, capsys):
    code, out, _ = _cli(["solve", str(cli_problem), "--solver", "magnitude", "--time-limit", "30", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["time_limit"] == 30.0 and res["overshoot"] >= 0.0
    res = json.loads(_cli(["solve", str(cli_problem), "--solver", "magnitude", "--json"], capsys)[1])
    assert res["time_limit"] is None and res["overshoot"] is None


# ------------------------------------------------------------------------------------------- item 16
def _overruns(caught):
    return [w for w in caught if issubclass(w.category, TimeLimitExceededWarning)]


def test_a_sleeping_plugin_warns_once_and_its_overshoot_is_recorded():
    forget_overshoot_warnings()
    p = _problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = solve_block(p, _Sleeper(), SolveOptions(time_limit=LIMIT))
        assert r.time_limit == LIMIT and r.overshoot >= NAP - LIMIT
        assert r.summary()["overshoot"] == r.overshoot
        # the pruning driver, two blocks: over the limit again, but the warning was given
        model, names, data = _tiny_model()
        report = prune(model, names, data, PruneConfig(sparsity=0.5, method=_Sleeper(), fisher_samples=20,
                                                         block_mode="layer", time_limit=LIMIT))
    assert all(r.overshoot >= NAP - LIMIT for r in report.results) and len(report.results) == 2
    assert all(b.overshoot >= NAP - LIMIT for b in report.blocks)  # and in the blocks' records
    (only,) = _overruns(caught)
    assert "Solver 'sleeper' ran" in str(only.message) and "time limit of 0.05 s (grace 1 s)" in str(only.message)
    forget_overshoot_warnings("sleeper")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = solve_block(p, "magnitude", SolveOptions(time_limit=30))
        assert r.overshoot is not None and solve_block(p, "magnitude").overshoot is None
    assert not _overruns(caught)


def test_check_solver_fails_a_plugin_that_ignores_time_limits():
    forget_overshoot_warnings()
    report = check_solver(_Sleeper(), n=6, seeds=(0,), raise_on_failure=False)
    assert [f for f in report.failures if "ignores the time limit" in f] == report.failures
    assert len(report.failures) == 1 and "(grace 1 s)" in report.failures[0]
    assert not overshoot_warned("sleeper")  # the checker's probes leave the run's one warning alone


def test_check_solver_refutes_a_lying_exact_plugin():
    report = check_solver(_Liar(), n=6, seeds=(0,), raise_on_failure=False)
    assert report.failures and all("SolverAnswerError" in f or "optimum" in f for f in report.failures)


# ------------------------------------------------------------------------------------------- item 17
def test_a_broken_entry_point_warns_once_per_process(monkeypatch):
    broken = EntryPoint(name="broken_plugin", value="no_such_module_for_cbs:Nope", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    monkeypatch.setattr(registry, "_warned_plugins", set())
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = registry.solver_names()
        for _ in range(3):
            registry.refresh()
        registry.solver_names()
    warned = [w for w in caught if issubclass(w.category, registry.PluginLoadWarning)]
    assert len(warned) == 1
    assert "'broken_plugin'" in str(warned[0].message) and "ModuleNotFoundError" in str(warned[0].message)
    assert "broken_plugin" not in names and "magnitude" in names
