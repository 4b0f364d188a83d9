"""`PrepConfig`: everything the data-preparation stage needs, as nested, documented pydantic models.

The defaults ARE the tiny preset: four task families x 3000 problems plus 2000 generic documents, a
2048-token vocabulary and 256-token rows. The whole prep runs in seconds on two cores and gives a
~2 minute CPU pretraining enough tokens. Every field is validated at the edge; errors name the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from components.common.config import Strict
from components.dataset.format import SPECIAL_TOKENS

DEFAULT_FAMILIES = ("arithmetic", "countdown", "linear_equation", "list_ops")


def known_families() -> list[str]:
    """Names of the task families `components.tasks` provides."""
    from components.tasks import FAMILIES

    return sorted(FAMILIES)


def _default_families() -> list[str]:
    known = set(known_families())
    chosen = [f for f in DEFAULT_FAMILIES if f in known]
    return chosen or known_families()[:4]


class SourceConfig(Strict):
    """One input: a JSONL, Parquet or plain-text file (optionally gzipped), local or on S3."""

    uri: str = Field(
        description="local path, file:// or s3://bucket/key of one input file (.jsonl, .jsonl.gz, "
        ".parquet, .txt, .txt.gz), or of a directory / prefix whose files are all read; a local path must "
        "lie inside settings.data_roots when set, and symlinks and '..' out of it are refused",
        min_length=1,
    )
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="file format; 'auto' decides from the name (.jsonl/.json/.ndjson, .parquet, .txt/.md)"
    )
    text_field: str = Field(
        "text", min_length=1, description="JSONL key / Parquet column holding each document's text"
    )
    text_unit: Literal["file", "paragraph"] = Field(
        "file",
        description="plain text only: 'file' = the whole file is one document; 'paragraph' = every "
        "blank-line-separated paragraph is a document",
    )

    @field_validator("uri")
    @classmethod
    def _confined(cls, uri: str) -> str:
        confine_local_source(uri)
        return uri


def confine_local_source(uri: str) -> None:
    """Refuse a local source outside `settings.data_roots` (after resolving symlinks), a path with `..`, and,
    when no roots are configured, a source that is itself a symlink. Files inside a directory source are
    never followed through symlinks either (the storage listing refuses them). Remote URIs pass."""
    from pathlib import Path

    from infra.settings import get_settings
    from infra.storage import is_remote
    from infra.storage.local import local_path

    if is_remote(uri):
        return
    path = local_path(uri)
    if ".." in Path(path).parts:
        raise ValueError(f"{uri}: '..' is not allowed in a local source path; name the file directly")
    roots = get_settings().data_roots
    if not roots:
        if path.is_symlink():
            raise ValueError(f"{uri} is a symlink (to {path.resolve()}): name the file itself, or allow its "
                             "directory in settings.data_roots (MOEFLOW_DATA_ROOTS)")
        return
    real = path.resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots]
    if not any(real == r or r in real.parents for r in allowed):
        shown = ", ".join(map(str, allowed))
        raise ValueError(f"{uri} resolves to {real}, outside the allowed data roots ({shown}); "
                         "set settings.data_roots (MOEFLOW_DATA_ROOTS) to allow it")


class TaskGenConfig(Strict):
    """Verifiable reasoning problems from `components.tasks`, written as prompt + worked completion."""

    families: list[str] = Field(
        default_factory=_default_families,
        description="task families to generate (and to hold out an evaluation split for)",
    )
    n_per_family: int = Field(3000, ge=0, description="training problems generated per family (0 = none)")
    wrong_fraction: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="fraction of completions whose final answer is wrong, like the mistakes of web text",
    )
    wrong_fraction_per_family: dict[str, float] = Field(
        default_factory=dict,
        description="per-family overrides of wrong_fraction, e.g. {'arithmetic': 0.3}",
    )
    knobs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="difficulty knobs per family, e.g. {'arithmetic': {'max_operands': 3, 'max_value': 9}}; "
        "recorded in dataset.json so that RL, distillation and evaluation draw problems of the same kind",
    )

    @field_validator("families")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from components.tasks import check_families

        return check_families(v)

    @field_validator("knobs")
    @classmethod
    def _valid_knobs(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from components.tasks import get_family

        for family, knobs in v.items():
            get_family(family, **knobs)  # unknown family or knob: a ValueError naming it
        return v

    def family(self, name: str) -> Any:
        """The task family `name` with this config's knobs."""
        from components.tasks import get_family

        return get_family(name, **self.knobs.get(name, {}))

    @field_validator("wrong_fraction_per_family")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"wrong_fraction_per_family[{k!r}] = {x} must be within [0, 1]")
        return v

    @model_validator(mode="after")
    def _overrides_name_families(self) -> TaskGenConfig:
        extra = sorted((set(self.wrong_fraction_per_family) | set(self.knobs)) - set(self.families))
        if extra:
            raise ValueError(
                f"wrong_fraction_per_family/knobs name families {extra} that are not in families {self.families}"
            )
        return self

    def wrong_fraction_for(self, family: str) -> float:
        return self.wrong_fraction_per_family.get(family, self.wrong_fraction)


class GenericTextConfig(Strict):
    """A small deterministic synthetic English generator: templated sentences over a fixed vocabulary."""

    n_docs: int = Field(2000, ge=0, description="generic documents to generate (0 = none)")
    min_sentences: int = Field(3, ge=1, description="fewest sentences in one document")
    max_sentences: int = Field(12, ge=1, description="most sentences in one document")

    @model_validator(mode="after")
    def _bounds(self) -> GenericTextConfig:
        if self.max_sentences < self.min_sentences:
            raise ValueError(
                f"max_sentences ({self.max_sentences}) must be >= min_sentences ({self.min_sentences})"
            )
        return self


class GeneratorsConfig(Strict):
    """Built-in corpus generators (no downloads)."""

    tasks: TaskGenConfig = Field(default_factory=TaskGenConfig, description="verifiable task problems")
    generic_text: GenericTextConfig = Field(
        default_factory=GenericTextConfig, description="synthetic English prose"
    )


class EvalSplitConfig(Strict):
    """Held-out evaluation problems per task family, kept out of the training data."""

    n_per_family: int = Field(200, ge=0, description="evaluation problems per family (0 = no eval split)")
    seed: int = Field(1234, description="seed of the evaluation split (independent of the training seed)")


class FilterConfig(Strict):
    """Quality filters, applied after NFKC normalisation; each reports what it removed."""

    min_chars: int = Field(16, ge=0, description="drop documents shorter than this many characters")
    max_chars: int = Field(200_000, ge=1, description="drop documents longer than this many characters")
    max_repetition_ratio: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="drop documents whose fraction of repeated word n-grams (1 - unique/total) exceeds this",
    )
    repetition_ngram: int = Field(3, ge=1, description="n of the word n-grams of the repetition ratio")
    max_non_printable_ratio: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="drop documents whose fraction of non-printable characters (newline and tab "
        "excepted) exceeds this",
    )

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        return self


class DedupConfig(Strict):
    """Exact (hash of the normalised text) and near-duplicate (MinHash LSH) removal; the first copy stays."""

    exact: bool = Field(True, description="drop documents whose normalised text was already seen")
    near: bool = Field(True, description="drop near-duplicates found with MinHash LSH")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="estimated Jaccard similarity above which two documents are near-duplicates"
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more = more exact, slower)")
    shingle: Literal["word", "char"] = Field(
        "word",
        description="shingle unit: 'word' n-grams (numbers are words, so problems that differ only in "
        "their numbers stay apart) or 'char' n-grams",
    )
    ngram: int = Field(5, ge=1, le=64, description="shingle length in units")


class TokenizerConfig(Strict):
    """Byte-level BPE trained with Hugging Face `tokenizers`; digits are always split one by one."""

    vocab_size: int = Field(
        2048,
        ge=256 + len(SPECIAL_TOKENS) + 1,
        le=2**32 - 1,
        description="largest vocabulary, counting the 256 byte tokens and the special tokens; training stops "
        "earlier when no pair occurs min_frequency times (dataset.json has the real size)",
    )
    min_frequency: int = Field(2, ge=1, description="least count of a pair for it to be merged")


class PackingConfig(Strict):
    """Fixed-length rows of `seq_len + 1` tokens (inputs row[:-1], targets row[1:]) in shard files."""

    seq_len: int = Field(256, ge=1, description="tokens the model sees per row (rows hold seq_len + 1)")
    shard_tokens: int = Field(
        1 << 20, ge=1, description="tokens per shard file (rounded down to whole rows, at least one row)"
    )


class PrepConfig(Strict):
    """The data-preparation stage: read, generate, normalise, filter, dedup, tokenise, pack, split."""

    sources: list[SourceConfig] = Field(
        default_factory=list, description="input files (JSONL, Parquet, text, gzip forms), local or s3://"
    )
    generators: GeneratorsConfig = Field(default_factory=GeneratorsConfig, description="built-in corpora")
    eval: EvalSplitConfig = Field(default_factory=EvalSplitConfig, description="held-out evaluation split")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="quality filters")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="exact and near-duplicate removal")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer")
    packing: PackingConfig = Field(default_factory=PackingConfig, description="row length and shard size")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="fraction of documents held out for validation (at least one if > 0)"
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="most malformed records (bad JSON, missing/non-string text) a file may have, as a "
        "fraction of its records, before the stage stops",
    )
    seed: int = Field(0, description="seed of the generators, the train/validation split and the shuffle")
