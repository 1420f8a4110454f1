"""Datasets as plain examples ({"text": str, "label": int}) with deterministic train/validation/probe splits.

Built-in offline datasets:
- `stdlib_docs`: standard-library docstrings labelled with their package (15-way topic classification);
  also usable as LM text and, through word-class tags, as a token task.
- `pydoc_topics`: the Python reference documentation (`pydoc_data.topics`) in paragraph chunks (no labels).

Hub datasets (`source: hub`) go through `datasets.load_dataset(path, name, data_files=...)`, so the same
code reads GLUE/SST-2 or wikitext from the hub and local JSON/CSV/parquet files in the same format.

Splits: the probe set (what the depth profile is measured on) and the validation set are held out from
training. Examples are ordered by a hash of their text, so splits never depend on file order or seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from locality.data.corpus import TOPIC_PACKAGES, pydoc_paragraphs, stdlib_docstrings
from locality.errors import UserError

BUILTINS = ("stdlib_docs", "pydoc_topics")


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    probe: list[dict]
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _stable_order(examples: list[dict]) -> list[dict]:
    return sorted(examples, key=lambda e: hashlib.sha1(e["text"].encode()).hexdigest())


def split_heldout(examples: list[dict], n_probe: int, n_validation: int, name: str) -> tuple[list, list, list]:
    """Probe first, then validation, then train, from the hash-ordered examples."""
    ordered = _stable_order(examples)
    if len(ordered) < n_probe + n_validation + 1:
        raise UserError(f"Dataset '{name}' has {len(ordered)} examples, too few for a probe set of {n_probe} and "
                        f"a validation set of {n_validation}. Lower measure.n_probe or data.n_validation.")
    probe, validation = ordered[:n_probe], ordered[n_probe:n_probe + n_validation]
    return ordered[n_probe + n_validation:], validation, probe


def load_builtin(name: str, n_probe: int, n_validation: int) -> Splits:
    if name == "stdlib_docs":
        examples = [{"text": doc, "label": TOPIC_PACKAGES.index(pkg)} for pkg, doc in stdlib_docstrings()]
        label_names = list(TOPIC_PACKAGES)
    elif name == "pydoc_topics":
        examples = [{"text": chunk} for chunk in pydoc_paragraphs()]
        label_names = []
    else:
        raise UserError(f"Unknown built-in dataset '{name}'. Built-in datasets: {', '.join(BUILTINS)}.")
    train, validation, probe = split_heldout(examples, n_probe, n_validation, name)
    return Splits(train, validation, probe, label_names)


def load_hub(cfg, n_probe: int, n_validation: int) -> Splits:
    """A `datasets` dataset: `train_split` for training; probe and validation from `heldout_split`."""
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.path, cfg.subset, data_files=_plain(cfg.data_files))
    except Exception as err:  # the datasets library raises many types for "not found / offline"
        raise UserError(f"Could not load dataset path='{cfg.path}' subset='{cfg.subset}' "
                        f"data_files={_plain(cfg.data_files)}: {err}. Offline, use a built-in dataset "
                        f"(data=stdlib_docs or data=pydoc_topics) or local files (data.path=json "
                        "data.data_files=...).") from err
    for split in (cfg.train_split, cfg.heldout_split):
        if split not in loaded:
            raise UserError(f"Dataset '{cfg.path}' has no split '{split}'; it has {list(loaded)}.")
    label_names = []
    if cfg.label_field:
        feature = loaded[cfg.train_split].features.get(cfg.label_field)
        label_names = list(getattr(feature, "names", None) or
                           sorted({str(v) for v in loaded[cfg.train_split][cfg.label_field]}))

    def examples(split: str) -> list[dict]:
        rows = loaded[split]
        if cfg.text_field not in rows.column_names:
            raise UserError(f"Dataset '{cfg.path}' has no text field '{cfg.text_field}'; "
                            f"columns: {rows.column_names}. Set data.text_field.")
        out = []
        for row in rows:
            text = (row[cfg.text_field] or "").strip()
            if len(text) < cfg.min_chars:
                continue
            example = {"text": text}
            if cfg.label_field:
                example["label"] = int(row[cfg.label_field])
            out.append(example)
        return out

    train = _stable_order(examples(cfg.train_split))
    heldout = examples(cfg.heldout_split)
    if cfg.heldout_split == cfg.train_split:
        train, validation, probe = split_heldout(train, n_probe, n_validation, cfg.path)
    else:
        _, validation, probe = split_heldout(heldout, n_probe, min(n_validation, len(heldout) - n_probe - 1),
                                             cfg.path)
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    return Splits(train, validation, probe, label_names)


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def load_splits(cfg, n_probe: int) -> Splits:
    if cfg.source == "builtin":
        return load_builtin(cfg.builtin, n_probe, cfg.n_validation)
    if cfg.source == "hub":
        return load_hub(cfg, n_probe, cfg.n_validation)
    raise UserError(f"data.source must be 'builtin' or 'hub', not '{cfg.source}'.")
