"""Data preparation: read / generate, normalise, filter, dedup, train the BPE, pack into row shards.

`prepare_dataset(PrepConfig(), out_dir)` writes the dataset directory whose layout `format.py` documents
(a contract with pretraining, RL, distillation and evaluation); `PackedDataset`, `load_dataset_meta`,
`load_tokenizer` and `load_eval_split` read it back.
"""

from components.dataset.format import (
    SPECIAL_TOKENS,
    DatasetFormatError,
    PackedDataset,
    load_dataset_meta,
    load_eval_split,
    load_tokenizer,
    task_family,
)

from .config import (
    DedupConfig,
    EvalSplitConfig,
    FilterConfig,
    GeneratorsConfig,
    GenericTextConfig,
    PackingConfig,
    PrepConfig,
    SourceConfig,
    TaskGenConfig,
    TokenizerConfig,
)
from .errors import PrepError
from .prep import plot_length_histogram, prepare_dataset, sample_documents

__all__ = [
    "DatasetFormatError",
    "DedupConfig",
    "EvalSplitConfig",
    "FilterConfig",
    "GenericTextConfig",
    "GeneratorsConfig",
    "PackedDataset",
    "PackingConfig",
    "PrepConfig",
    "PrepError",
    "SPECIAL_TOKENS",
    "SourceConfig",
    "TaskGenConfig",
    "TokenizerConfig",
    "load_dataset_meta",
    "load_eval_split",
    "load_tokenizer",
    "plot_length_histogram",
    "prepare_dataset",
    "sample_documents",
    "task_family",
]
