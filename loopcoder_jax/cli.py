"""Conventions shared by every command line of the package (`--help` a newcomer can use).

Every CLI module defines `build_parser() -> argparse.ArgumentParser` (its `main` parses with it)
and passes `formatter_class=HelpFormatter`. Then each option's help line ends with its default:
`(default: 8)` is appended automatically; a flag shows `(default: off)`; a required option
`(required)`. An option whose default is None must say in its help what None means, with the
word "default" (e.g. "tokenizer.model path (default: the one shipped in the package)").
`tests/test_cli_help.py` walks every parser in the package and checks all of this.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings:  # positionals: nothing to default
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            on = isinstance(action, argparse._StoreFalseAction)
            return f"{text} (default: {'on' if on else 'off'})"
        if action.default is None:
            return text  # the help must say what None means (the test requires "default")
        if action.default in ([], ()):
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"
