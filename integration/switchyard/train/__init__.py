"""Training: data (HF datasets) and the embedded tiny default model/tokenizer."""

from switchyard.train.data import DataConfig, load_datasets, rank_batches, steps_per_epoch
from switchyard.train.tiny import build_tiny_dense_model, build_tokenizer, default_cache_dir, stdlib_corpus

__all__ = [
    "DataConfig",
    "build_tiny_dense_model",
    "build_tokenizer",
    "default_cache_dir",
    "load_datasets",
    "rank_batches",
    "stdlib_corpus",
    "steps_per_epoch",
]
