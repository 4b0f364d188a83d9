"""A deployed stage flow's parameters (a shipped preset, a few typed fields, `key=value` overrides) build
the stage's config from the preset's section; bad values fail before any job starts, naming the field."""

from __future__ import annotations

import pytest

from flows.common import preset_config, presets_with
from flows.registry import STAGES
from infra.contract import ConfigError


def test_each_stage_offers_the_shipped_presets_with_its_section():
    for stage in STAGES:
        assert presets_with(stage)[0] == "tiny", stage


def test_preset_fields_and_overrides_build_the_config_in_that_order():
    cfg = preset_config("pretrain", "tiny", {"steps": 7, "optim.lr": 1e-3, "seed": None},
                        ["seed=5", "optim.lr=2e-3"])
    assert (cfg.steps, cfg.optim.lr, cfg.seed) == (7, 2e-3, 5)
    assert cfg.batch_size == 2 and cfg.model.hidden_size < 1000  # the preset's values, not the class defaults
    assert preset_config("rl", "tiny", {}, None).grpo.steps == 300


@pytest.mark.parametrize("preset,fields,overrides,needle", [
    ("nope", {}, None, "preset 'nope'"),
    ("tiny", {"steps": 0}, None, "steps"),
    ("tiny", {}, ["optim.lrr=1"], "lrr"),
    ("tiny", {}, ["steps"], "key=value"),
])
def test_bad_parameters_name_the_field(preset, fields, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        preset_config("pretrain", preset, fields, overrides)
