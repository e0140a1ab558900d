"""scripts/reproduce.py: its tables against hand-made records, and one real resumable run."""

import importlib.util
import json
from pathlib import Path

import pytest

from engine.published import PUBLISHED

_SPEC = importlib.util.spec_from_file_location("reproduce", Path(__file__).parents[1] / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reproduce)


def _row(label, s, seed, acc, seconds=1.0):
    return {"label": label, "sparsity": s, "seed": seed, "accuracy": acc, "run_seconds": seconds,
            "peak_memory_mb": 100.0}


def test_tables_give_mean_and_std_over_seeds_and_the_published_rows():
    rows = [_row("cbs", 0.9, 0, 93.0), _row("cbs", 0.9, 1, 94.0), _row("cbs", 0.9, 2, 95.0),
            _row("magnitude", 0.9, 0, 90.28, 2.0)]
    table = reproduce.accuracy_table(rows, "mlpnet", [0.9, 0.95])
    assert "| cbs (ours) | 94.00 ± 1.00 | – |" in table
    assert "| magnitude (ours) | 90.28 | – |" in table
    assert "| CHITA++ multi-stage | 95.55 | 94.70 |" in table
    timing = reproduce.timing_table(rows, [0.9])
    assert "| magnitude | 2 s | 100 |" in timing


def test_configs_are_valid_prune_configs():
    from engine.pruner import PruneConfig

    for model, configs in reproduce.CONFIGS.items():
        for label in configs:
            for s in reproduce.SPARSITIES[model]:
                assert isinstance(reproduce.run_config(model, label, s, 0, {}), PruneConfig)
    assert set(reproduce.SPARSITIES) == set(PUBLISHED)


def test_single_stage_label_runs_only_when_named_and_records_its_steps(shared_data, tmp_path):
    """The extra label is a one-stage run with the coupled step and compensation, kept out of the default
    sweep; a real MLPNet run at 0.9 records its step and stays well above magnitude pruning (90.30)."""
    assert "single-stage" in reproduce.EXTRA["resnet20"] and "single-stage" in reproduce.EXTRA["mlpnet"]
    config = reproduce.run_config("resnet20", "single-stage", 0.8, 0, {})
    assert config.stages == 1 and config.couple_mean and config.compensate == "rest" and not config.step_search_bn
    argv = ["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "single-stage", "--sparsities", "0.9",
            "--seeds", "0", "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "mlpnet" / "records.jsonl").read_text().splitlines()]
    assert len(rec["stage_steps"]) == 1 and 0.0 <= rec["stage_steps"][0] <= 1.0
    assert rec["accuracy"] > 92.0


def test_single_stage_lc_label_is_resnet20_only_and_kept_out_of_the_default_sweep(capsys):
    """The paper's single-sample rows, twice as many, λ = 1e-7 and the loss-curve budget, in one stage;
    MLPNet has no such label, and naming it there is an error that lists the labels."""
    assert "single-stage-lc" in reproduce.EXTRA["resnet20"]
    config = reproduce.run_config("resnet20", "single-stage-lc", 0.7, 2, {})
    assert (config.stages, config.method, config.update, config.fisher_samples, config.fisher_batch) == (
        1, "magnitude", True, 2000, 1)
    assert (config.damping, config.allocation, config.block_mode, config.first_order, config.seed) == (
        1e-7, "loss_curve", "layer", False, 2)
    assert "single-stage-lc" not in reproduce.CONFIGS["mlpnet"]
    with pytest.raises(SystemExit):
        reproduce.main(["--model", "mlpnet", "--configs", "single-stage-lc"])
    assert "unknown label(s) ['single-stage-lc']" in capsys.readouterr().err


def test_one_real_run_and_resume(shared_data, tmp_path, capsys):
    argv = ["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "magnitude", "--sparsities", "0.9",
            "--seeds", "0", "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    lines = (tmp_path / "mlpnet" / "records.jsonl").read_text().splitlines()
    (rec,) = [json.loads(line) for line in lines]
    # global magnitude without update reproduces the CBS paper's MP column (90.30) to 0.05
    assert rec["accuracy"] == pytest.approx(PUBLISHED["mlpnet"]["MP (CBS paper)"][0.9], abs=0.05)
    assert (tmp_path / "mlpnet" / "accuracy.png").stat().st_size > 0
    capsys.readouterr()
    assert reproduce.main(argv) == 0  # resumed: nothing is run again
    assert "acc=" not in capsys.readouterr().out
    assert len((tmp_path / "mlpnet" / "records.jsonl").read_text().splitlines()) == 1
    (tmp_path / "mlpnet" / "table.md").unlink()
    assert reproduce.main(argv[:-6] + ["--out", str(tmp_path), "--report"]) == 0  # only the tables
    assert "| magnitude (ours) |" in (tmp_path / "mlpnet" / "table.md").read_text()
    assert len((tmp_path / "mlpnet" / "records.jsonl").read_text().splitlines()) == 1


def test_rejects_unknown_config(shared_data, tmp_path):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "nope", "--out", str(tmp_path)])
    assert exc.value.code == 2


@pytest.mark.parametrize("item, message", [("nope=1", "KEY one of"), ("damping", "KEY one of"),
                                           ("damping=-1", "'damping'"), ("stages=0", "'stages'"),
                                           ("fisher_bn_batch_stats=True", "'fisher_batch'")])
def test_set_rejects_bad_overrides_before_any_work(tmp_path, capsys, item, message):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--model", "mlpnet", "--data-dir", str(tmp_path / "missing"), "--set", item,
                        "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlpnet").exists()


def test_rejects_bad_bn_samples(shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--model", "resnet20", "--data-dir", str(shared_data), "--bn-samples", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--bn-samples" in capsys.readouterr().err


def test_set_overrides_every_run(shared_data, tmp_path):
    argv = ["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "magnitude", "--sparsities", "0.9",
            "--seeds", "0", "--set", "fisher_samples=64", "--set", "update=True", "--set", "allocation=uniform",
            "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "mlpnet" / "records.jsonl").read_text().splitlines()]
    settings = rec["settings"]
    assert (settings["fisher_samples"], settings["update"], settings["allocation"]) == (64, True, "uniform")
    assert settings["damping"] == reproduce.BASE["mlpnet"]["damping"]  # the rest is the config's own


def test_set_is_checked_against_the_selected_runs_only(shared_data, tmp_path):
    """Batch statistics need mini-batch rows: fine for multi-stage (rows of 32), rejected once a
    single-sample configuration is selected too."""
    common = ["--model", "mlpnet", "--data-dir", str(shared_data), "--set", "fisher_bn_batch_stats=True",
              "--report", "--out", str(tmp_path)]
    assert reproduce.main([*common, "--configs", "multi-stage"]) == 0
    with pytest.raises(SystemExit) as exc:
        reproduce.main([*common, "--configs", "multi-stage", "magnitude"])
    assert exc.value.code == 2


def test_preset_is_used_and_recorded(shared_data, tmp_path):
    argv = ["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "magnitude", "--sparsities", "0.9",
            "--seeds", "0", "--set", "fisher_samples=64", "--preset", "chita", "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "mlpnet" / "records.jsonl").read_text().splitlines()]
    assert "--params chita" in rec["command"] and rec["parameters"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    with pytest.raises(SystemExit) as exc:
        reproduce.main([*argv[:-4], "--preset", "resnet", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_units_keep_cache_sharers_together_and_come_largest_first():
    todo = [(label, s, seed) for seed in (0, 1) for label in ("magnitude", "woodfisher", "woodfisher+update",
                                                              "iht", "multi-stage") for s in (0.5, 0.98)
            if seed == 0 or label == "multi-stage"]
    units = reproduce._units("mlpnet", todo, {})
    assert sorted(run for unit in units for run in unit) == sorted(todo)  # every run exactly once
    (wf,) = [u for u in units if any(label == "woodfisher" for label, _, _ in u)]
    assert {label for label, _, _ in wf} == {"woodfisher", "woodfisher+update"}  # they share diag(H⁻¹)
    assert all(len(u) == 1 for u in units if u[0][0] == "multi-stage")  # no cache: one run per unit
    assert units[0][0][0] == "iht"  # the largest estimate (2 × 43 s) is handed out first
    cost = [sum(reproduce.RUN_SECONDS["mlpnet"][label] * reproduce.run_config("mlpnet", label, s, seed, {}).stages
                for label, s, seed in u) for u in units]
    assert cost == sorted(cost, reverse=True)


def test_parallel_sweep_gives_the_serial_records(shared_data, tmp_path):
    """--jobs 2 (spawned workers, records written by the parent) against the same runs in this process."""
    import subprocess
    import sys

    common = ["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "magnitude", "magnitude+update",
              "--sparsities", "0.95", "0.98", "--seeds", "0", "--set", "fisher_samples=256"]
    script = Path(reproduce.__file__)
    done = subprocess.run([sys.executable, str(script), *common, "--jobs", "2", "--out", str(tmp_path / "par")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(--jobs 2, --threads 1)" in (tmp_path / "par" / "mlpnet" / "timing.md").read_text()
    assert reproduce.main([*common, "--out", str(tmp_path / "ser")]) == 0

    def records(folder):
        rows = [json.loads(line) for line in (tmp_path / folder / "mlpnet" / "records.jsonl").read_text().splitlines()]
        return {reproduce._key(r): r for r in rows}

    par, ser = records("par"), records("ser")
    assert set(par) == set(ser) and len(par) == 4
    for key in par:
        assert par[key]["jobs"] == 2 and ser[key]["jobs"] == 1
        assert par[key]["accuracy"] == pytest.approx(ser[key]["accuracy"], abs=0.02)
        if key[0] == "magnitude":  # plain masking computes no gradients, so it has no objective
            assert par[key]["objective_total"] is None and ser[key]["objective_total"] is None
        else:
            assert par[key]["objective_total"] == pytest.approx(ser[key]["objective_total"], rel=1e-6)


def test_rejects_bad_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--model", "mlpnet", "--data-dir", str(tmp_path), "--jobs", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--jobs" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlpnet", "resnet20"])
def test_the_sweeps_cbs_row_is_what_cbs_prune_method_cbs_runs(model):
    """One setting for the paper's method: the sweep's `cbs` runs and `cbs prune --method cbs` (the
    recommendation for the zoo model's profile with the method named) agree on every setting they both set."""
    from engine.recommend import recommend, zoo_profile

    rec = recommend(zoo_profile(model), 0.7, "cbs")
    rec.pop("bn_augment"), rec.pop("bn_reestimate")
    config = reproduce.run_config(model, "cbs", 0.7, 0, {})
    assert {k: getattr(config, k) for k in rec} == rec


def test_a_sweep_run_is_the_cbs_prune_run_of_its_recorded_command(shared_data, tmp_path):
    """One protocol: the sweep runs `cbs prune`'s code (prepare, execute) and records the command line that
    gives the same run; running that command gives the same accuracy, test loss and objective, bit for bit."""
    from engine.cli import main as cbs_main

    argv = ["--model", "mlpnet", "--data-dir", str(shared_data), "--configs", "woodfisher", "--sparsities", "0.9",
            "--seeds", "0", "--set", "fisher_samples=256", "--out", str(tmp_path / "sweep")]
    assert reproduce.main(argv) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "sweep" / "mlpnet" / "records.jsonl").read_text().splitlines()]
    command = rec["command"].split()
    assert command[:2] == ["cbs", "prune"] and "--no-update" in command and "--fisher-samples" in command
    assert cbs_main([*command[1:], "--data-dir", str(shared_data), "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "record.json").read_text())
    assert (cli["accuracy"], cli["test_loss"], cli["objective_total"]) == (
        rec["accuracy"], rec["test_loss"], rec["objective_total"])
    assert cli["settings"] == rec["settings"]


def test_tables_split_runs_by_batchnorm_protocol():
    """With re-estimation: every run that re-estimates. Without (CHITA's protocol): single-stage runs before
    their final re-estimation, and runs that never re-estimate; never a multi-stage run that re-estimated
    between stages."""
    rows = [{**_row("magnitude", 0.8, 0, 80.0), "bn_reestimate": True, "accuracy_no_bn_reestimate": 50.0,
             "settings": {"stages": 1}},
            {**_row("multi-stage", 0.8, 0, 88.0), "bn_reestimate": True, "accuracy_no_bn_reestimate": 86.0,
             "settings": {"stages": 8}},
            {**_row("multi-stage-no-bn", 0.8, 0, 87.0), "bn_reestimate": False, "settings": {"stages": 8}}]
    with_bn, without = reproduce.split_by_protocol(rows)
    assert [(r["label"], r["accuracy"]) for r in with_bn] == [("magnitude", 80.0), ("multi-stage", 88.0)]
    assert [(r["label"], r["accuracy"]) for r in without] == [("magnitude", 50.0), ("multi-stage-no-bn", 87.0)]


def test_command_lines_name_every_setting_of_the_row():
    """The paper rows name the paper's flags, a method's own default switched off (woodfisher updates unless
    told not to), the CBS parameter set and the re-estimation the table measures; multi-stage names nothing."""
    line = reproduce.command_line("resnet20", "woodfisher", 0.8, 1, {})
    assert line == ("cbs prune --model resnet20 --sparsity 0.8 --seed 1 --method woodfisher --no-update "
                    "--fisher-samples 1000 --damping 1e-05 --block-mode layer --params cbs --bn-reestimate")
    assert reproduce.command_line("resnet20", "multi-stage", 0.9, 2, {}) == (
        "cbs prune --model resnet20 --sparsity 0.9 --seed 2 --objective fisher --warm-start none")
    assert reproduce.command_line("resnet20", "warm-start", 0.9, 2, {}) == (
        "cbs prune --model resnet20 --sparsity 0.9 --seed 2 --objective fisher")
    assert reproduce.command_line("resnet20", "multi-stage-no-bn", 0.9, 0, {"damping": 0.01}) == (
        "cbs prune --model resnet20 --sparsity 0.9 --seed 0 --objective fisher --warm-start none --damping 0.01 "
        "--no-bn-reestimate")
    assert reproduce.command_line("resnet20", "layerwise", 0.5, 1, {}) == (
        "cbs prune --model resnet20 --sparsity 0.5 --seed 1 --objective reconstruction")


def test_the_layerwise_row_is_what_cbs_prune_runs_without_flags_up_to_0_6():
    """The recommendation by sparsity: ResNet20's `cbs prune` with no flag runs the `layerwise` row's settings
    up to 0.6 and the `warm-start` row's above (the Fisher stages from the layer-wise run at 0.6 for 0.7, at
    0.7 above); MLPNet runs `multi-stage` everywhere. ResNet20's `multi-stage` row starts from the dense model."""
    from engine.config import PruneConfig
    from engine.pipeline import settle
    from engine.recommend import zoo_profile

    for model, s, label in [("resnet20", 0.5, "layerwise"), ("resnet20", 0.6, "layerwise"),
                            ("resnet20", 0.7, "warm-start"), ("resnet20", 0.8, "warm-start"),
                            ("resnet20", 0.9, "warm-start"),
                            ("mlpnet", 0.5, "multi-stage")]:
        plain, bn, _ = settle(zoo_profile(model), s, {"seed": 0, "progress": False})
        assert PruneConfig(sparsity=s, **plain).to_dict() == reproduce.run_config(model, label, s, 0, {}).to_dict()
        assert plain.get("objective", "fisher") == ("reconstruction" if label == "layerwise" else "fisher")
        assert bn == (model == "resnet20")
        assert plain.get("warm_start") == ({0.7: 0.6}.get(s, 0.7) if label == "warm-start" else None)
    cold = reproduce.run_config("resnet20", "multi-stage", 0.8, 0, {})
    assert cold.warm_start is None and cold.stages == 8
    assert not reproduce.CONFIGS["resnet20"]["warm-start"].runs_at(0.6)
    assert reproduce.CONFIGS["resnet20"]["warm-start"].runs_at(0.7)
