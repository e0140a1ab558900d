"""Executors (engine.executor, engine.ray_executor): the same answers wherever blocks run, a killed Ray worker
changes nothing, each shared array travels once, and bad executor settings are one clear error.

The Ray tests start their own local cluster on 127.0.0.1 with 2 CPUs (module fixture) and shut it down;
they are marked ``ray`` (and run by default, in CI too). They use the demo MLP trained on the bundled digits,
so they need no shared data.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data import load_digits
from engine.demo import train_small_mlp
from engine.errors import InvalidOptionError
from engine.executor import LocalExecutor, ProcessExecutor, make_executor, slowest_note
from engine.layerwise import prune_layerwise
from engine.options import SolveOptions
from engine.pruner import PruneConfig, prune
from engine.solvers.registry import get_solver
from formulations.problem import BlockProblem

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cbs-prune[ray]')")

#: bnb proves every row of fc3 (10 rows of 32 weights) at this sparsity; max_nodes keeps it off the clock
ROWS = dict(sparsity=0.6, method="bnb", solver_params={"max_nodes": 100}, certify_time=0)


@pytest.fixture(scope="module")
def trained():
    model, _ = train_small_mlp(epochs=60, seed=0)
    x, y = load_digits("train")
    return model, x, y


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    from engine.ray_executor import start_local

    start_local(num_cpus=2, object_store_memory=256 * 2**20)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


def _layerwise(model, x, executor, **kw):
    m = copy.deepcopy(model)
    masks, records = prune_layerwise(m, ["fc3.weight"], [x[:256]], executor=executor, **{**ROWS, **kw})
    return m, masks, records


def _same_run(a, b):
    (ma, masks_a, rec_a), (mb, masks_b, rec_b) = a, b
    for k in masks_a:
        assert torch.equal(masks_a[k], masks_b[k])
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k
    for ra, rb in zip(rec_a, rec_b):
        assert (ra.objective, ra.error, ra.kept, ra.rows_proven) == (rb.objective, rb.error, rb.kept, rb.rows_proven)
        assert ra.bound == pytest.approx(rb.bound, rel=1e-9)


@pytest.mark.ray
def test_layerwise_rows_give_the_same_result_on_every_executor(trained, ray_cluster):
    model, x, _ = trained
    local = _layerwise(model, x, "local")
    assert local[2][0].rows_proven == 1.0  # the oracle: bnb proved every row
    _same_run(local, _layerwise(model, x, "processes", workers=2))
    _same_run(local, _layerwise(model, x, "ray"))


@pytest.mark.ray
@pytest.mark.parametrize("method, names, block_mode, stages", [
    ("swap", ["fc2.weight", "fc3.weight"], "row", 2),
    ("cbs", ["fc3.weight"], "layer", 1),  # its mask choice calls the model's loss: the model travels too
    ("magnitude", ["fc2.weight", "fc3.weight"], "whole", 2),  # the update of its support is the check's, remotely
])
def test_fisher_blocks_give_the_same_result_on_every_executor(trained, ray_cluster, method, names, block_mode,
                                                               stages):
    model, x, y = trained
    runs = []
    for executor in ("local", "processes", "ray"):
        m = copy.deepcopy(model)
        config = PruneConfig(sparsity=0.7, method=method, fisher_samples=128, block_mode=block_mode, stages=stages,
                             executor=executor, workers=2 if executor == "processes" else 1, seed=3, update=True,
                             certify_time=0)
        runs.append((m, prune(m, names, (x, y), config)))
    (m0, r0) = runs[0]
    for m, r in runs[1:]:
        for n in names:
            assert torch.equal(r.masks[n], r0.masks[n])
        for k, v in m.state_dict().items():
            assert torch.equal(v, m0.state_dict()[k]), k
        # objectives: to the last bits of the BLAS thread count (Ray's workers run one thread, this process more)
        assert [b.objective for b in r.blocks] == pytest.approx([b.objective for b in r0.blocks], rel=1e-12)
        assert [s.objective_total for s in r.stages] == pytest.approx([s.objective_total for s in r0.stages],
                                                                      rel=1e-12)


def _chunk_workers() -> list[int]:
    """Ray worker processes running a chunk of blocks now (their title is the task's name)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::_run_chunk"):
            pids.append(int(pid))
    return pids


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's workers through /proc")
def test_a_killed_ray_worker_is_retried_and_the_result_is_identical(trained, ray_cluster):
    model, x, _ = trained
    undisturbed = _layerwise(model, x, "ray")
    box: dict = {}

    def run():
        try:
            box["run"] = _layerwise(model, x, "ray")
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while thread.is_alive() and killed is None and time.monotonic() < deadline:
        pids = _chunk_workers()
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    thread.join()
    assert killed is not None, "no worker was seen running a task: nothing was tested"
    assert "error" not in box, box.get("error")
    _same_run(undisturbed, box["run"])


@pytest.mark.ray
def test_a_shared_factor_travels_once(ray_cluster):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 60))  # 192 kB: above the sharing threshold
    template = BlockProblem(rng.standard_normal(60), 30, 0.5, factor=X)
    rows = [template.with_weights(rng.standard_normal(60), f"r{i}") for i in range(24)]
    pool = make_executor("ray")
    results = pool.solve(get_solver("greedy"), rows, [SolveOptions(certify_time=0)] * len(rows), show=False)
    local = LocalExecutor().solve(get_solver("greedy"), rows, [SolveOptions(certify_time=0)] * len(rows), show=False)
    assert [r.support.tolist() for r in results] == [r.support.tolist() for r in local]
    last = pool.last
    assert last["arrays_shared"] == 1 and last["bytes_shared"] == X.nbytes
    assert last["tasks"] > 1 and last["payload_bytes"] / last["tasks"] < X.nbytes / 4


@pytest.mark.ray
def test_an_error_inside_a_ray_task_comes_back_as_itself(ray_cluster):
    from engine.errors import SolverError

    problem = BlockProblem(np.ones(6), 3, 0.1, factor=np.eye(6), label="b")
    with pytest.raises(SolverError, match="support of size"):
        make_executor("ray").solve(_WrongSize(), [problem, problem], [SolveOptions()] * 2, show=False)


class _WrongSize:
    """A plug-in that keeps one weight too many (module level: a Ray task must pickle it)."""

    name = "wrongsize"

    @property
    def capabilities(self):
        from engine.solvers.base import Capabilities

        return Capabilities()

    def solve(self, problem, options):
        from engine.result import SolveResult, Status, Termination

        support = np.zeros(problem.n, dtype=bool)
        support[: problem.n_keep + 1] = True
        return SolveResult(support=support, objective=float("nan"), bound=None, gap=None, status=Status.FEASIBLE,
                           termination=Termination.COMPLETED, solver=self.name)


@pytest.mark.ray
def test_cbs_solve_folder_on_each_executor(tmp_path, ray_cluster, capsys):
    from engine.problem_io import save_problem

    rng = np.random.default_rng(1)
    for i in range(5):
        save_problem(tmp_path / f"b{i}.npz", BlockProblem(rng.standard_normal(16), 8, 0.1,
                                                          factor=rng.standard_normal((30, 16)), label=f"b{i}"))
    outputs = []
    for flags in (["--executor", "local"], ["--executor", "processes", "--workers", "2"], ["--executor", "ray"]):
        assert main(["solve", str(tmp_path), "--solver", "bnb", "--json", *flags]) == 0
        import json

        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        outputs.append([(r["problem"], r["support"], r["objective"], r["status"]) for r in rows])
    assert len(outputs[0]) == 5 and all(r[3] == "optimal" for r in outputs[0])
    assert outputs[0] == outputs[1] == outputs[2]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.ray
def test_an_unreachable_ray_address_is_one_clear_error_before_any_work(tmp_path, ray_cluster, capsys):
    with pytest.raises(InvalidOptionError, match="'ray_address' argument of prune_layerwise\\(\\) must be a reachable"):
        prune_layerwise(torch.nn.Linear(4, 2), ["weight"], [torch.zeros(1, 4)], sparsity=0.5, method="greedy",
                        executor="ray", ray_address="127.0.0.1:1")
    code = main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--executor", "ray", "--ray-address",
                 "127.0.0.1:1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "'--ray-address' argument of cbs prune must be a reachable Ray cluster" in err
    assert "127.0.0.1:1" in err and not (tmp_path / "o").exists()


def test_ray_not_installed_names_the_extra(monkeypatch):
    from engine import ray_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
    with pytest.raises(InvalidOptionError, match=r"pip install 'cbs-prune\[ray\]'"):
        ray_executor.connect(None, "cbs prune")


@pytest.mark.parametrize("kwargs, match", [
    (dict(executor="threads"), "'executor' argument of t\\(\\) must be None or one of local, processes, ray"),
    (dict(executor="local", ray_address="127.0.0.1:6379"), "'ray_address' argument of t\\(\\) must be None unless"),
    (dict(workers=0), "'workers' argument of t\\(\\) must be an integer >= 1"),
    (dict(executor="ray", ray_address=""), "'ray_address' argument of t\\(\\)"),
])
def test_bad_executor_settings_are_refused(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        make_executor(kwargs.pop("executor", None), where="t()", **kwargs)


def test_a_ray_address_without_ray_is_refused_naming_the_flags(tmp_path, capsys):
    code = main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--ray-address", "127.0.0.1:6379",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "'--ray-address' argument of cbs prune must be given only with --executor ray" in capsys.readouterr().err


def test_the_default_executor_follows_workers():
    assert isinstance(make_executor(None, 1), LocalExecutor)
    assert isinstance(make_executor(None, 3), ProcessExecutor) and make_executor(None, 3).workers == 3


def test_slowest_note_names_the_oldest_running_task():
    assert slowest_note({}) == ""
    assert slowest_note({1: ("fc1[3]", 10.0), 2: ("fc2[0]", 4.0)}, now=16.0) == "slowest: fc2[0] 12 s"
