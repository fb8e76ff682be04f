"""What makes a Hugging Face export self-contained, beside the weights and config.json.

`orbax-to-hf` writes, next to the safetensors shards:
  tokenizer.model, tokenizer_config.json, special_tokens_map.json
      the tokenizer as a stock transformers `LlamaTokenizer` (`data.hf_tokenizer`), carrying
      the chat template: `AutoTokenizer.from_pretrained(dir)` needs no remote code;
  generation_config.json
      the model card's sampling defaults (DESIGN.md §5) and the stop ids; a source checkpoint's
      own generation_config.json is kept as it is;
  config.json `auto_map` (loop models only)
      points at the official modeling code in its upstream model repository (`UPSTREAM_REPO`),
      referenced, never copied: transformers fetches it with `trust_remote_code=True`. Dense
      (loop_num = 1) exports are `LlamaForCausalLM` and need no code.
`hf-to-orbax` keeps the same files in the Orbax checkpoint (`copy_tokenizer_files`), so a round
trip loses nothing and `infer.py --checkpoint` finds the tokenizer and chat template there.
"""

from __future__ import annotations

import logging
import os
import shutil

from loopcoder_jax import storage
from loopcoder_jax.config import ModelConfig
from loopcoder_jax.data import hf_tokenizer as hf

log = logging.getLogger(__name__)

# The official loop model repository on the Hugging Face hub, whose configuration_*.py /
# modeling_*.py define IQuestLoopCoderForCausalLM.
UPSTREAM_REPO = "IQuestLab/IQuest-Coder-V1-40B-Loop-Instruct"
_CONFIG_CLASS = "configuration_iquestloopcoder.IQuestLoopCoderConfig"
_MODEL_CLASS = "modeling_iquestloopcoder.IQuestLoopCoderForCausalLM"
# Model card sampling defaults for the instruct models (DESIGN.md §5).
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.85, "top_k": 20}


def auto_map(cfg: ModelConfig) -> dict[str, str] | None:
    """config.json `auto_map` for a loop model ("repo--module.Class" references), else None."""
    if cfg.loop_num == 1:
        return None
    return {
        "AutoConfig": f"{UPSTREAM_REPO}--{_CONFIG_CLASS}",
        "AutoModelForCausalLM": f"{UPSTREAM_REPO}--{_MODEL_CLASS}",
    }


def generation_config(cfg: ModelConfig, tok=None) -> dict:
    """generation_config.json: sampling defaults, BOS/pad, and the stop ids (the config's
    eos_token_id, else the tokenizer's stop ids)."""
    eos = list(cfg.eos_token_id) or (list(tok.stop_ids) if tok is not None else [])
    out = {**SAMPLING_DEFAULTS, "bos_token_id": cfg.bos_token_id}
    if eos:
        out["eos_token_id"] = eos
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    elif tok is not None:
        out["pad_token_id"] = tok.pad_id
    return out


def find_tokenizer_dir(*candidates: str | os.PathLike | None) -> str | None:
    """The first candidate directory holding a tokenizer.model (a file path means its dir)."""
    for c in candidates:
        if c is None:
            continue
        c = os.fspath(c)
        directory = c if os.path.isdir(c) else os.path.dirname(os.path.abspath(c))
        if os.path.isfile(os.path.join(directory, hf.TOKENIZER_MODEL)):
            return directory
    return None


def write_extras(directory: str, cfg: ModelConfig, tokenizer_dir: str | None) -> list[str]:
    """Writes the tokenizer files and generation_config.json into an export `directory`.

    tokenizer_dir: where tokenizer.model (and its HF files, if any) are; None: no tokenizer is
    exported (a one-line note says so).
    """
    from loopcoder_jax.data.tokenizer import load_tokenizer

    written = []
    tok = None
    if tokenizer_dir is None:
        log.warning(
            "note: no tokenizer.model found: the export has no tokenizer files; pass "
            "--tokenizer DIR_OR_FILE to include them."
        )
    else:
        tok = load_tokenizer(tokenizer_dir)
        written += hf.write_hf_files(directory, tok, cfg.max_position_embeddings)
    src_gen = os.path.join(tokenizer_dir, hf.GENERATION_CONFIG) if tokenizer_dir else None
    dst_gen = os.path.join(directory, hf.GENERATION_CONFIG)
    if src_gen and os.path.isfile(src_gen):
        shutil.copyfile(src_gen, dst_gen)
    else:
        hf.write_json(dst_gen, generation_config(cfg, tok))
    written.append(hf.GENERATION_CONFIG)
    return written


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the tokenizer files and generation_config.json that `src_dir` has (plain files
    only) into `dst_dir`; returns their names."""
    from loopcoder_jax.safetensors_io import SafetensorsError, checked_member

    copied = []
    for name in (*hf.TOKENIZER_FILES, hf.GENERATION_CONFIG):
        if not os.path.lexists(os.path.join(src_dir, name)):
            continue
        try:  # a plain file inside the checkpoint (or its HF cache blobs), never a FIFO
            src = checked_member(src_dir, name)
        except SafetensorsError as e:
            log.warning("note: %s not copied: %s", name, e)
            continue
        if os.path.isfile(src):
            dst = storage.join(dst_dir, name)  # dst_dir may be a gs:// checkpoint
            storage.copy_file(src, dst)
            if not storage.is_remote(dst):
                os.chmod(dst, 0o644)
            copied.append(name)
    return copied
