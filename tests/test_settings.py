"""The option table (engine.settings) is the one definition of every setting: PruneConfig's fields and
validation, the ``cbs prune`` flags and the rejections below are all generated from it."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from engine.cli import build_parser, main, split_params
from engine.config import PruneConfig
from engine.errors import InvalidOptionError
from engine.settings import JOB_OPTIONS, PRUNE_OPTIONS, REQUIRED

README = Path(__file__).resolve().parents[1] / "README.md"


def test_prune_config_fields_are_the_table():
    fields = dataclasses.fields(PruneConfig)
    assert [f.name for f in fields] == [o.name for o in PRUNE_OPTIONS]
    for f, o in zip(fields, PRUNE_OPTIONS):
        if o.default is REQUIRED:
            assert f.default is dataclasses.MISSING
        elif f.default is not dataclasses.MISSING:
            assert f.default == o.default


_BAD = [(o, bad) for o in PRUNE_OPTIONS for bad in o.bad_values()]


@pytest.mark.parametrize("option, bad", _BAD, ids=[f"{o.name}={bad!r}" for o, bad in _BAD])
def test_every_bad_value_is_rejected_with_the_option_and_its_range(option, bad):
    kwargs = {"sparsity": 0.5, option.name: bad}
    with pytest.raises(InvalidOptionError) as err:
        PruneConfig(**kwargs)
    message = str(err.value)
    assert f"'{option.name}'" in message and option.allowed() in message
    shown = repr(bad) if isinstance(bad, str) else str(bad)
    assert message.endswith(f"Got {shown}.") or (isinstance(bad, float) and math.isnan(bad))


_FLAGS = [(o, bad) for o in PRUNE_OPTIONS + JOB_OPTIONS if o.public and o.kind in ("int", "float", "choice")
          for bad in ("not-a-value",) + ((str(o.low - 1 if not o.low_open else o.low),) if o.low is not None else ())]


@pytest.mark.parametrize("option, bad", _FLAGS, ids=[f"{o.flag}={bad}" for o, bad in _FLAGS])
def test_every_bad_flag_exits_2_with_one_line_naming_it(option, bad, tmp_path, capsys):
    argv = ["prune", "--model", "mlpnet", "--sparsity", "0.5", "--out", str(tmp_path / "out")]
    if option.name in ("model", "sparsity"):
        argv = [a for i, a in enumerate(argv) if not (argv[i - 1] == option.flag or a == option.flag)]
    with pytest.raises(SystemExit) as exit_:
        main(argv + [option.flag, bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cbs prune: error: ") and "usage" not in err
    assert option.flag in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [o for o in PRUNE_OPTIONS if not o.public and o.kind == "bool"],
                         ids=lambda o: o.name)
def test_advanced_settings_are_reachable_through_param_and_checked(option):
    settings, params = split_params([f"{option.name}=true"])
    assert settings == {option.name: True} and params == {}
    with pytest.raises(InvalidOptionError, match=re.escape(f"'{option.name}'")):
        split_params([f"{option.name}=maybe"])


def test_other_params_go_to_the_solver():
    settings, params = split_params(["rmp_trials=10", "holdout_loss=false"])
    assert settings == {"holdout_loss": False} and params == {"rmp_trials": 10}
    with pytest.raises(InvalidOptionError, match="NAME=VALUE"):
        split_params(["novalue"])


def test_prune_help_fits_one_screen_and_the_readme_names_every_flag():
    parser = build_parser()
    prune = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "prune")[1]
    text = prune.format_help()
    assert len(text.splitlines()) <= 60
    readme = README.read_text()
    for o in PRUNE_OPTIONS + JOB_OPTIONS:
        if o.public:
            assert o.flag in text
            assert o.flag in readme, f"README does not mention {o.flag}"
    for command in parser._subparsers._group_actions[0].choices:
        assert f"cbs {command}" in readme, f"README does not show cbs {command}"


def test_an_unknown_solver_parameter_is_one_clear_error(tmp_path, capsys, shared_data):
    code = main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "cbs", "--param", "trials=3",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()
    err = capsys.readouterr().err
    assert "'trials' parameter is not one of solver 'cbs''s parameters" in err and len(err.strip().splitlines()) == 1


def test_job_settings_through_param():
    settings, params = split_params(["bn_samples=500", "bn_augment=none"])
    assert settings == {"bn_samples": 500, "bn_augment": "none"} and params == {}
    with pytest.raises(InvalidOptionError, match="'bn_augment'.*crop-flip"):
        split_params(["bn_augment=mirror"])
