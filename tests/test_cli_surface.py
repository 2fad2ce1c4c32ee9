"""Every entry point's command line: its flag names are the frozen ones
(tests/cli_surface.json), so a renamed flag cannot silently break launch
scripts, and `--help` works for each of them (sub-commands and checkpoint
plugins included)."""

import contextlib
import io

from tests.cli_surface import PLUGIN_HOST, UPDATE_COMMAND, collect, entry_points, load, read_frozen


def test_every_flag_name_is_the_frozen_one():
    frozen, now = read_frozen(), collect()
    problems = []
    for key in sorted(set(frozen) | set(now)):
        if key not in now:
            problems.append(f"{key} is gone")
        elif key not in frozen:
            problems.append(f"{key} is new")
        else:
            removed = sorted(set(frozen[key]) - set(now[key]))
            added = sorted(set(now[key]) - set(frozen[key]))
            if removed:
                problems.append(f"{key} lost {' '.join(removed)}")
            if added:
                problems.append(f"{key} gained {' '.join(added)}")
    assert not problems, ("; ".join(problems) + f". Scripts may use these flags: if the change is on purpose, run "
                          f"{UPDATE_COMMAND} and commit tests/cli_surface.json")


def _help(key):
    """(exit status, stdout) of `<entry point> [subcommand | --loader/--saver NAME] --help`, in this process."""
    entry, *words = key.split(" ")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            load(entry).main(words + ["--help"])
            code = "no exit"
        except SystemExit as e:
            code = e.code
    return code, out.getvalue()


def test_help_works_for_every_entry_point_subcommand_and_plugin():
    surface = collect()
    assert {"pretrain_gpt.py", "finetune_gpt.py", "finetune.py", "tasks/main.py", PLUGIN_HOST,
            "tools/preprocess_data.py"} <= set(entry_points())
    failures = []
    for key, flags in sorted(surface.items()):
        code, text = _help(key)
        missing = [f for f in flags if not f.startswith("<") and f not in text]
        if code not in (0, None) or "usage:" not in text or missing:
            failures.append(f"{key}: exit status {code}, flags missing from the help: {missing}")
    assert not failures, "\n".join(failures)
