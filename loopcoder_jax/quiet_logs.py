"""Filters for third-party log lines that are harmless here and only confuse newcomers.

- Orbax (through absl logging) warns "Metadata file does not exist: .../params/
  _CHECKPOINT_METADATA" on every load of one item of a checkpoint: the metadata file lives in
  the step directory, one level up, so the item directory never has one. Nothing is missing.
"""

from __future__ import annotations

import logging

_HARMLESS_PREFIXES = ("Metadata file does not exist",)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_HARMLESS_PREFIXES))


_FILTER = _DropHarmless()


def install() -> None:
    """Drops the lines above from the `absl` logger (idempotent; other warnings still show)."""
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
