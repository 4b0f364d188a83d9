"""Auxiliary-loss-free balancing: with the bias update on, expert loads after warm-up are more even than
with it off (same model, data and seed); the bias only moves while the update is on."""

from __future__ import annotations

from components.refs import checkpoint as ckpt

from .conftest import micro_config, run_in_process


def test_bias_updates_lower_the_max_over_mean_expert_load(micro_dataset, tmp_path):
    def run(on: bool) -> tuple[dict, object]:
        config = micro_config(micro_dataset, steps=30, micro_batch_size=8, checkpoint={"every": 30},
                              eval={"every": 0}, balance={"bias_update": on},
                              model={"bias_update_speed": 0.01, "seq_aux_loss_weight": 0.0},
                              metrics={"load_warmup_steps": 10})
        result = run_in_process(config, str(tmp_path / f"on-{on}"), tmp_path / f"w-{on}")
        return result["metrics"], ckpt.load_model(result["outputs"]["checkpoint"])[0]

    on, model_on = run(True)
    off, model_off = run(False)
    assert on["max_mean_load"] < off["max_mean_load"], (on["max_mean_load"], off["max_mean_load"])
    assert on["max_mean_load_cumulative"] < off["max_mean_load_cumulative"]
    assert all(float(m.gate.e_score_correction_bias.abs().sum()) == 0 for m in model_off.moe_layers())
    # sign-based steps of 0.01: after 30 steps every bias is a multiple of 0.01 and most have moved
    bias = model_on.moe_layers()[0].gate.e_score_correction_bias
    assert bias.abs().max() > 0.05 and bias.abs().max() <= 0.3 + 1e-6


def test_bias_updates_stop_after_the_configured_fraction(micro_dataset, tmp_path):
    config = micro_config(micro_dataset, steps=10, micro_batch_size=8, checkpoint={"every": 5, "keep": 2},
                          eval={"every": 0}, balance={"stop_fraction": 0.5},
                          model={"bias_update_speed": 0.01})
    result = run_in_process(config, str(tmp_path / "out"), tmp_path / "w")
    mid, _ = ckpt.load_model(ckpt.list_checkpoints(str(tmp_path / "out"))[0][1])  # step 5
    end, _ = ckpt.load_model(result["outputs"]["checkpoint"])
    for a, b in zip(mid.moe_layers(), end.moe_layers(), strict=True):
        assert a.gate.e_score_correction_bias.abs().sum() > 0
        assert a.gate.e_score_correction_bias.tolist() == b.gate.e_score_correction_bias.tolist()
