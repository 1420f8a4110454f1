"""Offline datasets, deterministic splits, word-class tags, and the hub loader on local files."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from locality.core.config import load_option
from locality.core.errors import UserError
from locality.data.corpus import TOPIC_PACKAGES, stdlib_docstrings
from locality.data.sources import load_builtin, load_splits
from locality.data.wordclass import TAGS, tag_spans


def test_stdlib_docs_is_a_15_way_topic_task_without_duplicates():
    pairs = stdlib_docstrings()
    assert len(pairs) > 2500
    assert {pkg for pkg, _ in pairs} == set(TOPIC_PACKAGES) and len(TOPIC_PACKAGES) == 15
    assert len({doc for _, doc in pairs}) == len(pairs)


def test_splits_are_disjoint_and_deterministic():
    a = load_builtin("stdlib_docs", n_probe=100, n_validation=50)
    b = load_builtin("stdlib_docs", n_probe=100, n_validation=50)
    assert [e["text"] for e in a.probe] == [e["text"] for e in b.probe]
    texts = [{e["text"] for e in s} for s in (a.train, a.validation, a.probe)]
    assert (len(texts[1]), len(texts[2])) == (50, 100)
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    # the probe set does not depend on the validation size
    c = load_builtin("stdlib_docs", n_probe=100, n_validation=10)
    assert [e["text"] for e in c.probe] == [e["text"] for e in a.probe]


def test_built_in_data_honours_min_chars_and_max_train_examples():
    # options that changed the run's hash and nothing else on built-in data now do what they say
    full = load_builtin("stdlib_docs", n_probe=64, n_validation=32)
    cut = load_builtin("stdlib_docs", n_probe=64, n_validation=32, max_train_examples=50)
    assert len(cut.train) == 50 and [e["text"] for e in cut.train] == [e["text"] for e in full.train[:50]]
    long = load_builtin("stdlib_docs", n_probe=64, n_validation=32, min_chars=400)
    assert all(len(e["text"]) >= 400 for s in (long.train, long.validation, long.probe) for e in s)
    assert len(long.train) < len(full.train)
    cfg = OmegaConf.merge(load_option("data", "stdlib_docs"), {"max_train_examples": 20})
    assert len(load_splits(cfg, n_probe=64).train) == 20


def test_too_small_dataset_is_refused():
    with pytest.raises(UserError, match="too few"):
        load_builtin("pydoc_topics", n_probe=5000, n_validation=10)


def test_word_classes():
    text = "Return sys.path for 3 items, or None."
    tags = [(text[s:e], TAGS[t]) for s, e, t in tag_spans(text)]
    assert tags == [
        ("Return", "capitalized"),
        ("sys.path", "identifier"),
        ("for", "word"),
        ("3", "number"),
        ("items", "word"),
        (",", "punct"),
        ("or", "word"),
        ("None", "identifier"),
        (".", "punct"),
    ]


def test_hub_loader_reads_sst2_format_from_local_parquet(tmp_path):
    rows = [
        {"sentence": f"a {'good' if i % 2 else 'bad'} movie number {i}", "label": i % 2, "idx": i}
        for i in range(120)
    ]
    pd.DataFrame(rows[:80]).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(rows[80:]).to_parquet(tmp_path / "validation.parquet")
    cfg = OmegaConf.merge(
        load_option("data", "sst2"),
        {
            "path": "parquet",
            "subset": None,
            "n_validation": 10,
            "data_files": {
                "train": str(tmp_path / "train.parquet"),
                "validation": str(tmp_path / "validation.parquet"),
            },
        },
    )
    splits = load_splits(cfg, n_probe=20)  # sst2.yaml carves the probe set out of the train split
    assert (len(splits.train), len(splits.probe), len(splits.validation)) == (60, 20, 10)
    assert not {e["text"] for e in splits.probe} & {e["text"] for e in splits.train}
    assert splits.label_names == ["0", "1"] and {e["label"] for e in splits.train} == {0, 1}


def test_hub_loader_reads_wikitext_format_from_local_json(tmp_path):
    import json

    lines = [" = Title = \n", ""] + [f" Paragraph {i} " + "text " * 60 for i in range(40)]
    for split, chunk in (("train", lines[:30]), ("validation", lines[30:])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in chunk))
    cfg = OmegaConf.merge(
        load_option("data", "wikitext"),
        {
            "path": "json",
            "subset": None,
            "n_validation": 2,
            "data_files": {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")},
        },
    )
    splits = load_splits(cfg, n_probe=5)
    assert len(splits.train) == 28 and not splits.label_names  # title and empty line dropped
    assert all(len(e["text"]) >= 200 for e in splits.train)
