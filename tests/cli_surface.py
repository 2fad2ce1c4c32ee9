"""The command-line surface: every flag name of every entry point, frozen in
tests/cli_surface.json so that a renamed or removed flag cannot silently
break launch scripts (as torchtitan freezes its options).

    python -m tests.cli_surface --update     # after adding or renaming a flag on purpose; commit the JSON

An entry point is a .py file at the top of the repository, under tools/ or
tasks/ with an `if __name__ == "__main__":` guard; it exposes
`build_parser()` returning its argparse parser. Keys of the JSON: the
entry point's path, "<path> <subcommand>" for sub-commands, and
"tools/checkpoint/util.py --loader|--saver <plugin>" for each checkpoint
plugin's own flags. Values: the sorted option strings (positionals as <dest>).
"""

import argparse
import glob
import importlib
import json
import os
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the entry points and our megatron.training
SURFACE_FILE = os.path.join(REPO, "tests", "cli_surface.json")
UPDATE_COMMAND = "python -m tests.cli_surface --update"
PLUGIN_HOST = "tools/checkpoint/util.py"


def entry_points() -> List[str]:
    """Repository-relative paths of the entry points (module doc)."""
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tools", "**", "*.py"),
                                                               recursive=True)
    paths += glob.glob(os.path.join(REPO, "tasks", "*.py"))
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__":' in f.read():
                found.append(os.path.relpath(path, REPO))
    return sorted(found)


def load(entry: str):
    """The entry point's module, imported by its dotted name."""
    return importlib.import_module(entry[:-3].replace(os.sep, "."))


def flags(parser: argparse.ArgumentParser) -> List[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        out += action.option_strings or [f"<{action.dest}>"]
    return sorted(out)


def _with_subcommands(key: str, parser: argparse.ArgumentParser, out: Dict[str, List[str]]) -> None:
    out[key] = flags(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _with_subcommands(f"{key} {name}", sub, out)


def collect() -> Dict[str, List[str]]:
    """{key: sorted flags} for the whole repository (module doc)."""
    from megatron.training.errors import Parser

    out: Dict[str, List[str]] = {}
    for entry in entry_points():
        module = load(entry)
        if not hasattr(module, "build_parser"):
            raise AttributeError(f"{entry} is an entry point without build_parser(): add one returning its parser, "
                                 f"then run {UPDATE_COMMAND}")
        _with_subcommands(entry, module.build_parser(), out)
    util = load(PLUGIN_HOST)
    for kind in ("loader", "saver"):
        for name in util.plugin_names(kind):
            parser = Parser(add_help=False)
            util.find_plugin(kind, name).add_arguments(parser)
            out[f"{PLUGIN_HOST} --{kind} {name}"] = flags(parser)
    return out


def read_frozen() -> Dict[str, List[str]]:
    with open(SURFACE_FILE, encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--update", action="store_true", help=f"rewrite {os.path.relpath(SURFACE_FILE, REPO)}")
    args = p.parse_args(argv)
    surface = collect()
    text = json.dumps(surface, indent=1, sort_keys=True) + "\n"
    if args.update:
        from megatron.training.fileio import atomic_write_text

        atomic_write_text(SURFACE_FILE, text)
        print(f"wrote {SURFACE_FILE}: {len(surface)} entry points and plugins, "
              f"{sum(map(len, surface.values()))} flags")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
