"""Training data: the SentencePiece tokenizer and the grain pipeline (see docs/data.md).

from loopcoder_jax.data import load_tokenizer, make_train_iterator
"""

import warnings

# `python -m loopcoder_jax.data.tokenizer` (and `.pipeline`) import this package, which has
# already imported the module being run; runpy then warns about it. The re-exports below are
# intended, so the warning is noise for these two CLIs only.
warnings.filterwarnings(
    "ignore",
    message=r"'loopcoder_jax\.data\.(tokenizer|pipeline)' found in sys\.modules",
    category=RuntimeWarning,
)

from loopcoder_jax.data.pipeline import (  # noqa: E402
    DataError,
    DataStats,
    data_stats,
    iterator_state,
    make_train_iterator,
    orbax_restore_args,
    orbax_save_args,
    restore_iterator_state,
)
from loopcoder_jax.data.tokenizer import (  # noqa: E402
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
