"""Word-class tags for the offline token-classification task.

Every word of a text gets one of five classes, decided by its form alone, so any English/Python text
becomes a token-level task without annotation:

    word        lower-case English word          ("returns", "the")
    capitalized capitalized word                 ("Return", "Python")
    identifier  code-like token                  ("sys.path", "get_value", "__init__", "None", "len()")
    number      digits                           ("3", "0x1F", "1.5")
    punct       punctuation or symbol            (",", "(", ">>>")
"""

from __future__ import annotations

import re

TAGS = ("word", "capitalized", "identifier", "number", "punct")
_WORD_RE = re.compile(r"\w+(?:[.]\w+)*(?:\(\))?|[^\w\s]+")
_NUMBER_RE = re.compile(r"(?:0[xob])?[\d_]+(?:\.\d+)?(?:e[+-]?\d+)?", re.IGNORECASE)
_PY_NAMES = {"None", "True", "False", "self", "cls", "kwargs", "args"}


def word_class(word: str) -> int:
    if not (word[0].isalnum() or word[0] == "_"):
        return TAGS.index("punct")
    if _NUMBER_RE.fullmatch(word):
        return TAGS.index("number")
    if (
        "_" in word
        or "." in word
        or word.endswith("()")
        or word in _PY_NAMES
        or any(c.isupper() for c in word[1:])
        or any(c.isdigit() for c in word)
    ):
        return TAGS.index("identifier")
    return TAGS.index("capitalized") if word[0].isupper() else TAGS.index("word")


def tag_spans(text: str) -> list[tuple[int, int, int]]:
    """(start, end, tag) for every word of `text`, in order."""
    return [(m.start(), m.end(), word_class(m.group())) for m in _WORD_RE.finditer(text)]
