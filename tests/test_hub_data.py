"""The split rule and label encoding of `locality.data.sources` on local files (the real `load_dataset` path)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from locality.core.config import load_option
from locality.core.errors import UserError
from locality.data.sources import load_builtin, load_splits

SST2_TRAIN, SST2_VALIDATION = 67_349, 872  # GLUE SST-2's real split sizes


def _sentences(prefix: str, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sentence": [
                f"{prefix} sentence {i} about a {'good' if i % 2 else 'bad'} film" for i in range(n)
            ],
            "label": [i % 2 for i in range(n)],
            "idx": range(n),
        }
    )


@pytest.fixture(scope="module")
def sst2_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sst2")
    files = {"train": str(root / "train.parquet"), "validation": str(root / "validation.parquet")}
    _sentences("train", SST2_TRAIN).to_parquet(files["train"])
    _sentences("validation", SST2_VALIDATION).to_parquet(files["validation"])
    return files


def _sst2(files, **overrides):
    """conf/data/sst2.yaml as shipped, reading local parquet files instead of the hub."""
    return OmegaConf.merge(
        load_option("data", "sst2"), {"path": "parquet", "subset": None, "data_files": files, **overrides}
    )


def test_sst2_carves_1024_probes_out_of_train(sst2_files):
    cfg = _sst2(sst2_files)
    assert cfg.probe_split == "train" and cfg.n_validation == 256
    splits = load_splits(cfg, n_probe=1024)
    train, probe, validation = (
        {e["text"] for e in s} for s in (splits.train, splits.probe, splits.validation)
    )
    assert (len(probe), len(validation)) == (1024, 256)
    assert all(t.startswith("train ") for t in probe) and all(t.startswith("validation ") for t in validation)
    assert not probe & train and not validation & train
    assert splits.info() == {
        "name": "sst2",
        "path": "parquet",
        "subset": None,
        "splits": {"train": "train", "validation": "validation", "probe": "train"},
        "n_train": SST2_TRAIN - 1024,
        "n_validation": 256,
        "n_probe": 1024,
        "label_names": ["0", "1"],
    }
    # deterministic, and the probe set does not depend on the validation size
    again = load_splits(_sst2(sst2_files, n_validation=100), n_probe=1024)
    assert [e["text"] for e in again.probe] == [e["text"] for e in splits.probe]


@pytest.mark.parametrize(
    "probe_split", ["validation", None]
)  # None: heldout_split (= validation), today's rule
def test_probe_set_larger_than_its_split_is_refused(sst2_files, probe_split):
    with pytest.raises(UserError) as err:
        load_splits(_sst2(sst2_files, probe_split=probe_split), n_probe=1024)
    message = str(err.value)
    for part in ("'validation'", "872", "n_probe=1024", "n_validation=256", "probe_split=train"):
        assert part in message


def test_validation_set_drawn_from_train_after_the_probes(sst2_files):
    cfg = _sst2(sst2_files, validation_split="train", max_train_examples=5000)
    splits = load_splits(cfg, n_probe=64)
    probe, validation, train = (
        {e["text"] for e in s} for s in (splits.probe, splits.validation, splits.train)
    )
    assert not probe & validation and not (probe | validation) & train
    info = splits.info()
    assert info["splits"] == {"train": "train", "validation": "train", "probe": "train"}
    assert (info["n_train"], info["n_validation"], info["n_probe"]) == (5000, 256, 64)


def test_empty_train_set_is_refused(tmp_path):
    _sentences("train", 30).to_parquet(tmp_path / "train.parquet")
    _sentences("validation", 30).to_parquet(tmp_path / "validation.parquet")
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")}
    with pytest.raises(UserError, match="at least one training example"):
        load_splits(_sst2(files, n_validation=10), n_probe=30)
    short = pd.DataFrame(
        {"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)], "idx": range(30)}
    )
    short.to_parquet(tmp_path / "short.parquet")  # every text shorter than min_chars
    with pytest.raises(UserError, match="no training examples"):
        load_splits(
            _sst2(
                {**files, "train": str(tmp_path / "short.parquet")},
                n_validation=10,
                probe_split=None,
                min_chars=10,
            ),
            n_probe=5,
        )
    with pytest.raises(UserError, match="no split 'test'"):
        load_splits(_sst2(files, validation_split="test"), n_probe=5)
    with pytest.raises(UserError, match="n_validation=0"):
        load_splits(_sst2(files, n_validation=0), n_probe=5)


def _labelled(tmp_path, fmt: str, train_labels: list, validation_labels: list):
    for split, labels in (("train", train_labels), ("validation", validation_labels)):
        rows = [{"text": f"{split} example {i}", "label": y} for i, y in enumerate(labels)]
        if fmt == "json":
            (tmp_path / f"{split}.json").write_text("\n".join(json.dumps(r) for r in rows))
        else:
            pd.DataFrame(rows).to_csv(tmp_path / f"{split}.{fmt}", index=False)
    return OmegaConf.merge(
        load_option("data", "sst2"),
        {
            "name": "local",
            "path": fmt,
            "subset": None,
            "text_field": "text",
            "probe_split": None,
            "n_validation": 4,
            "data_files": {s: str(tmp_path / f"{s}.{fmt}") for s in ("train", "validation")},
        },
    )


def test_integer_labels_1_to_5_are_class_encoded(tmp_path):
    # validation holds only two of the classes: the mapping must still be the train split's
    cfg = _labelled(tmp_path, "json", [1 + i % 5 for i in range(50)], [5, 3] * 10)
    splits = load_splits(cfg, n_probe=8)
    assert (
        splits.label_names == ["1", "2", "3", "4", "5"] and splits.info()["label_names"] == splits.label_names
    )
    assert {e["label"] for e in splits.train} == {0, 1, 2, 3, 4}
    for e in splits.train + splits.probe + splits.validation:
        assert splits.label_names[e["label"]] == str(
            1 + int(e["text"].split()[-1]) % 5
            if e["text"].startswith("train")
            else [5, 3][int(e["text"].split()[-1]) % 2]
        )


def test_integer_labels_sort_numerically(tmp_path):
    cfg = _labelled(tmp_path, "json", [i % 12 for i in range(60)], [11, 2] * 10)
    splits = load_splits(cfg, n_probe=8)
    assert splits.label_names == [str(i) for i in range(12)]
    assert {splits.label_names[e["label"]] for e in splits.probe} <= {"11", "2"}


def test_string_labels_are_class_encoded(tmp_path):
    cfg = _labelled(tmp_path, "csv", ["pos", "neg"] * 20, ["pos"] * 20)
    splits = load_splits(cfg, n_probe=8)
    assert splits.label_names == ["neg", "pos"] and splits.num_labels == 2
    assert {e["label"] for e in splits.train} == {0, 1} and {e["label"] for e in splits.probe} == {1}
    assert all(e["label"] == (0 if int(e["text"].split()[-1]) % 2 else 1) for e in splits.train)


def test_heldout_label_missing_from_train_is_refused(tmp_path):
    cfg = _labelled(tmp_path, "csv", ["pos", "neg"] * 20, ["pos", "neutral"] * 10)
    with pytest.raises(UserError, match="'neutral'.*train split 'train' does not have"):
        load_splits(cfg, n_probe=8)


def test_classlabel_column_keeps_its_names_and_ids(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    for split, n in (("train", 40), ("validation", 20)):
        Dataset.from_dict(
            {"text": [f"{split} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
            features=features,
        ).to_parquet(tmp_path / f"{split}.parquet")
    cfg = _sst2(
        {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")},
        text_field="text",
        n_validation=4,
    )
    splits = load_splits(cfg, n_probe=8)
    assert splits.label_names == ["negative", "positive"]
    assert all(e["label"] == int(e["text"].split()[-1]) % 2 for e in splits.train + splits.probe)


def test_builtin_too_small_is_refused_with_both_sizes():
    with pytest.raises(UserError) as err:
        load_builtin("pydoc_topics", n_probe=5000, n_validation=10)
    assert all(
        part in str(err.value) for part in ("'pydoc_topics'", "'all'", "n_probe=5000", "n_validation=10")
    )
    with pytest.raises(UserError, match="n_probe=0"):
        load_builtin("stdlib_docs", n_probe=0, n_validation=10)


def test_builtin_info_and_split_keys():
    splits = load_builtin("stdlib_docs", n_probe=100, n_validation=50)
    info = splits.info()
    assert {k: info[k] for k in ("name", "path", "subset", "splits", "n_validation", "n_probe")} == {
        "name": "stdlib_docs",
        "path": "builtin:stdlib_docs",
        "subset": None,
        "splits": {"train": "all", "validation": "all", "probe": "all"},
        "n_validation": 50,
        "n_probe": 100,
    }
    # ~2,150 docstrings: those outside the tiny presets' pretraining part (locality.data.corpus)
    assert info["n_train"] == len(splits.train) > 1800 and len(info["label_names"]) == 15
    cfg = OmegaConf.merge(load_option("data", "stdlib_docs"), {"probe_split": "train"})
    with pytest.raises(UserError, match="probe_split"):
        load_splits(cfg, n_probe=100)
