"""Serving: continuous batching (`engine`: device programs on decode slots; `scheduler`: which
request runs when) and the OpenAI-compatible HTTP server (`http`, entry `loopcoder_jax.serve`)."""

from loopcoder_jax.serving.engine import SlotConfig, SlotEngine, SlotRequest, sample_rows
from loopcoder_jax.serving.scheduler import Request, Scheduler

__all__ = ["Request", "Scheduler", "SlotConfig", "SlotEngine", "SlotRequest", "sample_rows"]
