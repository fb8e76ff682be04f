"""Held-out evaluation (`loopcoder_jax/eval_loop.py`): the eval loss is the token-weighted mean
cross-entropy over the whole eval set, checked against numpy on a sharded 8-device mesh."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import eval_loop
from loopcoder_jax import sharding as sh
from loopcoder_jax.config import ExperimentConfig
from loopcoder_jax.data.tokenizer import load_tokenizer
from loopcoder_jax.model import LoopCoder


def _exp(eval_file, **data):
    return ExperimentConfig.from_dict(
        {
            "model": {"preset": "tiny", "num_hidden_layers": 1, "loop_window_size": 4},
            "mesh": {"fsdp": 4, "tensor": 2},
            "train": {"batch_size": 8, "seq_len": 32, "eval_batches": 8},
            "data": {"eval_sources": [eval_file], "split_long": "long_only", **data},
        }
    )


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """8 documents of 20..32 tokens (one row each: split_long=long_only), then a short one.

    With 8-row batches the second batch holds only the short document, so the token-weighted
    mean and the mean of batch means differ clearly.
    """
    tok = load_tokenizer()
    texts = []
    for i in range(8):
        text = f"def f{i}(x):\n"
        while len(tok.encode(text, add_eos=True)) < 20:
            text += f"    x = x * {i} + 1\n"
        assert len(tok.encode(text, add_eos=True)) <= 32
        texts.append(text)
    texts.append("pass\n")
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def test_eval_loss_is_the_token_weighted_mean_cross_entropy(eval_file):
    exp = _exp(eval_file)
    tok = load_tokenizer()
    mesh, rules = sh.make_mesh(exp.mesh), sh.get_rules(exp.mesh.rules)
    model = LoopCoder(exp.model, exp.runtime)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    params = nn.unbox(init(jax.random.key(3)))
    # non-zero gates: the loop-1 mix must matter in the forward pass being checked
    gate = params["layers"]["self_attn"]["loop_gate"]
    params["layers"]["self_attn"]["loop_gate"] = jax.tree.map(lambda x: x + 0.3, gate)
    # a sharper head: per-token losses spread out, so batch means differ (see the last check)
    params["lm_head"] = jax.tree.map(lambda x: 30 * x, params["lm_head"])
    logs = []
    ev = eval_loop.Evaluator(exp, tok, model, mesh, rules, log=logs.append)
    assert ev.enabled and ev.due(exp.train.steps) and not ev.due(1)
    result = ev(params, step=7)

    # By hand: full logits, float64 log-softmax, sum of masked CE over all batches / tokens.
    full_logits = jax.jit(lambda p, b: model.apply({"params": p}, *b))
    ce_sum, tok_sum, per_batch = 0.0, 0.0, []
    n_docs = 0
    for b in ev.batches:
        args = (b["input_ids"], b["segment_ids"], b["positions"])
        logits = np.asarray(full_logits(params, args), np.float64)  # [B, T, V], unchunked
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        tgt = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        ce = ((lse - tgt) * b["loss_mask"]).sum()
        ce_sum, tok_sum = ce_sum + ce, tok_sum + b["loss_mask"].sum()
        per_batch.append(ce / max(b["loss_mask"].sum(), 1))
        n_docs += int(((b["input_ids"] == tok.bos_id) & (b["segment_ids"] > 0)).sum())
    assert n_docs == 9  # the whole eval set, every document once
    assert result.tokens == int(tok_sum) and result.step == 7
    np.testing.assert_allclose(result.loss, ce_sum / tok_sum, rtol=2e-5)
    np.testing.assert_allclose(result.ppl, np.exp(ce_sum / tok_sum), rtol=5e-5)
    # The check can tell a mean of batch means from the token-weighted mean.
    assert abs(np.mean(per_batch) - ce_sum / tok_sum) > 1e-3
    assert len(ev.batches) == 2 and ev.batches[-1]["loss_mask"][-1].sum() == 0  # padded rows
    assert result.record() == {
        "eval_loss": result.loss, "eval_ppl": result.ppl, "eval_tokens": result.tokens
    }  # fmt: skip
    assert len(logs) == 1 and "eval: " in logs[0]


def test_a_run_without_eval_data_says_so_once(eval_file):
    exp = _exp(eval_file, eval_sources=[])
    logs = []
    ev = eval_loop.Evaluator(exp, load_tokenizer(), None, None, None, log=logs.append)
    assert not ev.enabled and not ev.due(exp.train.steps)
    assert len(logs) == 1 and "no held-out eval data" in logs[0] and "eval_fraction" in logs[0]
