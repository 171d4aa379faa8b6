"""Command-line errors as one clear line (with "did you mean" for unknown keys) instead of
jsonargparse's usage dump and nested Union-type reports. Values given in the config are not
repeated (a data module's arguments may hold records)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
import textwrap
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

PROG = "lit-dpvae"


def accepted_options(class_path: str) -> list[str]:
    """Constructor arguments of ``class_path`` and of its bases (jsonargparse follows
    ``**kwargs`` into the bases)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    out: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        try:
            params = inspect.signature(klass.__init__ if inspect.isclass(klass) else klass)
        except (TypeError, ValueError):
            continue
        out += [p for p in params.parameters if p not in ("self", "args", "kwargs")
                and p not in out]
    return out


def did_you_mean(given: str, options: list[str]) -> str:
    close = difflib.get_close_matches(given, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def concise_error(message: str, keys: list[str] | None = None) -> str:
    """One line for a jsonargparse error ``message``; ``keys``: the parser's option names."""
    key = re.search(r'Parser key "([\w.]+)"', message)
    where = f"{key.group(1)}: " if key else ""
    unknown = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if unknown:
        class_path, option = unknown.groups()
        name = class_path.rsplit(".", 1)[-1]
        return (f"{where}{name} has no option '{option}'"
                f"{did_you_mean(option, accepted_options(class_path))}")
    problem = _class_path_problem(message)
    if problem:
        class_path, reason = problem
        missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", reason)
        if missing:
            module, name = missing.groups()
            try:
                names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
            except ImportError:
                names = []
            return f"{where}{module} has no class '{name}'{did_you_mean(name, names)}"
        return f"{where}{class_path}: {reason.strip()}"
    unknown = re.search(r"does not accept options? '([\w.]+)'", message) or re.search(
        r'Key "([\w.]+)" is not expected', message)
    if unknown:
        option = unknown.group(1)
        return f"unknown option '{option}'{did_you_mean(option, keys or [])}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Errors:" in lines:
        bullets = [line[2:] for line in lines[lines.index("Errors:") + 1:]
                   if line.startswith("- ")]
        useful = [b for b in bullets if not b.startswith((
            "Expected a <class", "Problem with given class_path",
            "Does not validate against any of the Union subtypes"))]
        if useful:
            return where + useful[0]
        types = re.findall(r"Expected a <class '([\w.]+)'>", " ".join(bullets))
        if types:
            return f"{where}expected {' or '.join(dict.fromkeys(types))}"
    first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines or [message])[0]
    first = re.sub(r'Parser key "([\w.]+)":', r"\1:", first)
    return re.sub(r"\. Got value: .*", "", first).strip()


def _class_path_problem(message: str) -> tuple[str, str] | None:
    """``(class_path, one-line reason)`` of jsonargparse's "Problem with given class_path"
    block (its nested lines made concise in turn), or None."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        found = re.search(r"Problem with given class_path '([\w.]+)':", line)
        if not found:
            continue
        indent = len(line) - len(line.lstrip())
        nested = []
        for below in lines[i + 1:]:
            if below.strip() and len(below) - len(below.lstrip()) <= indent:
                break
            nested.append(below)
        block = textwrap.dedent("\n".join(nested)).strip()
        reason = concise_error(block) if "\n" in block else block
        return found.group(1), reason
    return None


def exit_with(message: str, subcommand: str | None = None, tip: str | None = None) -> NoReturn:
    """Print ``error: …`` and a tip (default: where to find the accepted options); exit with
    status 2."""
    command = f"{PROG} {subcommand}" if subcommand else PROG
    tip = tip or f"`{command} --help` lists the accepted options"
    sys.stderr.write(f"error: {message}\ntip: {tip}\n")
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse for our own subcommands, with the same one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        exit_with(message, tip=f"`{self.prog} --help` lists the accepted options")


class ConciseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with :func:`concise_error` instead of the usage dump."""

    #: the subcommand of the command line being parsed (for the tip), set by ``build_cli``
    subcommand_hint: str | None = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        keys = [a.dest for a in getattr(parser, "_actions", []) if isinstance(a.dest, str)]
        exit_with(concise_error(message, keys), self.subcommand_hint)
