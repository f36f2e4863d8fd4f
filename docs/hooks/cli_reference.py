"""MkDocs hook: the CLI reference page, rendered from the argparse parser at build time.

`docs/cli.md` holds the marker `<!-- cli-reference -->`; on build it is replaced by one section per
subcommand of `trimprune.cli.build_parser()` (prune, eval, report, export, sweep), each with one table per
argument group: flags, argument, default, choices, help. Nothing here is hand-written, so the page
cannot drift from the parser. `trimprune.cli` imports torch lazily: the build needs no torch.
"""
from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
SRC = Path(__file__).resolve().parents[2] / "src"   # the repository's own source, ahead of any installed copy


def _parser() -> argparse.ArgumentParser:
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from trimprune.cli import build_parser
    return build_parser()


def _config_defaults() -> dict:
    """The pruning flags default to None in argparse (a recipe's value stays in place); their real
    defaults are PruneConfig's."""
    from trimprune.config import PruneConfig
    return PruneConfig().to_flat()


def _cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _code(text) -> str:
    return f"<code>{_cell(text)}</code>"


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


def _default(action: argparse.Action, config_defaults: dict) -> str | None:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)):
        return None                                  # a switch: its help says what it turns on or off
    default = action.default
    if default is None and action.dest in config_defaults:
        default = config_defaults[action.dest]
    if default is None or default is False or default == [] or default is argparse.SUPPRESS:
        return None
    return str(default)


def _help(action: argparse.Action, default: str | None) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": ""}
    suffix = f" (default {default})"
    if default is not None and text.endswith(suffix):     # the generated pruning flags repeat it
        text = text[: -len(suffix)]
    return text


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return ""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        meta = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    else:
        meta = action.dest.upper()          # the choices have their own column
    if action.nargs == "?":
        return f"[{meta}]"
    if action.nargs == "+":
        return f"{meta} [{meta} ...]"
    if action.nargs == "*":
        return f"[{meta} ...]"
    return meta


def _table(actions, config_defaults: dict) -> list[str]:
    rows = ["| flag | argument | default | choices | description |", "|---|---|---|---|---|"]
    for a in actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        names = ", ".join(_code(s) for s in a.option_strings)
        if not names:                        # a positional argument
            meta = a.metavar or a.dest
            names = _code(f"{meta} [{meta} ...]" if a.nargs == "+" else meta)
        required = " (required)" if a.required and a.option_strings else ""
        default = _default(a, config_defaults)
        choices = ", ".join(_code(c) for c in a.choices) if a.choices is not None else ""
        arg = _argument(a)
        rows.append(f"| {names}{required} | {_code(arg) if arg else ''} | {_code(default) if default else ''} "
                    f"| {choices} | {_cell(_help(a, default))} |")
    return rows


def render() -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"           # argparse wraps the usage lines to the terminal: a fixed width
    try:
        return _render()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _render() -> str:
    parser = _parser()
    config_defaults = _config_defaults()
    top = [a for a in parser._actions
           if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    out = ["## `trimprune`", "", _cell(parser.description or ""), "", "```text", parser.format_usage().strip(),
           "```", ""] + _table(top, config_defaults) + [""]
    for name, summary, sub in _subcommands(parser):
        out += [f"## `trimprune {name}`", "", _cell(summary[:1].upper() + summary[1:]) + ".", "", "```text",
                sub.format_usage().strip(), "```", ""]
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"options": "options", "positional arguments": "arguments"}.get(group.title, group.title)
            out += [f"### {name}: {title}", ""] + _table(actions, config_defaults) + [""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
