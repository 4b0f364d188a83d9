"""The pretraining config: presets expand into the full model config, mistakes name the field to fix."""

from __future__ import annotations

import pytest

from components.model.config import ModelConfig
from components.training import stage
from components.training.config import PretrainConfig
from flows import registry
from infra.contract import ConfigError


def test_a_model_preset_expands_into_every_model_field_with_overrides_applied():
    cfg = PretrainConfig.model_validate({"dataset": "x", "model": {"preset": "tiny", "num_hidden_layers": 2}})
    dumped = cfg.model_dump(mode="json")["model"]
    assert "preset" not in dumped
    assert set(dumped) == set(ModelConfig.model_fields)
    tiny = ModelConfig.from_yaml(stage.__file__.rsplit("/components/", 1)[0] + "/configs/models/tiny.yaml")
    assert dumped["num_hidden_layers"] == 2 and dumped["hidden_size"] == tiny.hidden_size
    # the dumped config validates again to the same thing (the job re-validates what the flow sent)
    assert PretrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize(
    "data, field",
    [
        ({"batch_size": 10, "micro_batch_size": 4}, "batch_size"),
        ({"micro_batch_size": 32, "batch_size": 16}, "micro_batch_size"),
        ({"model": {"preset": "no-such-model"}}, "model"),
        ({"model": {"preset": "tiny", "hidden_sizes": 3}}, "model"),
        ({"schedule": {"kind": "linear"}}, "schedule.kind"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"resources": {"gpus": 1, "procs_per_node": 2}}, "procs_per_node"),
    ],
)
def test_invalid_configs_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        registry.get("pretrain").validate({"dataset": "x", **data})
    assert field in str(err.value)


def test_accumulation_must_divide_by_the_world_size_and_says_what_to_change():
    cfg = PretrainConfig.model_validate({"dataset": "x", "batch_size": 12, "micro_batch_size": 4})
    assert cfg.grad_accum(1) == 3 and cfg.grad_accum(3) == 1
    with pytest.raises(ValueError, match=r"batch_size \(12\).*micro_batch_size x world size \(4 x 2 = 8\)"):
        cfg.grad_accum(2)


def test_a_missing_dataset_is_a_config_error_pointing_at_prep():
    with pytest.raises(ConfigError, match="pretrain.dataset.*moeflow prep"):
        stage.input_uris(PretrainConfig())


@pytest.mark.parametrize("preset", ["tiny", "pretrain/small", "pretrain/h200", "pretrain/multinode"])
def test_every_preset_validates_and_its_batch_divides_over_its_processes(preset):
    import yaml

    from .conftest import REPO

    data = yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())
    data = data.get("pretrain", data)
    cfg = registry.get("pretrain").validate({**data, "dataset": "s3://bucket/dataset"})
    assert cfg.grad_accum(cfg.world_size) >= 1
    assert cfg.resources.procs_per_node * cfg.resources.nodes == cfg.world_size
