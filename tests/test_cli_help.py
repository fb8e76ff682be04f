"""Every command line of the project has a help line per option that shows its default.

Convention (loopcoder_jax/cli.py): a CLI module defines `build_parser()` returning its
`argparse.ArgumentParser` (subcommands included) and uses `formatter_class=cli.HelpFormatter`.
This test finds every module of the package that builds an ArgumentParser (and the top-level
train.py / infer.py), so a new CLI is checked as soon as it exists.
"""

import argparse
import importlib
import importlib.util
import os

import pytest

import loopcoder_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.dirname(os.path.abspath(loopcoder_jax.__file__))
SCRIPTS = ("train.py", "infer.py")


def _cli_modules() -> list[str]:
    """Dotted names of the package modules whose source builds an ArgumentParser."""
    found = []
    for root, _, files in os.walk(PKG):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and "ArgumentParser(" in open(path).read():
                rel = os.path.relpath(path, os.path.dirname(PKG))[: -len(".py")]
                found.append(rel.replace(os.sep, "."))
    return sorted(found)


def _load(target: str):
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(target[:-3], os.path.join(REPO, target))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def _parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) for the parser and, recursively, each of its subcommands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


CLIS = [*SCRIPTS, *_cli_modules()]


def test_known_clis_are_found():
    for name in ("ablations", "aot", "convert", "data.codeflow", "data.pipeline",
                 "data.tokenizer", "data.build_assets"):  # fmt: skip
        assert f"loopcoder_jax.{name}" in CLIS


@pytest.mark.parametrize("target", CLIS)
def test_every_option_has_help_that_shows_its_default(target):
    module = _load(target)
    assert hasattr(module, "build_parser"), (
        f"{target} builds an argparse parser but has no build_parser(); define "
        "`build_parser() -> argparse.ArgumentParser` (see loopcoder_jax/cli.py)"
    )
    problems = []
    for name, parser in _parsers(module.build_parser(), target):
        parser.format_help()  # renders without error (e.g. no stray % in a help string)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{label}: no help line")
                continue
            if action.option_strings:
                text = formatter._expand_help(action).lower()
                if "default" not in text and "(required)" not in text:
                    problems.append(f"{label}: help does not show the default: {text!r}")
    assert not problems, "\n".join(problems)
