"""The engine's checks of every solver answer (DESIGN.md §3) and the registry."""

import numpy as np
import pytest

import formulations.objective as objective
from engine.errors import InvalidOptionError, SolverError, SolverUnavailableError
from engine.options import SolveOptions
from engine.result import SolveResult, Status, Termination
from engine.solve import SolverAnswerError, solve_block
from engine.solvers import Capabilities, SubsetSolver, get_solver, register_solver, solver_names
from engine.update import batched_update
from formulations.objective import UpdateMemo, support_objective
from formulations.problem import BlockProblem


def _problem(seed=0, n=8, k=4):
    rng = np.random.default_rng(seed)
    return BlockProblem(rng.normal(size=n), k, 0.1, factor=rng.normal(size=(2 * n, n)))


class _Fixed(SubsetSolver):
    """Returns the first k weights with whatever claims it is told to make."""

    name = "fixed"

    def __init__(self, exact=False, **claims):
        self.capabilities = Capabilities(exact=exact)
        self.claims = claims

    def solve(self, problem, options, warm_start=None):
        s = np.zeros(problem.n, dtype=bool)
        s[: problem.n_keep] = True
        return SolveResult(support=s, **self.claims)


def test_result_is_rescored_and_certified():
    p = _problem()
    r = solve_block(p, _Fixed())
    assert r.objective == pytest.approx(support_objective(p, r.support), rel=1e-12)
    assert r.bound is not None and r.bound <= r.objective and 0 <= r.gap
    assert r.solver == "fixed" and r.weights is not None and np.all(r.weights[~r.support] == 0)


def test_wrong_objective_is_a_solver_error():
    p = _problem()
    with pytest.raises(SolverError, match="re-score"):
        solve_block(p, _Fixed(objective=123.0))


def test_bound_above_objective_is_a_solver_error():
    with pytest.raises(SolverError, match="bound .* above the objective"):
        solve_block(_problem(), _Fixed(bound=1e9))


def test_only_exact_solvers_may_claim_optimal():
    with pytest.raises(SolverError, match="not exact"):
        solve_block(_problem(), _Fixed(status=Status.OPTIMAL))
    exact = _Fixed(exact=True, status=Status.OPTIMAL, termination=Termination.OPTIMAL)
    # diagonal H and |w| decreasing: the first k weights are the optimum, so the claim stands
    r = solve_block(BlockProblem(np.arange(8.0, 0.0, -1.0), 4, 0.1, factor=np.eye(8)), exact)
    assert r.status == Status.OPTIMAL
    with pytest.raises(SolverAnswerError, match="claimed the optimal objective"):  # and a false one is refuted
        solve_block(_problem(), exact)


def test_wrong_support_size_is_a_solver_error():
    class Bad(_Fixed):
        def solve(self, problem, options, warm_start=None):
            return SolveResult(support=np.ones(problem.n, dtype=bool))

    with pytest.raises(SolverError, match="support of size 8"):
        solve_block(_problem(), Bad())


def test_register_solver_and_lookup():
    @register_solver("test_first_k")
    class FirstK(_Fixed):
        name = "test_first_k"

    assert "test_first_k" in solver_names()
    assert isinstance(get_solver("test_first_k"), FirstK)
    r = solve_block(_problem(), "test_first_k")
    assert r.kept.tolist() == [0, 1, 2, 3]


def test_registry_rejections():
    with pytest.raises(InvalidOptionError, match="'method' argument must be one of .*magnitude.*Got 'nope'"):
        get_solver("nope")
    with pytest.raises(InvalidOptionError, match="'name' argument of register_solver"):
        register_solver("not a name")
    with pytest.raises(InvalidOptionError, match="'method'"):
        get_solver(42)


def test_missing_optional_module_names_the_extra():
    class NeedsSomething(_Fixed):
        name = "needs"
        capabilities = Capabilities(requires=("surely_not_installed_module_xyz",), extra="xyz")

        def __init__(self):
            self.claims = {}

    with pytest.raises(SolverUnavailableError, match=r"pip install 'cbs-prune\[xyz\]'"):
        solve_block(_problem(), NeedsSomething())


def test_solve_block_rejects_oversized_block_and_bad_options():
    with pytest.raises(InvalidOptionError, match="at most 24 weights"):
        solve_block(_problem(n=30, k=3), "brute_force")
    with pytest.raises(InvalidOptionError, match="'time_limit'"):
        SolveOptions(time_limit=-1)
    with pytest.raises(InvalidOptionError, match="'seed'"):
        SolveOptions(seed=-2)
    with pytest.raises(InvalidOptionError, match="'memo'"):
        SolveOptions(memo={})
    with pytest.raises(InvalidOptionError, match="'problem'"):
        solve_block("not a problem")


@pytest.mark.parametrize("solver", ["brute_force", "iht"])
def test_the_final_support_is_solved_once_and_the_caller_may_keep_the_memo(monkeypatch, solver):
    solved = []
    real = objective._solve_support
    monkeypatch.setattr(objective, "_solve_support", lambda p, S: solved.append(S.copy()) or real(p, S))
    p = _problem(seed=4, n=10, k=4)
    r = solve_block(p, solver)  # solve_block's own fresh memo: the re-score reuses the solver's solve
    assert sum(np.array_equal(S, r.support) for S in solved) == 1
    memo = UpdateMemo()
    solved.clear()
    r = solve_block(p, solver, SolveOptions(memo=memo))  # a memo the caller keeps: the update reuses it too
    (u,) = batched_update([p], [r.support], [memo])
    assert sum(np.array_equal(S, r.support) for S in solved) == 1
    assert u.objective == r.objective and np.array_equal(u.weights, r.weights)
