"""Training-test helpers: synthetic packed batches (real code paths, made-up data)."""

from __future__ import annotations

import numpy as np


def synthetic_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int, docs: int = 2):
    """A packed batch like the grain pipeline's: `docs` segments per row, a padded tail."""
    ids = rng.integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
    seg = np.zeros((batch, seq_len), np.int32)
    pos = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.float32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, seq_len - 2), docs - 1, replace=False))
        bounds = [0, *cuts.tolist(), seq_len - 2]  # last 2 positions: padding
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seg[b, lo:hi] = s + 1
            pos[b, lo:hi] = np.arange(hi - lo)
            mask[b, lo : hi - 1] = 1.0  # last token of a document has no target
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": mask,
    }
