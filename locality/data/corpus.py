"""Offline English text that every CPython install has: standard-library docstrings and pydoc topics.

Docstrings are read with `ast` from the standard library's source files (nothing is imported), so the
corpus is deterministic for a given Python version and needs no network.

Pretraining and fine-tuning text never overlap. The offline pretraining corpus of the tiny presets
(`python -m locality.pretrain`, `pretraining_texts()`) is every `pydoc_topics` paragraph plus the
standard-library docstrings in the *pretraining part*: a fixed one in `PRETRAIN_SHARE` of them, chosen by
a salted hash of the docstring's text (`in_pretraining_part`), so the choice depends on nothing but the
text. The `stdlib_docs` fine-tuning dataset is the other docstrings (`finetuning_docstrings()`); near-
duplicates were dropped before the split, so no docstring has a twin on the other side, and no docstring
occurs inside a pydoc paragraph. `pydoc_topics` is pretraining text: fine-tuning a pretrained tiny model on
it continues pretraining on seen text. (The `corpus_bpe` tokenizer's merges are learned from all of this
text, the fine-tuning docstrings included: a vocabulary, no weights.)
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

from locality.core.paths import cache_dir

# The topic-classification labels: which of these standard-library packages a docstring comes from.
TOPIC_PACKAGES = (
    "asyncio",
    "collections",
    "concurrent",
    "email",
    "http",
    "importlib",
    "inspect",
    "json",
    "logging",
    "multiprocessing",
    "tarfile",
    "tkinter",
    "unittest",
    "urllib",
    "xml",
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
    nodes = (
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    )
    return [doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) >= MIN_CHARS]


def _fingerprint(text: str) -> str:
    """Near-duplicate key: lower-cased words only, first 120 characters (catches boilerplate docstrings)."""
    return re.sub(r"\W+", " ", text.lower()).strip()[:120]


@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """(package, docstring) pairs for TOPIC_PACKAGES, near-duplicates dropped (first occurrence kept).

    Parsing the standard library takes seconds, so the result is cached per Python version."""
    key = hashlib.sha1(
        repr((sys.version, str(_stdlib_root()), TOPIC_PACKAGES, MIN_CHARS)).encode()
    ).hexdigest()[:12]
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


# The pretraining/fine-tuning split of the docstrings (see the module docstring). Changing any of these
# changes the pretraining corpus and so every pretrained tiny checkpoint's cache key.
PRETRAIN_SHARE = 4  # one docstring in PRETRAIN_SHARE goes to pretraining
_PRETRAIN_SALT = b"locality.pretrain/1:"


def in_pretraining_part(text: str) -> bool:
    """Whether a docstring belongs to the pretraining corpus (else to the `stdlib_docs` fine-tuning data).

    Salted, so the choice is independent of the hash order that draws probe/validation sets."""
    return int(hashlib.sha1(_PRETRAIN_SALT + text.encode()).hexdigest()[:8], 16) % PRETRAIN_SHARE == 0


def finetuning_docstrings() -> tuple[tuple[str, str], ...]:
    """(package, docstring) pairs of the `stdlib_docs` dataset: the docstrings outside the pretraining part."""
    return tuple(pair for pair in stdlib_docstrings() if not in_pretraining_part(pair[1]))


def pretraining_texts() -> tuple[str, ...]:
    """The offline pretraining corpus: every pydoc topic paragraph, then the pretraining part of the docstrings."""
    return pydoc_paragraphs() + tuple(doc for _, doc in stdlib_docstrings() if in_pretraining_part(doc))


def pretraining_corpus_version() -> str:
    """A fingerprint of the pretraining texts (they depend on the Python version), for cache keys."""
    digest = hashlib.sha1(_PRETRAIN_SALT)
    for text in pretraining_texts():
        digest.update(hashlib.sha1(text.encode()).digest())
    return digest.hexdigest()[:12]
