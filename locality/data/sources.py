"""Datasets as plain examples ({"text": str, "label": int}) with deterministic train/validation/probe splits.

Built-in offline datasets:
- `stdlib_docs`: standard-library docstrings labelled with their package (15-way topic classification);
  also usable as LM text and, through word-class tags, as a token task.
- `pydoc_topics`: the Python reference documentation (`pydoc_data.topics`) in paragraph chunks (no labels).

Hub datasets (`source: hub`) go through `datasets.load_dataset(path, name, data_files=...)`, so the same
code reads GLUE/SST-2 or wikitext from the hub and local JSON/CSV/parquet files in the same format.

Splits (one rule for every dataset): the examples of a split (after `data.min_chars` filtering) are ordered
by a hash of their text, so nothing depends on file order or seed. The probe set (what the depth profile is
measured on) comes from `data.probe_split` and the validation set from `data.validation_split` (both default
to `data.heldout_split`). From one split the probe set takes the first `measure.n_probe` examples and the
validation set the next `data.n_validation`; a set drawn from the train split is held out from training
(its examples, and any training example with the same text, are removed from it). Then the training set is
cut to `data.max_train_examples`. A split too small for what is drawn from it, or an empty training set, is
a `UserError` naming the dataset, the split, its size and both requested sizes. A built-in dataset is one
pool (split name "all") split the same way: probe, then validation, then the rest for training.

Labels are class ids 0..K-1 with `label_names[id]` their names: a label column that is a `datasets.ClassLabel`
keeps its names and ids; any other label column is class-encoded from the train split's values (numbers in
numeric order, anything else by its string), and every split is encoded with that one mapping, so a
held-out label the train split does not have is a `UserError`. `Splits.info()` is what results.json
records as `run.data`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from locality.core.errors import UserError
from locality.data.corpus import TOPIC_PACKAGES, finetuning_docstrings, pydoc_paragraphs

BUILTINS = ("stdlib_docs", "pydoc_topics")
BUILTIN_SPLIT = "all"  # the one pool a built-in dataset is split from


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    probe: list[dict]
    label_names: list[str] = field(default_factory=list)
    name: str = ""
    path: str | None = None
    subset: str | None = None
    split_names: dict[str, str] = field(default_factory=dict)  # set -> the split it was drawn from

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def info(self) -> dict:
        """Provenance for results.json `run.data`: where each set came from and the sizes actually used."""
        return {
            "name": self.name,
            "path": self.path,
            "subset": self.subset,
            "splits": {role: self.split_names.get(role) for role in ("train", "validation", "probe")},
            "n_train": len(self.train),
            "n_validation": len(self.validation),
            "n_probe": len(self.probe),
            "label_names": list(self.label_names),
        }


def _stable_order(examples: list[dict]) -> list[dict]:
    return sorted(examples, key=lambda e: hashlib.sha1(e["text"].encode()).hexdigest())


def _check_sizes(n_probe: int, n_validation: int) -> None:
    if n_probe < 1:
        raise UserError(f"measure.n_probe={n_probe}: the probe set needs at least one example.")
    if n_validation < 1:
        raise UserError(f"data.n_validation={n_validation}: the validation set needs at least one example.")


def _too_small(
    dataset: str,
    split: str,
    size: int,
    roles: list[tuple[str, int]],
    keeps_train: bool,
    n_probe: int,
    n_validation: int,
    fix: str,
    filtered: bool,
) -> UserError:
    wanted = " and ".join(f"the {role} set ({n})" for role, n in roles)
    if keeps_train:
        wanted += " plus at least one training example"
    return UserError(
        f"Dataset {dataset}: split '{split}' has {size} examples"
        f"{' (after data.min_chars filtering)' if filtered else ''}, "
        f"too few for {wanted} (requested: measure.n_probe={n_probe}, "
        f"data.n_validation={n_validation}). {fix}"
    )


def _draw(
    pools: dict[str, list[dict]],
    sources: dict[str, str],
    train_split: str,
    n_probe: int,
    n_validation: int,
    dataset: str,
    fix: str,
    carve_hint: str = "",
    filtered: bool = True,
) -> tuple[list, list, list]:
    """Draw the probe and validation sets from their hash-ordered pools by the module's rule; returns
    (train, validation, probe). `sources` maps "probe"/"validation" to a split name (a key of `pools`);
    `carve_hint` is added to the fix when a split other than the train split is too small."""
    sizes = {"probe": n_probe, "validation": n_validation}
    drawn: dict[str, list[dict]] = {}
    remaining = dict(pools)
    for split in dict.fromkeys(sources[role] for role in ("probe", "validation")):
        roles = [(role, sizes[role]) for role in ("probe", "validation") if sources[role] == split]
        pool, keeps_train = pools[split], split == train_split
        if len(pool) < sum(n for _, n in roles) + keeps_train:
            raise _too_small(
                dataset,
                split,
                len(pool),
                roles,
                keeps_train,
                n_probe,
                n_validation,
                fix + ("" if keeps_train else carve_hint) + ".",
                filtered,
            )
        start = 0
        for role, n in roles:  # the probe first, then validation
            drawn[role] = pool[start : start + n]
            start += n
        remaining[split] = pool[start:]
    train = remaining[train_split]
    held = {
        e["text"] for role in ("probe", "validation") if sources[role] == train_split for e in drawn[role]
    }
    if held:
        train = [
            e for e in train if e["text"] not in held
        ]  # duplicates of a held-out text leave training too
    if not train:
        raise UserError(
            f"Dataset {dataset}: no training examples are left in split '{train_split}' after "
            f"{'data.min_chars filtering and ' if filtered else ''}holding out the probe/validation "
            f"sets. {fix}."
        )
    return train, drawn["validation"], drawn["probe"]


def split_heldout(
    examples: list[dict], n_probe: int, n_validation: int, name: str
) -> tuple[list, list, list]:
    """One pool: probe first, then validation, then train, from the hash-ordered examples."""
    _check_sizes(n_probe, n_validation)
    sources = {"probe": BUILTIN_SPLIT, "validation": BUILTIN_SPLIT}
    return _draw(
        {BUILTIN_SPLIT: _stable_order(examples)},
        sources,
        BUILTIN_SPLIT,
        n_probe,
        n_validation,
        f"'{name}'",
        "Lower measure.n_probe or data.n_validation",
        filtered=False,
    )


def load_builtin(
    name: str, n_probe: int, n_validation: int, min_chars: int = 1, max_train_examples: int | None = None
) -> Splits:
    """A built-in dataset, by the same rule as hub data: texts shorter than `min_chars` dropped before the
    split, the training set cut to `max_train_examples`."""
    if name == "stdlib_docs":
        # not the docstrings the tiny presets are pretrained on (locality.data.corpus)
        examples = [{"text": doc, "label": TOPIC_PACKAGES.index(pkg)} for pkg, doc in finetuning_docstrings()]
        label_names = list(TOPIC_PACKAGES)
    elif name == "pydoc_topics":
        examples = [{"text": chunk} for chunk in pydoc_paragraphs()]
        label_names = []
    else:
        raise UserError(f"Unknown built-in dataset '{name}'. Built-in datasets: {', '.join(BUILTINS)}.")
    examples = [e for e in examples if len(e["text"].strip()) >= min_chars]
    train, validation, probe = split_heldout(examples, n_probe, n_validation, name)
    if max_train_examples:
        train = train[:max_train_examples]
    return Splits(
        train,
        validation,
        probe,
        label_names,
        name=name,
        path=f"builtin:{name}",
        subset=None,
        split_names=dict.fromkeys(("train", "validation", "probe"), BUILTIN_SPLIT),
    )


def load_hub(cfg, n_probe: int, n_validation: int) -> Splits:
    """A `datasets` dataset: training from `train_split`, the probe and validation sets from `probe_split` and
    `validation_split` (default `heldout_split`), by the rule in the module docstring."""
    import datasets

    _check_sizes(n_probe, n_validation)
    try:
        loaded = datasets.load_dataset(cfg.path, cfg.subset, data_files=_plain(cfg.data_files))
    except Exception as err:  # the datasets library raises many types for "not found / offline"
        raise UserError(
            f"Could not load dataset path='{cfg.path}' subset='{cfg.subset}' "
            f"data_files={_plain(cfg.data_files)}: {err}. Offline, use a built-in dataset "
            f"(data=stdlib_docs or data=pydoc_topics) or local files (data.path=json "
            "data.data_files=...)."
        ) from err
    dataset = f"'{cfg.name}' ({cfg.path}{'/' + cfg.subset if cfg.subset else ''})"
    sources = {
        "train": cfg.train_split,
        "probe": getattr(cfg, "probe_split", None) or cfg.heldout_split,
        "validation": getattr(cfg, "validation_split", None) or cfg.heldout_split,
    }
    used = _check_splits_and_fields(loaded, cfg, sources, dataset)

    def texts(split: str) -> tuple[list[str], list[int]]:
        """The kept texts of a split and their row indices (data.min_chars filtering)."""
        raw = loaded[split].with_format("arrow")[cfg.text_field].to_pylist()
        kept = [(i, (t or "").strip()) for i, t in enumerate(raw)]
        kept = [(i, t) for i, t in kept if len(t) >= cfg.min_chars]
        return [t for _, t in kept], [i for i, _ in kept]

    label_names: list[str] = []
    encode = None
    if cfg.label_field:
        label_names, encode = _label_encoder(loaded, cfg.train_split, cfg.label_field, dataset)
    pools = {}
    for split in used:
        kept, rows = texts(split)
        if encode is None:
            pools[split] = [{"text": t} for t in kept]
        else:
            labels = encode(split, rows)
            pools[split] = [{"text": t, "label": y} for t, y in zip(kept, labels, strict=True)]
        pools[split] = _stable_order(pools[split])
    carve = (
        ", or set data.probe_split=train (or data.validation_split=train) to carve that set out of the train "
        f"split '{cfg.train_split}', held out from training"
    )
    train, validation, probe = _draw(
        pools,
        sources,
        cfg.train_split,
        n_probe,
        n_validation,
        dataset,
        "Lower measure.n_probe or data.n_validation",
        carve,
    )
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    return Splits(
        train,
        validation,
        probe,
        label_names,
        name=cfg.name,
        path=cfg.path,
        subset=cfg.subset,
        split_names=sources,
    )


def _check_splits_and_fields(loaded, cfg, sources: dict[str, str], dataset: str) -> list[str]:
    """Every split a role reads exists and has the text (and label) field; returns the splits used."""
    for role, split in sources.items():
        if split not in loaded:
            key = f"data.{role}_split" + ("" if role == "train" else " (default: data.heldout_split)")
            raise UserError(f"Dataset {dataset} has no split '{split}' ({key}); it has {list(loaded)}.")
    used = list(dict.fromkeys(sources.values()))
    for split in used:
        columns = loaded[split].column_names
        for key, column in (("text_field", cfg.text_field), ("label_field", cfg.label_field)):
            if column and column not in columns:
                raise UserError(
                    f"Dataset {dataset} split '{split}' has no {key.split('_')[0]} field '{column}'; "
                    f"columns: {columns}. Set data.{key}."
                )
    return used


def _label_encoder(loaded, train_split: str, column: str, dataset: str):
    """Class names from the train split and a function (split, row indices) -> class ids, one mapping for
    every split: a `ClassLabel` column keeps its names and ids; any other column is class-encoded from the
    train split's values (numbers in numeric order, anything else by its string, as `class_encode_column`)."""
    from datasets import ClassLabel

    def keys(split: str) -> tuple[list, ClassLabel | None]:
        """A split's label values as names (None: no label): ClassLabel ids -> names, values -> str."""
        feature = loaded[split].features[column]
        values = loaded[split].with_format("arrow")[column].to_pylist()
        if isinstance(feature, ClassLabel):
            return [
                feature.names[v] if v is not None and 0 <= v < feature.num_classes else None for v in values
            ], feature
        dtype = getattr(feature, "dtype", None)
        if dtype is None or dtype.startswith("float"):
            raise UserError(
                f"Dataset {dataset} split '{split}': label field '{column}' is {feature}; "
                "classification needs a ClassLabel, integer, bool or string label. Set "
                "data.label_field (or null for an unlabelled text task)."
            )
        return [None if v is None else str(v) for v in values], None

    train_keys, feature = keys(train_split)
    if feature is not None:
        names = list(feature.names)
    else:
        values = {v for v in loaded[train_split].unique(column) if v is not None}
        numeric = all(isinstance(v, int | float) for v in values)
        names = [str(v) for v in sorted(values, key=(None if numeric else str))]
    ids = {name: i for i, name in enumerate(ClassLabel(names=names).names)}  # ClassLabel refuses duplicates
    cache = {train_split: train_keys}

    def encode(split: str, rows: list[int]) -> list[int]:
        if split not in cache:
            cache[split] = keys(split)[0]
        labels = [cache[split][i] for i in rows]
        missing = sum(label is None for label in labels)
        if missing:
            raise UserError(
                f"Dataset {dataset} split '{split}' has {missing} examples without a label in "
                f"'{column}' (null or -1, e.g. a test split); draw the probe/validation sets from a "
                "labelled split (data.probe_split, data.validation_split)."
            )
        unknown = sorted(set(labels) - ids.keys())
        if unknown:
            raise UserError(
                f"Dataset {dataset} split '{split}' has label(s) {unknown[:10]} that the train split "
                f"'{train_split}' does not have (its labels: {names[:20]}); the classes are the "
                "train split's labels. Use splits with the same label set."
            )
        return [ids[label] for label in labels]

    return names, encode


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def load_splits(cfg, n_probe: int) -> Splits:
    if cfg.source == "builtin":
        for key in ("probe_split", "validation_split"):
            if getattr(cfg, key, None) not in (None, BUILTIN_SPLIT):
                raise UserError(
                    f"data.{key}={getattr(cfg, key)!r}: built-in dataset '{cfg.builtin}' is one pool "
                    f"(split '{BUILTIN_SPLIT}') split internally; data.{key} applies to hub datasets. "
                    f"Remove it or set it to null."
                )
        return load_builtin(cfg.builtin, n_probe, cfg.n_validation, cfg.min_chars, cfg.max_train_examples)
    if cfg.source == "hub":
        return load_hub(cfg, n_probe, cfg.n_validation)
    raise UserError(f"data.source must be 'builtin' or 'hub', not '{cfg.source}'.")
