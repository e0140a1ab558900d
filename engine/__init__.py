"""cbs: combinatorial OBS pruning (the Combinatorial Brain Surgeon) backed by optimization solvers."""
