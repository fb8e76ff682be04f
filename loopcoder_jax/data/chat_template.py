"""Chat templates: a checkpoint's own Jinja template, rendered the way transformers renders it,
or ChatML when the checkpoint has none.

transformers' `apply_chat_template` compiles the template in a jinja2 *sandboxed* environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps
non-ASCII text, and the globals `raise_exception` and `strftime_now`; it renders with `messages`,
`add_generation_prompt`, `tools`, `documents` and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...). `render_chat` does the same, so a template gives the text transformers gives.
A template is data from a checkpoint: the sandbox keeps it from reaching Python internals.

Public API:
  render_chat(messages, template=None, add_generation_prompt=True, special_tokens=None, **extra)
  chatml(messages, add_generation_prompt=True)   the built-in template, as a Python function
  CHATML_JINJA                                   the same template as Jinja (written on export)
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence

# Renders exactly what `chatml` returns (tests/data/test_hf_tokenizer.py checks it).
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template or the messages given to it are unusable; the message says why."""


def _check_messages(messages: Sequence[Mapping]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(
                f"message {i} must be a dict with a string 'role' (and 'content'), got {message!r}."
            )


def chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then (when
    `add_generation_prompt`) `<|im_start|>assistant\\n` for the model to continue."""
    parts = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise ChatTemplateError(
                f"message {i} must be a dict with string 'role' and 'content', got {message!r}."
            )
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _generation_tag():
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant spans for
    training masks with it): rendered as its plain body."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_tag()],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the checkpoint's chat template does not compile: {e}") from None


def render_chat(
    messages: Sequence[Mapping],
    template: str | None = None,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, object] | None = None,
    **extra,
) -> str:
    """The prompt text of a conversation.

    Args:
      messages: `[{"role": ..., "content": ...}, ...]`.
      template: a Jinja chat template (a checkpoint's `chat_template`), or None for ChatML.
      add_generation_prompt: end with the assistant turn's opening for the model to continue.
      special_tokens: template variables such as `bos_token` / `eos_token` (what transformers
        passes from the tokenizer's special tokens).
      extra: more template variables (e.g. `tools`, `documents`, `enable_thinking`).
    """
    if template is None:
        return chatml(messages, add_generation_prompt)
    import jinja2

    _check_messages(messages)
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **extra}
    try:
        return _compile(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"rendering the chat template failed: {e}") from None
