"""Training data: the SentencePiece tokenizer and the grain pipeline (see docs/data.md).

from loopcoder_jax.data import load_tokenizer, make_train_iterator
"""

from loopcoder_jax.data.pipeline import (
    DataError,
    DataStats,
    data_stats,
    iterator_state,
    make_train_iterator,
    orbax_restore_args,
    orbax_save_args,
    restore_iterator_state,
)
from loopcoder_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    apply_chat_template,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "DataError",
    "DataStats",
    "data_stats",
    "iterator_state",
    "make_train_iterator",
    "orbax_restore_args",
    "orbax_save_args",
    "restore_iterator_state",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "apply_chat_template",
    "load_tokenizer",
    "train_tokenizer",
]
