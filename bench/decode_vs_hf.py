"""Decode benchmark: the JAX engine vs Hugging Face transformers running the official modeling file.

Issue 14, benchmark target 3. A peer no one here wrote: transformers' `generate(use_cache=True)`
with `modeling_iquestloopcoder.py` (IQuestLoopCoderForCausalLM and its IQuestLoopCoderCache),
on the same CPU, with the same weights, greedy, same prompts. Nothing is downloaded: you supply
the modeling file (`--hf-modeling-file PATH`; its `configuration_iquestloopcoder.py` is taken from
the same directory unless `--hf-config-file` says otherwise). The published file has defects
(DESIGN.md section 1): patch defects 1 and 2 in your local copy first, or the tokens will not
match; keep the prompt no longer than the window (`--prompt-len <= --window`) so defect 3
(prefill longer than W) does not apply. This script never patches or stores that file.

Steps: a random LoopCoder (torch reference init with non-zero gates, converted to our params),
exported with `convert.save_hf_checkpoint` to a temporary HF directory; the two modeling files
are copied next to it and config.json's `auto_map` points at them; transformers loads it with
`trust_remote_code=True` from that local directory (HF_HUB_OFFLINE=1).

Measured per batch size (median of `--repeats`, after a warm-up; JAX compile excluded):
  decode tok/s: B*(N-1) / decode time. JAX: the on-device decode loop (the first new token
    comes from the prefill logits). HF: generate(N) - generate(1), i.e. the N-1 cached decode
    steps (a generate of 1 token is the prefill plus the first token's argmax);
  end-to-end tok/s: B*N / (prefill + decode) for both;
  token match: greedy tokens equal position by position (and whether every row is equal).

    python bench/decode_vs_hf.py --hf-modeling-file /tmp/hfpeer/patched/modeling_iquestloopcoder.py
        [--batches 1,8] [--prompt-len 32] [--new-tokens 128] [--repeats 3] [--torch-threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--hf-modeling-file",
        required=True,
        help="path of modeling_iquestloopcoder.py (defects 1-2 patched locally); never downloaded",
    )
    p.add_argument(
        "--hf-config-file",
        default=None,
        help="configuration_iquestloopcoder.py (default: beside --hf-modeling-file)",
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--loop-num", type=int, default=2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--torch-threads", type=int, default=os.cpu_count(), help="default: all cores, as XLA uses"
    )
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    return p.parse_args(argv)


def check_files(args):
    """Exit 2 with a message when the user-supplied modeling/config files are missing."""
    model_file = os.path.abspath(args.hf_modeling_file)
    cfg_file = args.hf_config_file or os.path.join(
        os.path.dirname(model_file), "configuration_iquestloopcoder.py"
    )
    cfg_file = os.path.abspath(cfg_file)
    for what, path in (("--hf-modeling-file", model_file), ("--hf-config-file", cfg_file)):
        if not os.path.isfile(path):
            print(
                f"decode_vs_hf: {what} {path} does not exist or is not a file. This benchmark "
                "downloads nothing: get modeling_iquestloopcoder.py and "
                "configuration_iquestloopcoder.py from the model repository "
                "(IQuestLab/IQuest-Coder-V1-40B-Loop-Instruct on the Hugging Face hub), patch "
                "defects 1-2 of DESIGN.md section 1 in your copy, and pass its path.",
                file=sys.stderr,
            )
            sys.exit(2)
    return model_file, cfg_file


def main(argv=None):
    args = parse_args(argv)
    model_file, cfg_file = check_files(args)
    if args.prompt_len > args.window:
        print(
            f"decode_vs_hf: --prompt-len {args.prompt_len} > --window {args.window}: the published "
            "file's prefill keeps only the last W local keys (defect 3); use a prompt <= W.",
            file=sys.stderr,
        )
        sys.exit(2)

    work = tempfile.mkdtemp(prefix="decode_vs_hf_")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_MODULES_CACHE"] = os.path.join(work, "hf_modules")  # not ~/.cache
    try:
        run(args, model_file, cfg_file, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, model_file, cfg_file, work):
    import jax
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from loopcoder_jax.config import RuntimeConfig, preset
    from loopcoder_jax.convert import hf_to_params, save_hf_checkpoint
    from loopcoder_jax.generate import Engine
    from tests.reference.torch_loopcoder import TorchLoopCoder

    torch.set_num_threads(args.torch_threads)
    cfg = preset("tiny").replace(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        loop_num=args.loop_num,
        loop_window_size=args.window,
        max_position_embeddings=max(2048, args.prompt_len + args.new_tokens),
    )
    # Same random weights on both sides: torch init (non-zero gates), converted to our params,
    # exported by our converter, loaded back by transformers.
    ref = TorchLoopCoder(cfg.to_hf()).init_random_(seed=0, gate_scale=0.5, std=0.05).eval()
    params = hf_to_params(cfg, {k: v.numpy() for k, v in ref.state_dict().items()})
    del ref
    hf_dir = os.path.join(work, "hf")
    save_hf_checkpoint(cfg, params, hf_dir)
    shutil.copyfile(model_file, os.path.join(hf_dir, "modeling_iquestloopcoder.py"))
    shutil.copyfile(cfg_file, os.path.join(hf_dir, "configuration_iquestloopcoder.py"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    hf_cfg["auto_map"] = {
        "AutoConfig": "configuration_iquestloopcoder.IQuestLoopCoderConfig",
        "AutoModelForCausalLM": "modeling_iquestloopcoder.IQuestLoopCoderForCausalLM",
    }
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    hf, info = AutoModelForCausalLM.from_pretrained(
        hf_dir,
        trust_remote_code=True,
        torch_dtype=torch.float32,
        attn_implementation=args.attn_implementation,
        output_loading_info=True,
    )
    hf.eval()
    # The export's generation_config.json carries the model card's sampling defaults; transformers
    # merges them into any generate() call, so greedy must be the model's own default here.
    hf.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=cfg.bos_token_id, use_cache=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"decode_vs_hf: transformers did not load every weight: {bad}")

    engine = Engine(cfg, RuntimeConfig(), length_bucket=64)
    params = engine.shard_params(params)
    rng = np.random.default_rng(0)
    n = args.new_tokens
    result = dict(
        bench="decode_vs_hf",
        model=dict(
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            loop_num=cfg.loop_num,
            window=cfg.loop_window_size,
            dtype="float32",
        ),
        device=jax.devices()[0].device_kind,
        machine="2-core CPU dev box, no accelerator" if os.cpu_count() == 2 else "",
        git_sha=git_sha(),
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        hf_attn_implementation=args.attn_implementation,
        torch_threads=args.torch_threads,
        prompt_len=args.prompt_len,
        new_tokens=n,
        repeats=args.repeats,
    )

    @torch.no_grad()
    def hf_generate(ids, new, eos):
        gc = GenerationConfig(
            do_sample=False, max_new_tokens=new, min_new_tokens=0, use_cache=True,
            eos_token_id=eos, pad_token_id=eos, bos_token_id=cfg.bos_token_id,
        )  # fmt: skip
        x = torch.tensor(ids)
        t = time.perf_counter()
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
        dt = time.perf_counter() - t
        return out[:, x.shape[1] :].tolist(), dt

    for b in (int(x) for x in args.batches.split(",")):
        prompts = rng.integers(3, cfg.vocab_size, size=(b, args.prompt_len)).tolist()
        for row in prompts:
            row[0] = cfg.bos_token_id
        first = engine.generate(params, prompts, n, eos_ids=[]).tokens  # warm-up + compile
        used = {t for row in first for t in row}
        eos = next(i for i in range(3, cfg.vocab_size) if i not in used)  # a stop id never hit

        jx = []
        for _ in range(args.repeats):
            out = engine.generate(params, prompts, n, eos_ids=[eos])
            assert all(len(t) == n for t in out.tokens), "a JAX row stopped early"
            s = out.stats
            jx.append((s["prefill_s"], s["decode_s"], out.tokens))

        hf_generate(prompts, 4, eos)  # warm-up
        hx = []
        for _ in range(args.repeats):
            toks, t_n = hf_generate(prompts, n, eos)
            _, t_1 = hf_generate(prompts, 1, eos)
            assert all(len(t) == n for t in toks), "an HF row stopped early"
            hx.append((t_1, t_n - t_1, toks))

        ours, theirs = jx[0][2], hx[0][2]
        pairs = list(zip(ours, theirs, strict=True))
        equal = sum(int(a == c) for ra, rc in pairs for a, c in zip(ra, rc, strict=True))
        prefix = [next((i for i, (a, c) in enumerate(zip(ra, rc, strict=True)) if a != c), n)
                  for ra, rc in zip(ours, theirs, strict=True)]  # fmt: skip
        med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
        j_dec = b * (n - 1) / med(jx, 1)
        h_dec = b * (n - 1) / med(hx, 1)
        j_e2e = b * n / statistics.median(r[0] + r[1] for r in jx)
        h_e2e = b * n / statistics.median(r[0] + r[1] for r in hx)
        result[f"b{b}"] = dict(
            jax_decode_tok_s=round(j_dec, 1),
            hf_decode_tok_s=round(h_dec, 1),
            decode_ratio_ours_over_hf=round(j_dec / h_dec, 2),
            jax_e2e_tok_s=round(j_e2e, 1),
            hf_e2e_tok_s=round(h_e2e, 1),
            e2e_ratio_ours_over_hf=round(j_e2e / h_e2e, 2),
            jax_decode_s=[round(r[1], 4) for r in jx],
            hf_decode_s=[round(r[1], 4) for r in hx],
            tokens_equal=f"{equal}/{b * n}",
            rows_equal=f"{sum(int(ra == rc) for ra, rc in zip(ours, theirs, strict=True))}/{b}",
            first_mismatch_per_row=prefix,
        )
        print(json.dumps({f"b{b}": result[f"b{b}"]}), file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
