"""Offline English text that every CPython install has: standard-library docstrings and pydoc topics.

Docstrings are read with `ast` from the standard library's source files (nothing is imported), so the
corpus is deterministic for a given Python version and needs no network.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

from locality.paths import cache_dir

# The topic-classification labels: which of these standard-library packages a docstring comes from.
TOPIC_PACKAGES = (
    "asyncio", "collections", "concurrent", "email", "http", "importlib", "inspect", "json", "logging",
    "multiprocessing", "tarfile", "tkinter", "unittest", "urllib", "xml",
)
MIN_CHARS = 30


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sources(package: str) -> list[Path]:
    root = _stdlib_root()
    if (root / package).is_dir():
        files = sorted((root / package).rglob("*.py"))
        return [f for f in files if not {"test", "tests", "idle_test"} & set(f.relative_to(root).parts)]
    single = root / f"{package}.py"
    return [single] if single.is_file() else []


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef))
    return [doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) >= MIN_CHARS]


def _fingerprint(text: str) -> str:
    """Near-duplicate key: lower-cased words only, first 120 characters (catches boilerplate docstrings)."""
    return re.sub(r"\W+", " ", text.lower()).strip()[:120]


@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """(package, docstring) pairs for TOPIC_PACKAGES, near-duplicates dropped (first occurrence kept).

    Parsing the standard library takes seconds, so the result is cached per Python version."""
    key = hashlib.sha1(repr((sys.version, str(_stdlib_root()), TOPIC_PACKAGES, MIN_CHARS)).encode()).hexdigest()[:12]
    path = cache_dir() / f"stdlib_docs_{key}.json"
    if path.is_file():
        return tuple(tuple(pair) for pair in json.loads(path.read_text()))
    pairs = _parse_docstrings()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(pairs))
    tmp.replace(path)
    return pairs


def _parse_docstrings() -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    pairs = []
    for package in TOPIC_PACKAGES:
        for path in _sources(package):
            for doc in _docstrings(path):
                key = _fingerprint(doc)
                if key not in seen:
                    seen.add(key)
                    pairs.append((package, doc))
    return tuple(pairs)


@lru_cache(maxsize=1)
def pydoc_paragraphs(min_chars: int = 200) -> tuple[str, ...]:
    """The Python reference documentation bundled as `pydoc_data.topics`, cut into paragraph chunks."""
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        buffer = ""
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            buffer = f"{buffer}\n\n{paragraph}".strip()
            if len(buffer) >= min_chars:
                chunks.append(buffer)
                buffer = ""
        if len(buffer) >= MIN_CHARS:
            chunks.append(buffer)
    return tuple(dict.fromkeys(chunks))
