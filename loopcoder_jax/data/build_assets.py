"""Regenerates the shipped data assets, deterministically:

    loopcoder_jax/assets/corpus.jsonl       ~1 MB of generated code, JSONL `{"text": ...}` records
    loopcoder_jax/assets/chat_sample.jsonl  small generated chat-SFT set (`{"messages": [...]}`)
    loopcoder_jax/assets/tokenizer.model    SentencePiece BPE, vocab 512, special tokens reserved;
                                            no byte fallback (covers every printable ASCII
                                            character, tab and newline; others become <unk>)

    python -m loopcoder_jax.data.build_assets [--output-dir DIR] [--seed 0]

Every text is produced here by templates and a seeded `random.Random`: no third-party code is
copied. The code is small, regular Python (plus some JavaScript, shell, YAML and Markdown), enough
for a tiny model to show a clearly falling loss and for the tokenizer to learn code pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import uuid
from collections.abc import Callable

from loopcoder_jax.data.tokenizer import train_tokenizer

CORPUS_FILE = "corpus.jsonl"
CHAT_FILE = "chat_sample.jsonl"
TOKENIZER_PREFIX = "tokenizer"
VOCAB_SIZE = 512  # preset("tiny").vocab_size

NOUNS = (
    "item count value total price name index buffer node edge path token score weight batch "
    "user order record entry queue stack cache key result size limit offset row column matrix "
    "vector point line block chunk frame packet event task job worker config option field "
    "label text word char byte step epoch loss rate seed shape layer head mask grid cell"
).split()
VERBS = (
    "get set load save parse build make compute update apply merge split find filter sort "
    "count check validate normalize encode decode read write send fetch reset scale clip pad "
    "pack render format collect group flatten reverse resize"
).split()
TYPES = ("int", "float", "str", "bool", "list[int]", "dict[str, int]", "list[str]")
MODULES = ("os", "sys", "json", "math", "re", "time", "random", "itertools", "functools")


def _name(rng: random.Random, parts: int = 2) -> str:
    return "_".join(rng.choice(NOUNS) for _ in range(parts))


def _camel(rng: random.Random) -> str:
    return "".join(w.capitalize() for w in (rng.choice(NOUNS), rng.choice(NOUNS)))


def _expr(rng: random.Random, names: list[str], depth: int = 0) -> str:
    choice = rng.random()
    if depth > 1 or choice < 0.35:
        return rng.choice(names) if rng.random() < 0.7 else str(rng.randint(0, 99))
    op = rng.choice(["+", "-", "*", "//", "%", "+", "*"])
    left, right = _expr(rng, names, depth + 1), _expr(rng, names, depth + 1)
    if rng.random() < 0.2:
        return f"({left} {op} {right})"
    return f"{left} {op} {right}"


def _cond(rng: random.Random, names: list[str]) -> str:
    op = rng.choice(["<", ">", "==", "!=", "<=", ">="])
    return f"{rng.choice(names)} {op} {_expr(rng, names, 1)}"


def _body(rng: random.Random, names: list[str], indent: str, depth: int = 0) -> list[str]:
    lines: list[str] = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.random()
        if kind < 0.35 or depth > 1:
            target = _name(rng, 1)
            lines.append(f"{indent}{target} = {_expr(rng, names)}")
            names.append(target)
        elif kind < 0.55:
            lines.append(f"{indent}if {_cond(rng, names)}:")
            lines += _body(rng, list(names), indent + "    ", depth + 1)
            if rng.random() < 0.5:
                lines.append(f"{indent}else:")
                lines += _body(rng, list(names), indent + "    ", depth + 1)
        elif kind < 0.75:
            var = rng.choice(["i", "j", "k", "x", "item", "value"])
            seq = rng.choice(
                [
                    f"range({rng.randint(1, 10)})",
                    rng.choice(names),
                    f"range(len({rng.choice(names)}))",
                ]
            )
            lines.append(f"{indent}for {var} in {seq}:")
            lines += _body(rng, names + [var], indent + "    ", depth + 1)
        elif kind < 0.85:
            target = _name(rng, 1) + "s"
            var = rng.choice(["x", "v", "n"])
            lines.append(
                f"{indent}{target} = [{var} * {rng.randint(2, 9)} for {var} in "
                f"range({rng.randint(3, 20)}) if {var} % {rng.randint(2, 5)} == 0]"
            )
            names.append(target)
        else:
            lines.append(f"{indent}{_name(rng, 1)}s.append({_expr(rng, names, 1)})")
    return lines


def gen_function(rng: random.Random) -> str:
    fname = f"{rng.choice(VERBS)}_{_name(rng, rng.randint(1, 2))}"
    args = sorted({_name(rng, 1) for _ in range(rng.randint(1, 3))})
    typed = ", ".join(f"{a}: {rng.choice(TYPES[:3])}" for a in args)
    out = [f"def {fname}({typed}) -> {rng.choice(TYPES[:3])}:"]
    out.append(f'    """{rng.choice(VERBS).capitalize()} the {rng.choice(NOUNS)} of {args[0]}."""')
    names = list(args)
    out += _body(rng, names, "    ")
    out.append(f"    return {_expr(rng, names)}")
    return "\n".join(out) + "\n"


def gen_class(rng: random.Random) -> str:
    cls = _camel(rng)
    fields = sorted({_name(rng, 1) for _ in range(rng.randint(2, 4))})
    out = ["@dataclasses.dataclass", f"class {cls}:", f'    """A {cls.lower()} record."""', ""]
    for f in fields:
        t = rng.choice(TYPES)
        default = {"int": "0", "float": "0.0", "str": '""', "bool": "False"}.get(
            t,
            "dataclasses.field(default_factory="
            + ("list" if t.startswith("list") else "dict")
            + ")",
        )
        out.append(f"    {f}: {t} = {default}")
    for _ in range(rng.randint(1, 3)):
        method = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
        arg = _name(rng, 1)
        out += ["", f"    def {method}(self, {arg}):"]
        names = [arg] + [f"self.{f}" for f in fields]
        out += _body(rng, names, "        ")
        out.append(f"        return {_expr(rng, names)}")
    return "\n".join(out) + "\n"


def gen_test(rng: random.Random) -> str:
    fname = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    a, b = rng.randint(0, 50), rng.randint(1, 50)
    op, result = rng.choice([("+", a + b), ("*", a * b), ("-", a - b), ("//", a // b)])
    return (
        f"def test_{fname}():\n"
        f"    {rng.choice(NOUNS)} = {a}\n"
        f"    assert {fname}({a}, {b}) == {result}\n"
        f"    assert {a} {op} {b} == {result}\n"
    )


ALGORITHMS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: (
        f"def {r.choice(['search', 'bisect', 'find_index'])}"
        f"({(xs := _name(r, 1) + 's')}, target):\n"
        f"    lo, hi = 0, len({xs})\n"
        f"    while lo < hi:\n"
        f"        mid = (lo + hi) // 2\n"
        f"        if {xs}[mid] < target:\n"
        f"            lo = mid + 1\n"
        f"        else:\n"
        f"            hi = mid\n"
        f"    return lo\n"
    ),
    lambda r: (
        f"def {r.choice(['gcd', 'greatest_divisor', 'common_factor'])}(a: int, b: int) -> int:\n"
        f"    while b:\n"
        f"        a, b = b, a % b\n"
        f"    return a\n"
    ),
    lambda r: (
        f"def {r.choice(['fib', 'fibonacci', 'nth_fib'])}(n: int) -> int:\n"
        f"    a, b = 0, 1\n"
        f"    for _ in range(n):\n"
        f"        a, b = b, a + b\n"
        f"    return a\n"
    ),
    lambda r: (
        f"class {_camel(r)}Stack:\n"
        f"    def __init__(self):\n"
        f"        self._{(v := r.choice(NOUNS))}s = []\n\n"
        f"    def push(self, {v}):\n"
        f"        self._{v}s.append({v})\n\n"
        f"    def pop(self):\n"
        f"        if not self._{v}s:\n"
        f'            raise IndexError("pop from an empty stack")\n'
        f"        return self._{v}s.pop()\n\n"
        f"    def __len__(self):\n"
        f"        return len(self._{v}s)\n"
    ),
    lambda r: (
        f"def {r.choice(VERBS)}_{(n := r.choice(NOUNS))}_counts({n}s):\n"
        f"    counts = {{}}\n"
        f"    for {n} in {n}s:\n"
        f"        counts[{n}] = counts.get({n}, 0) + 1\n"
        f"    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))\n"
    ),
    lambda r: (
        f"def {r.choice(VERBS)}_file(path: str) -> list[str]:\n"
        f'    with open(path, encoding="utf-8") as f:\n'
        f"        return [line.rstrip() for line in f if line.strip()]\n"
    ),
)


def gen_python_module(rng: random.Random) -> str:
    imports = sorted(rng.sample(MODULES, rng.randint(1, 3)))
    parts = [
        f'"""{rng.choice(VERBS).capitalize()} {rng.choice(NOUNS)}s and {rng.choice(NOUNS)}s."""',
        "",
    ]
    parts += ["import dataclasses"] + [f"import {m}" for m in imports] + ["", ""]
    constant = _name(rng, 2).upper()
    parts.append(f"{constant} = {rng.randint(1, 1024)}\n\n")
    pieces = []
    for _ in range(rng.randint(2, 6)):
        kind = rng.random()
        if kind < 0.45:
            pieces.append(gen_function(rng))
        elif kind < 0.7:
            pieces.append(gen_class(rng))
        elif kind < 0.85:
            pieces.append(rng.choice(ALGORITHMS)(rng))
        else:
            pieces.append(gen_test(rng))
    parts.append("\n\n".join(pieces))
    if rng.random() < 0.3:
        parts.append(f'\nif __name__ == "__main__":\n    print({constant})\n')
    return "\n".join(parts)


def gen_javascript(rng: random.Random) -> str:
    fname = rng.choice(VERBS) + rng.choice(NOUNS).capitalize()
    arg = rng.choice(NOUNS)
    return (
        f"function {fname}({arg}s) {{\n"
        f"  const result = [];\n"
        f"  for (const {arg} of {arg}s) {{\n"
        f"    if ({arg} {rng.choice(['>', '<', '!=='])} {rng.randint(0, 9)}) {{\n"
        f"      result.push({arg} * {rng.randint(2, 9)});\n"
        f"    }}\n"
        f"  }}\n"
        f"  return result;\n"
        f"}}\n\n"
        f"module.exports = {{ {fname} }};\n"
    )


def gen_config(rng: random.Random) -> str:
    if rng.random() < 0.5:
        lines = [f"{_name(rng, 1)}:"]
        for _ in range(rng.randint(2, 6)):
            lines.append(f"  {_name(rng, 2)}: {rng.choice([rng.randint(0, 512), 'true', 'false'])}")
        return "\n".join(lines) + "\n"
    obj = {_name(rng, 1): rng.randint(0, 100) for _ in range(rng.randint(2, 5))}
    return json.dumps(obj, indent=2) + "\n"


def gen_shell(rng: random.Random) -> str:
    var = _name(rng, 1).upper()
    return (
        "#!/usr/bin/env bash\n"
        "set -euo pipefail\n"
        f'{var}="${{1:-{rng.choice(NOUNS)}}}"\n'
        f'for f in "${var}"/*.py; do\n'
        f'  echo "{rng.choice(VERBS)} $f"\n'
        "done\n"
    )


def gen_makefile(rng: random.Random) -> str:
    target = rng.choice(VERBS)
    return (
        f".PHONY: {target} clean\n\n"
        f"{target}:\n\tpython -m {_name(rng, 1)} --{rng.choice(NOUNS)} $(ARGS)\n\n"
        f"clean:\n\trm -rf build/ *.tmp\n"
    )


def gen_go(rng: random.Random) -> str:
    fname = rng.choice(VERBS).capitalize() + rng.choice(NOUNS).capitalize()
    arg = rng.choice(NOUNS)
    return (
        "package main\n\n"
        f"func {fname}({arg}s []int) int {{\n"
        "\ttotal := 0\n"
        f"\tfor _, {arg} := range {arg}s {{\n"
        f"\t\tif {arg} {rng.choice(['>', '<', '!='])} {rng.randint(0, 9)} {{\n"
        f"\t\t\ttotal += {arg}\n"
        "\t\t}\n\t}\n\treturn total\n}\n"
    )


def gen_charset(rng: random.Random) -> str:
    # Every printable ASCII character, tab and CR LF appear in the corpus, so the shipped
    # tokenizer (no byte fallback at vocab 512) round-trips any ASCII text.
    chars = "".join(chr(c) for c in range(32, 127))
    return f"PRINTABLE = {chars!r}\r\nESCAPED = {json.dumps(chars)}\r\nTAB = '\t'\r\n"


def gen_markdown(rng: random.Random) -> str:
    title = f"{rng.choice(VERBS).capitalize()} {rng.choice(NOUNS)}s"
    return (
        f"# {title}\n\n"
        f"Call `{rng.choice(VERBS)}_{rng.choice(NOUNS)}()` to {rng.choice(VERBS)} each "
        f"{rng.choice(NOUNS)} before you {rng.choice(VERBS)} the {rng.choice(NOUNS)}.\n\n"
        f"```python\n{rng.choice(ALGORITHMS)(rng)}```\n"
    )


def generate_corpus(seed: int = 0, target_bytes: int = 1_000_000) -> list[str]:
    """Documents of generated code, ~`target_bytes` of text, the same for the same seed."""
    rng = random.Random(seed)
    makers = [gen_python_module] * 7 + [gen_javascript, gen_config, gen_shell, gen_markdown]
    makers += [gen_makefile, gen_go]
    docs, total = [gen_charset(rng)], 0
    while total < target_bytes:
        doc = rng.choice(makers)(rng)
        docs.append(doc)
        total += len(doc)
    return docs


def generate_chat(seed: int = 0, n: int = 200) -> list[list[dict[str, str]]]:
    """Chat conversations asking for small functions; the assistant answers with code."""
    rng = random.Random(seed + 1)
    convs = []
    for _ in range(n):
        algo = rng.choice(ALGORITHMS)(rng)
        name = algo.split("(")[0].split()[-1]
        conv = []
        if rng.random() < 0.5:
            conv.append({"role": "system", "content": "You are a helpful coding assistant."})
        conv.append({"role": "user", "content": f"Write a Python function `{name}`."})
        conv.append({"role": "assistant", "content": f"```python\n{algo}```"})
        convs.append(conv)
    return convs


def _write_jsonl_atomic(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_assets(output_dir: str, seed: int = 0) -> dict[str, str]:
    """Writes corpus, chat sample and tokenizer into `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    corpus = os.path.join(output_dir, CORPUS_FILE)
    chat = os.path.join(output_dir, CHAT_FILE)
    _write_jsonl_atomic(corpus, [{"text": d} for d in generate_corpus(seed)])
    _write_jsonl_atomic(chat, [{"messages": c} for c in generate_chat(seed)])
    model = train_tokenizer(
        [corpus, chat],
        VOCAB_SIZE,
        os.path.join(output_dir, TOKENIZER_PREFIX),
        byte_fallback=False,  # 256 byte pieces would leave only ~150 merges at vocab 512
        num_threads=1,
    )
    vocab = os.path.join(output_dir, TOKENIZER_PREFIX + ".vocab")
    if os.path.exists(vocab):
        os.remove(vocab)  # human-readable duplicate of the .model; not shipped
    return {"corpus": corpus, "chat": chat, "tokenizer": model}


def build_parser() -> argparse.ArgumentParser:
    """The `python -m loopcoder_jax.data.build_assets` command line."""
    from loopcoder_jax.cli import HelpFormatter

    default_dir = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets"
    )
    parser = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.data.build_assets",
        description="Regenerate the shipped corpus, chat sample and tokenizer (deterministic).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output-dir", default=default_dir, help="where the assets are written")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = build_assets(args.output_dir, args.seed)
    for kind, path in paths.items():
        print(f"{kind}: {path} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
