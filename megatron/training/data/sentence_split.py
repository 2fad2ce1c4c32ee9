"""Sentence splitting for `--split-sentences`, offline.

NLTK's punkt model is used when its data is installed (`punkt_tab/<lang>`
found on nltk.data.path, e.g. after `python -m nltk.downloader punkt_tab`
on a machine with internet, or NLTK_DATA pointing at a copy). Nothing is
ever downloaded at run time. Without the data (or without nltk), a built-in
rule-based splitter is used and the tool says so once:

    a sentence ends at `.`, `!` or `?` (optionally followed by closing quotes
    or brackets) when whitespace follows and the next word starts with an
    upper-case letter, a digit or an opening quote/bracket, unless the word
    ending in `.` is a common abbreviation (Mr., Dr., e.g., i.e., etc., ...)
    or a single letter (initials, "U.S.").

With `keep_newlines` the whitespace after a sentence stays at its end (so
newlines survive, as Megatron-LM's `--keep-newlines` does); otherwise
sentences are stripped.
"""

import importlib.util
import os
import re
import sys
from typing import Callable, List

_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "al",
    "fig", "no", "vol", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec", "approx", "dept", "est", "min", "max",
}
_BOUNDARY = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*(\s+)(?=["'\u201c\u2018(\[]?[A-Z0-9])""")
_WORD_BEFORE = re.compile(r"(\S+)$")


def regex_split(text: str, keep_newlines: bool = False) -> List[str]:
    """The built-in fallback splitter (rules in the module docstring)."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        word = _WORD_BEFORE.search(text, start, m.start() + 1)
        token = word.group(1).rstrip(".!?\"')]\u201d\u2019").lower() if word else ""
        if text[m.start()] == "." and (token in _ABBREVIATIONS or len(token.split(".")[-1]) == 1):
            continue
        end = m.end() if keep_newlines else m.start(1)
        sentences.append(text[start:end])
        start = m.end()
    sentences.append(text[start:])
    if not keep_newlines:
        sentences = [s.strip() for s in sentences]
    return [s for s in sentences if s]


def _nltk_data_dirs() -> List[str]:
    # nltk.data.path's defaults, read without importing nltk (which takes ~2 s)
    dirs = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    dirs.append(os.path.expanduser("~/nltk_data"))
    dirs += [os.path.join(sys.prefix, sub) for sub in ("nltk_data", "share/nltk_data", "lib/nltk_data")]
    dirs += ["/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    return dirs


def punkt_available(lang: str = "english") -> bool:
    if importlib.util.find_spec("nltk") is None:
        return False
    return any(os.path.isdir(os.path.join(d, "tokenizers", "punkt_tab", lang)) for d in _nltk_data_dirs())


def build_splitter(lang: str = "english", keep_newlines: bool = False) -> Callable[[str], List[str]]:
    """A function text -> sentences: punkt when installed, else `regex_split`."""
    if not punkt_available(lang):
        return lambda text: regex_split(text, keep_newlines)
    from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer, PunktTokenizer

    punkt = PunktTokenizer(lang)
    if not keep_newlines:
        return punkt.tokenize

    class _KeepWhitespace(PunktLanguageVars):
        # the stock pattern requires whitespace after a sentence end and leaves it
        # out of the sentence; allowing \s* inside keeps newlines with the sentence
        _period_context_fmt = r"""
            \S*
            %(SentEndChars)s
            \s*
            (?=(?P<after_tok>
                %(NonWord)s
                |
                (?P<next_tok>\S+)
            ))"""

    keeping = PunktSentenceTokenizer(train_text=punkt._params, lang_vars=_KeepWhitespace())
    return keeping.tokenize


def splitter_description(lang: str = "english") -> str:
    if punkt_available(lang):
        return f"NLTK punkt ({lang})"
    return ("built-in rule-based splitter (NLTK punkt data not installed; install it with "
            f"`python -m nltk.downloader punkt_tab` to use punkt for {lang})")
