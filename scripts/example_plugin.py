"""An example solver plug-in: Optimal Brain Damage (LeCun et al. 1990) scores, s_i = ½ w_i² H_ii.

It shows the three ways to plug a solver into cbs:

1. pass an instance:        prune(model, names, (x, y), PruneConfig(sparsity=0.9, method=OBDSolver()))
2. register it by name:     importing this module runs @register_solver("obd"); then method="obd"
3. an entry point:          in your package's pyproject.toml
                                [project.entry-points."cbs.solvers"]
                                obd = "your_package.module:OBDSolver"

Run it to check it against the conformance suite and prune the demo MLP with it:

    python scripts/example_plugin.py
"""

from __future__ import annotations

import sys
import time

import numpy as np

from engine.options import SolveOptions
from engine.result import SolveResult, Status, Termination
from engine.solvers import Capabilities, SubsetSolver, register_solver, top_k_support
from formulations.problem import BlockProblem


@register_solver("obd")
class OBDSolver(SubsetSolver):
    """Keep the k largest OBD saliencies ½ w_i² H_ii, H_ii = F_ii + λ (diagonal curvature only)."""

    name = "obd"
    capabilities = Capabilities(description="Optimal Brain Damage: keep the k largest ½ w_i² H_ii (example plug-in).")

    def solve(self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None) -> SolveResult:
        start = time.perf_counter()
        saliency = 0.5 * problem.weights**2 * (problem.fisher_diagonal() + problem.damping)
        support = top_k_support(saliency, problem.n_keep)
        return SolveResult(support=support, status=Status.FEASIBLE, termination=Termination.COMPLETED,
                           wall_time=time.perf_counter() - start, solver=self.name)


def main(argv: list[str] | None = None) -> int:
    from engine.data import load_digits
    from engine.demo import train_small_mlp
    from engine.evaluate import evaluate
    from engine.models import prunable_parameters
    from engine.pruner import PruneConfig, prune
    from engine.testing import check_solver

    print(check_solver("obd"))
    model, _ = train_small_mlp(epochs=100)
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    names = [n for n, _ in prunable_parameters(model)]
    prune(model, names, (x, y), PruneConfig(sparsity=0.7, method="obd", fisher_samples=500, progress=False))
    print(f"digits MLP pruned to 70 % with 'obd' + CBS-U update: {evaluate(model, xt, yt)[0]:.2f} % test accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
