"""`EvalConfig`: the evaluation stage's typed config (a form in the Prefect UI)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from components.common.config import Strict


class ModelRef(Strict):
    """One model to evaluate."""

    uri: str = Field(description="a model/checkpoint URI, a stage output, a release URI, or models:/NAME@ALIAS")
    name: str | None = Field(None, description="label in the report (default: derived from the URI)")

    def label(self, index: int) -> str:
        if self.name:
            return self.name
        if self.uri.startswith("models:/"):
            return self.uri.removeprefix("models:/")
        parts = [p for p in self.uri.rstrip("/").split("/") if p]
        # <store>/<stage>/<key>/<output>: "<stage>-<key[:6]>"
        if len(parts) >= 3 and parts[-1] in ("model", "student", "policy", "release", "checkpoint"):
            return f"{parts[-3]}-{parts[-2][:6]}"
        return parts[-1] if parts else f"model{index}"


class SuiteConfig(Strict):
    """The problems: held-out splits of a prepared dataset's task families, and user JSONL task files."""

    dataset: str | None = Field(
        None, description="prepared dataset URI whose eval/<family>.jsonl splits are used (null: the dataset "
        "in the first model's lineage, if any)")
    families: list[str] | None = Field(None, description="families to evaluate (null: every split of the dataset)")
    max_per_family: int | None = Field(50, ge=1, description="first N problems of each split (null: all)")
    task_files: list[str] = Field(default_factory=list, description="user task JSONL files (local path or URI)")
    max_per_file: int | None = Field(None, ge=1, description="first N problems of each task file (null: all)")


class SamplingConfig(Strict):
    """How completions are drawn (DeepSeek-R1's evaluation protocol by default)."""

    n_samples: int = Field(4, ge=1, description="samples per problem (pass@1 is averaged over them)")
    temperature: float = Field(0.6, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(96, ge=1, description="generation limit per completion")
    k_values: list[int] = Field(default_factory=lambda: [1, 4], description="k of pass@k and maj@k (each <= n)")
    greedy: bool = Field(True, description="also decode greedily once per problem (greedy accuracy)")
    seed: int = Field(0, description="seed of the samples (same seed + model = same numbers)")
    batch_size: int = Field(64, ge=1, description="problems per generation batch (part of the seed's meaning)")

    @model_validator(mode="after")
    def _k(self) -> SamplingConfig:
        bad = [k for k in self.k_values if not 1 <= k <= self.n_samples]
        if bad:
            raise ValueError(f"k_values {bad} must lie in [1, n_samples={self.n_samples}]; raise n_samples")
        return self


class EvalConfig(Strict):
    """Evaluate one or more models on the same problems and compare them in one table."""

    models: list[ModelRef] = Field(min_length=1, description="models to evaluate, in report order")
    suite: SuiteConfig = Field(default_factory=SuiteConfig, description="the problems")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="how completions are drawn")
    val_loss: bool = Field(True, description="validation loss/perplexity on the dataset's val split "
                           "(models whose tokenizer is the dataset's)")
    val_max_rows: int = Field(64, ge=1, description="validation rows used")
    keep_samples: int = Field(200, ge=0, description="per-sample records published per model (first N)")
    price_per_device_hour: float = Field(2.0, ge=0, description="USD per device-hour for stages without a ledger")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelRef]) -> list[ModelRef]:
        labels = [m.label(i) for i, m in enumerate(v)]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"models have the same label {dup}; give them distinct `name`s")
        return v
