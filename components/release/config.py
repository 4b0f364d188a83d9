"""`ReleaseConfig`: the release stage's typed config (a form in the Prefect UI)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import Field, field_validator

from components.common.config import Strict
from infra.tracking import metric_key

DEFAULT_INTENDED_USE = (
    "Research on training DeepSeek-style models end to end: studying sparse Mixture-of-Experts pretraining, "
    "reinforcement learning with verifiable rewards, and distillation at small scale, and as a reference for "
    "checking tools that load DeepSeek-V3-architecture checkpoints."
)
DEFAULT_LIMITATIONS = [
    "Trained on a small corpus (synthetic verifiable problems and synthetic English in the tiny preset): it "
    "knows nothing beyond that data, and its answers outside those task families are meaningless.",
    "Evaluated only on the suite named in the evaluation section; scores there say nothing about general "
    "ability, safety or factuality.",
    "Not aligned for conversation, not safety-tuned, and may produce wrong, repetitive or offensive text: do "
    "not use it for decisions about people or in production.",
]


def _metric_keys(d: Any) -> Any:
    if not isinstance(d, dict):
        return d
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = metric_key(k)
        if key in out:
            raise ValueError(f"metric {k!r} is given twice (as {key!r})")
        out[key] = v
    return out


class LicenseConfig(Strict):
    """The MIT license of the weights."""

    holder: str = Field("The moeflow authors", min_length=1, description="copyright holder in LICENSE")
    year: int | None = Field(None, ge=1970, le=9999, description="copyright year (null: the current year)")

    @field_validator("holder")
    @classmethod
    def _one_line(cls, v: str) -> str:
        v = v.strip()
        if not v or "\n" in v or "\r" in v:
            raise ValueError("holder must be a single non-empty line, e.g. 'Jane Doe' or 'ACME Labs'")
        return v

    def resolved_year(self) -> int:
        return self.year if self.year is not None else dt.datetime.now(dt.UTC).year


class GateConfig(Strict):
    """When a release becomes the `champion`: every threshold holds and it is not worse than the champion.

    Metric names are those of the evaluation report (`pass@1`, `pass@4`, `maj@4`, `greedy_accuracy`,
    `format_rate`, `val_loss`, ...) or of `metrics` given in the release config, written either way
    (`pass@1` or `pass_at_1`; stored as the latter, which MLflow accepts). A metric the gate names that
    the release lacks fails the gate: an unevaluated model is never promoted.
    """

    min: dict[str, float] = Field(default_factory=dict, description="metric -> lowest acceptable value")
    max: dict[str, float] = Field(default_factory=dict, description="metric -> highest acceptable value")
    compare: dict[str, Literal["higher", "lower"]] = Field(
        default_factory=lambda: {"pass_at_1": "higher"},
        description="metrics compared with the current champion's, and which direction is better "
        "(no champion yet: the comparison passes)")
    tolerance: float = Field(0.0, ge=0, description="how much worse than the champion still counts as not worse")
    promote: bool = Field(True, description="set the champion alias when the gate passes (false: only report)")

    @field_validator("min", "max", "compare", mode="before")
    @classmethod
    def _metric_names(cls, v: Any) -> Any:
        return _metric_keys(v)


class ReleaseConfig(Strict):
    """Package a trained model as an MIT release (HF `DeepseekV3ForCausalLM` layout, model card, SHA256SUMS),
    publish it, register it in the MLflow Model Registry as `candidate`, and promote it to `champion` when
    the evaluation gate passes."""

    model: str | None = Field(
        None, description="model to release: a model/checkpoint URI, a stage output, a release, or "
        "models:/NAME@ALIAS")
    eval_report: str | None = Field(
        None, description="evaluation of that model: an eval stage output, its report directory, or a "
        "report.json (null: only `metrics`)")
    eval_model: str | None = Field(
        None, description="row of the report to use (its model name; null: the row of the released model)")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="evaluation metrics given directly, e.g. {pass@1: 0.42} (they win "
        "over the report's; the model card marks them as given)")
    name: str = Field("moeflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                      description="registered model name in the MLflow Model Registry")
    title: str | None = Field(None, description="model card title (null: the registered name and the model kind)")
    description: str | None = Field(None, description="a paragraph for the top of the model card")
    intended_use: str = Field(DEFAULT_INTENDED_USE, min_length=1, description="model card: intended use")
    limitations: list[str] = Field(default_factory=lambda: list(DEFAULT_LIMITATIONS), min_length=1,
                                   description="model card: limitations, one per item")
    license: LicenseConfig = Field(default_factory=LicenseConfig, description="MIT license holder and year")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the released weights (router weights and biases stay float32)")
    max_shard_gb: float = Field(5.0, gt=0, description="largest safetensors shard (GiB) before splitting")
    register_model: bool = Field(True, description="register the release in the MLflow Model Registry")
    gate: GateConfig = Field(default_factory=GateConfig, description="promotion to champion")
    atol: float = Field(1e-4, gt=0, description="largest logit difference accepted by the release checks")


    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, v: Any) -> Any:
        return _metric_keys(v)
