"""scripts/tost_study.py: the table and plot are rebuilt from run records, also when the grid is incomplete."""

import importlib.util
import json
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("tost_study", Path(__file__).parents[1] / "scripts" / "tost_study.py")
tost_study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tost_study)


def _record(mask, sparsity, config, seed, accs):
    return {"model": "mlpnet", "mask": mask, "sparsity": sparsity, "config_name": config, "seed": seed,
            "finished": True, "final_accuracy": accs[-1], "ghost_phase_epochs": 1, "config": {"epochs": len(accs)},
            "history": [{"epoch": e + 1, "test_accuracy": a} for e, a in enumerate(accs)]}


def test_report_with_missing_cells(tmp_path):
    runs = [_record("random", 0.9, "plain", 0, [50.0, 60.0]), _record("random", 0.9, "plain", 1, [52.0, 62.0]),
            _record("random", 0.9, "tost", 0, [51.0, 61.0]),
            # the last config (label_smoothing) ran in the cbs cell only: the random cell must still plot
            _record("cbs", 0.9, "plain", 0, [80.0, 90.0]), _record("cbs", 0.9, "label_smoothing", 0, [81.0, 91.0])]
    for r in runs:
        d = tmp_path / "runs" / f"{r['mask']}_{r['config_name']}_{r['seed']}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(r))
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir()
    (unfinished / "record.json").write_text(json.dumps({**runs[0], "finished": False, "final_accuracy": 0.0}))
    paths = tost_study.write_report(tmp_path, "mlpnet")
    table = (tmp_path / "table.md").read_text()
    assert "| mask | sparsity | plain | tost | label_smoothing | ToST − plain |" in table
    assert "| random | 0.9 | 61.00 ± 1.41 | 61.00 | – | +0.00 |" in table
    assert "| cbs | 0.9 | 90.00 | – | 91.00 | – |" in table
    assert "5 finished runs" in table
    assert (tmp_path / "accuracy_per_epoch.png").stat().st_size > 1000 and len(paths) == 3
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 5
