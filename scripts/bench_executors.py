"""The same runs on each executor (local, processes, ray): wall time, per-task overhead, peak memory, and
whether the results are identical. Writes ``results.json`` and ``table.md`` into ``--out``.

    python scripts/bench_executors.py [--runs rows multistage overhead] [--executors local processes ray]
        [--workers 2] [--out results/bench_executors]

Runs (each one ``cbs prune`` in a subprocess, so that its memory is measured alone and Ray starts fresh):

* ``rows``: ResNet20 layer-wise rows (``--objective reconstruction``) of ``conv1`` and the six convolutions of
  ``layer1`` (112 rows of 27 or 144 weights) with ``bnb`` capped at ``--max-nodes`` nodes per row (a cap in
  nodes, not seconds, so the answer does not depend on the machine's speed), sparsity 0.5;
* ``multistage``: MLPNet, the recommendation at sparsity 0.9 (40 stages of 3 layer blocks, BatchNorm-free);
* ``overhead``: ``--tiny`` tiny blocks (n = 16) with ``greedy``: each executor's time for them beyond their own
  work (measured in this process) shared by its slots, per block; for Ray also with one block per task;
* ``row_cost``: seconds per row at a 7B model's width (for the projection in docs/scaling.md).

Peak memory is the largest sum, over the run's whole process tree (the driver, its forked workers, Ray's GCS,
raylet and workers), of resident memory sampled every 0.2 s (shared pages, Ray's object store among them, count
once per process that maps them). Identity: mask.pt and model.pt equal tensor for tensor (``torch.equal``) and
the records' objectives equal. Needs ../shared/data (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.records import environment, write_json_atomic  # noqa: E402

ROW_PARAMS = "conv1.weight,layer1.*.conv*.weight"


def _tree_rss(root: int) -> float:
    """MiB resident in ``root`` and all its descendants now."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total / 2**20


def _run(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak MiB of the process tree, stdout) of ``command``."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, peak[0], out


def _flags(executor: str, workers: int) -> list[str]:
    return ["--executor", executor] + (["--workers", str(workers)] if executor == "processes" else [])


def _same_folder(a: Path, b: Path) -> bool:
    for name in ("mask.pt", "model.pt"):
        x, y = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
            return False
    ra, rb = (json.loads((f / "record.json").read_text()) for f in (a, b))
    return [blk["objective"] for blk in ra["blocks"]] == [blk["objective"] for blk in rb["blocks"]]


def bench_prune(kind: str, executors: list[str], workers: int, out: Path, data_dir: str | None,
                max_nodes: int, env: dict[str, str]) -> list[dict]:
    if kind == "rows":
        base = ["--model", "resnet20", "--sparsity", "0.5", "--objective", "reconstruction", "--method", "bnb",
                "--param", f"max_nodes={max_nodes}", "--params", ROW_PARAMS, "--certify-time", "0"]
    else:
        base = ["--model", "mlpnet", "--sparsity", "0.9"]
    if data_dir:
        base += ["--data-dir", data_dir]
    rows = []
    for executor in executors:
        folder = out / f"{kind}_{executor}"
        cmd = [sys.executable, "-m", "engine.cli", "prune", *base, *_flags(executor, workers), "--threads", "1",
               "--no-progress", "--out", str(folder), "--overwrite"]
        wall, peak, _ = _run(cmd, env)
        record = json.loads((folder / "record.json").read_text())
        blocks = record["blocks"]
        row = {"run": kind, "executor": executor, "wall_seconds": wall, "prune_seconds": record["prune_seconds"],
               "peak_tree_mib": peak, "blocks": len(blocks), "accuracy": record.get("accuracy"),
               "command": " ".join(cmd[2:])}
        if kind == "rows":
            row["rows_proven"] = [b["extra"]["rows_proven"] for b in blocks]
        row["identical_to_local"] = _same_folder(out / f"{kind}_{executors[0]}", folder)
        rows.append(row)
        print(f"{kind} {executor}: {wall:.1f} s, peak {peak:.0f} MiB, identical {row['identical_to_local']}",
              file=sys.stderr)
    return rows


_OVERHEAD = """
import json, sys, time
import numpy as np
from engine import ray_executor
from engine.executor import LocalExecutor, make_executor
from engine.options import SolveOptions
from engine.solvers.registry import get_solver
from formulations.problem import BlockProblem

executor, workers, count, per_task = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
rng = np.random.default_rng(0)
problems = [BlockProblem(rng.standard_normal(16), 8, 0.1, factor=rng.standard_normal((24, 16)), label=f"b{i}")
            for i in range(count)]
options = [SolveOptions(certify_time=0)] * count
solver = get_solver("greedy")
t = time.perf_counter()
LocalExecutor().solve(solver, problems, options, show=False)
work = time.perf_counter() - t  # the blocks' own work (solve, check, certificate) in this process
t0 = time.perf_counter()
pool = make_executor(executor, workers)
t1 = time.perf_counter()
if per_task:
    ray_executor.TASKS_PER_SLOT = 10**9  # one block per task: the cost of a task itself
calls = []
for _ in range(2):  # the first call also starts the workers (they import torch and engine)
    t = time.perf_counter()
    pool.solve(solver, problems, options, show=False)
    calls.append(time.perf_counter() - t)
print(json.dumps({"work": work, "connect": t1 - t0, "calls": calls, "last": getattr(pool, "last", None)}))
"""


def bench_overhead(executors: list[str], workers: int, count: int, env: dict[str, str]) -> list[dict]:
    """``count`` tiny blocks (n = 16, greedy): each executor's time beyond the blocks' own work shared by its
    slots, per block; for Ray also with one block per task (the cost of a task)."""
    rows = []
    cases = [(e, False) for e in executors] + ([("ray", True)] if "ray" in executors else [])
    for executor, per_task in cases:
        w = workers if executor == "processes" else 1
        wall, peak, stdout = _run([sys.executable, "-c", _OVERHEAD, executor, str(w), str(count),
                                   "1" if per_task else "0"], env)
        got = json.loads(stdout.strip().splitlines()[-1])
        slots = 1 if executor == "local" else workers
        first, steady = got["calls"]
        per_block = (steady - got["work"] / slots) / count
        label = executor + (" (1 block per task)" if per_task else "")
        rows.append({"run": "overhead", "executor": label, "wall_seconds": wall, "connect_seconds": got["connect"],
                     "first_call_seconds": first, "call_seconds": steady, "work_seconds": got["work"],
                     "blocks": count, "overhead_ms_per_block": 1e3 * per_block, "peak_tree_mib": peak,
                     "ray_last_call": got["last"]})
        print(f"overhead {label}: {1e3 * per_block:.2f} ms per block", file=sys.stderr)
    return rows


def bench_row_cost(d_in: int, methods: list[str], rows: int, seed: int = 0) -> list[dict]:
    """Seconds per row at a 7B model's width, for the projection: a layer's H from ``8·d_in`` heavy-tailed
    synthetic activations (no 7B model is available here), its factor (the driver's work per layer), and each
    method on ``rows`` rows (k = d_in/2, the refit and the certificate at budget 0 included), one thread."""
    import time as _t

    from engine.executor import LocalExecutor
    from engine.layerwise import layer_damping
    from engine.options import SolveOptions
    from engine.solvers.registry import get_solver
    from formulations.problem import BlockProblem, eigen_factor

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    A = rng.standard_t(3, size=(8 * d_in, d_in)) * rng.lognormal(0, 1, size=d_in)  # outlier channels
    t0 = _t.perf_counter()
    H = A.T @ A / A.shape[0]
    t1 = _t.perf_counter()
    X = eigen_factor(H)
    t2 = _t.perf_counter()
    W = rng.standard_normal((rows, d_in)) * 0.02
    template = BlockProblem(W[0], d_in // 2, layer_damping(H), factor=X)
    problems = [template.with_weights(W[i], f"row{i}") for i in range(rows)]
    out = [{"run": "row_cost", "d_in": d_in, "what": "layer: H from activations", "seconds": t1 - t0},
           {"run": "row_cost", "d_in": d_in, "what": "layer: factor X (eigh)", "seconds": t2 - t1,
            "bytes": X.nbytes}]
    for method in methods:
        start = _t.perf_counter()
        LocalExecutor().solve(get_solver(method), problems, [SolveOptions(certify_time=0)] * rows, show=False)
        per_row = (_t.perf_counter() - start) / rows
        out.append({"run": "row_cost", "d_in": d_in, "what": f"row: {method}", "seconds": per_row})
        print(f"row cost d_in={d_in} {method}: {per_row:.3f} s per row", file=sys.stderr)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| run | executor | wall s | prune s | peak MiB (process tree) | identical to local | notes |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r["run"] == "row_cost":
            size = f"{r['bytes'] / 1e6:.0f} MB" if "bytes" in r else ""
            lines.append(f"| row cost, d_in = {r['d_in']} | {r['what']} | {r['seconds']:.3f} | – | – | – | {size} |")
            continue
        if r["run"] == "overhead":
            note = (f"{r['blocks']} blocks, their work {r['work_seconds']:.2f} s here; connect "
                    f"{r['connect_seconds']:.2f} s, first call {r['first_call_seconds']:.2f} s, second "
                    f"{r['call_seconds']:.2f} s: **{r['overhead_ms_per_block']:.2f} ms per block** beyond the work")
            lines.append(f"| overhead | {r['executor']} | {r['wall_seconds']:.1f} | – | {r['peak_tree_mib']:.0f} | – | "
                         f"{note} |")
            continue
        note = f"{r['blocks']} layers" if r["run"] == "rows" else f"accuracy {r['accuracy']:.2f}"
        if "rows_proven" in r:
            note += ", rows proven " + "/".join(f"{p:.2f}" for p in r["rows_proven"])
        lines.append(f"| {r['run']} | {r['executor']} | {r['wall_seconds']:.1f} | {r['prune_seconds']:.1f} | "
                     f"{r['peak_tree_mib']:.0f} | {'yes' if r['identical_to_local'] else 'NO'} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["rows", "multistage", "overhead"],
                        choices=["rows", "multistage", "overhead", "row_cost"])
    parser.add_argument("--row-cost", nargs=3, default=["4096", "8", "magnitude,wanda,greedy,admm"],
                        metavar=("D_IN", "ROWS", "METHODS"), help="the row_cost run: width, rows, methods")
    parser.add_argument("--executors", nargs="+", default=["local", "processes", "ray"],
                        choices=["local", "processes", "ray"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-nodes", type=int, default=200)
    parser.add_argument("--tiny", type=int, default=2000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_executors")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CBS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    rows: list[dict] = []
    for run in args.runs:
        if run == "overhead":
            rows += bench_overhead(args.executors, args.workers, args.tiny, env)
        elif run == "row_cost":
            d_in, count, methods = args.row_cost
            rows += bench_row_cost(int(d_in), methods.split(","), int(count))
        else:
            rows += bench_prune(run, args.executors, args.workers, args.out, args.data_dir, args.max_nodes, env)
    write_json_atomic(args.out / "results.json", {"rows": rows, "workers": args.workers, "environment": environment()})
    (args.out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
