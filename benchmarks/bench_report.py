"""How every benchmark hands over its markdown: printed, and with --out
written aside and renamed into place, so an interrupted run never leaves a
half-written results file (the scripts in this folder import it as a sibling)."""

import os


def emit(text: str, path=None) -> None:
    print(text, flush=True)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
