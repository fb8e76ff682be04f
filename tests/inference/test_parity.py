"""Greedy tokens of the JAX engine == the torch reference's own cached greedy decoding."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from loopcoder_jax.convert import hf_to_params  # noqa: E402
from loopcoder_jax.generate import generate  # noqa: E402
from tests.reference.torch_loopcoder import TorchLoopCoder  # noqa: E402

from .helpers import W, random_prompts, tiny_cfg  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(autouse=True, scope="module")
def _single_thread_torch():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# loop_num 3 is slow-only: its cached logits are already checked against the full forward
# in the default run (test_generate.py), and this keeps the default run in budget.
@pytest.mark.parametrize("loop_num", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_greedy_tokens_equal_torch_reference(loop_num):
    cfg = tiny_cfg(loop_num=loop_num)
    # std 0.08: peaked logits, so a 1e-6 numerical difference cannot flip an argmax.
    ref = TorchLoopCoder(cfg.to_hf()).init_random_(seed=loop_num, gate_scale=0.5, std=0.08)
    ref = ref.eval()
    params = hf_to_params(cfg, {k: v.numpy() for k, v in ref.state_dict().items()})
    prompts = random_prompts([2 * W + 3] * 2, seed=loop_num)  # torch needs equal lengths
    new = 10 * W  # generation runs far past the window
    want = ref.greedy_generate(torch.tensor(prompts), new).tolist()
    got = generate(cfg, params, prompts, new, eos_ids=[cfg.vocab_size - 1])
    assert got == want
    assert want[0] != want[1]  # the two rows differ, so a row mix-up would show
