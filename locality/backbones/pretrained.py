"""Offline-pretrained checkpoints for the config-built presets: pretrain a tiny model once and cache it.

The command line is `python -m locality.pretrain model=tiny_<family>` (locality/pretrain.py); loading a
`tiny_*` preset calls `pretrained_checkpoint` here.

The `tiny_*` presets are built from `transformers` configs. With `model.init=pretrained` (the default) they
start fine-tuning from a checkpoint that this module pretrains once, on offline text, and caches; with
`model.init=random` they start from random init. So the offline replica fine-tunes a *pretrained* network,
like the study, only smaller.

- **Objective**: the family's own LM objective with its LM head: causal LM for decoders, SSMs and RNNs,
  masked LM for encoders (15% of non-special tokens; of those 80% [MASK], 10% a random token, 10% kept).
- **Text**: `locality.data.corpus.pretraining_texts()` (pydoc topics plus a hash-selected quarter of the
  standard-library docstrings); the `stdlib_docs` fine-tuning data never contains them (see that module).
  One text in 20 (by a salted hash) is held out: the held-out loss is measured before and after.
  Texts are tokenized, joined with the end-of-text (decoders) or [SEP] (encoders) token and cut into packed
  blocks of `model.pretrain.seq_len` tokens (encoder blocks are wrapped in [CLS] ... [SEP]).
- **Loop**: a plain, seeded PyTorch loop on the CPU or the first GPU: AdamW, linear warmup then cosine decay
  to 10% of the rate, gradient clipping at 1, `model.pretrain.steps` steps of `batch_size` blocks. It runs
  inside `torch.random.fork_rng`, so pretraining on a cache miss leaves the global RNG exactly as a cache
  hit does: a fine-tuning run's numbers never depend on the cache state.
- **Cache**: `<cache dir>/pretrained/<arch>-<hash>/` (`$LOCALITY_CACHE`, default ~/.cache/locality), a
  `save_pretrained` directory with the LM head, the tokenizer and `pretrain.json` (settings, loss curve,
  held-out losses). The hash (the key in `init_from = pretrained:<key>`) covers everything that determines
  the weights: the recipe version, arch, `config_overrides`, the token ids, the tokenizer (its name and a
  hash of its vocabulary), the LM head kind, the pretraining corpus (a hash of its texts), and every
  `model.pretrain` setting (steps, lr, batch size, sequence length, seed, warmup, weight decay, mask rate).
  The model name is not in it: presets that agree on all of that share one checkpoint. An entry is written
  to a temporary directory and renamed into place, so a killed pretraining never leaves a partial entry;
  a file lock per key makes concurrent runs (a parallel sweep) wait for one pretraining instead of
  repeating it. `pretrain.json` holds a sha256 of every file of the entry, checked on every use: an entry
  that fails (a flipped bit, a truncated file) is pretrained again. `force=true` pretrains again and replaces
  the entry.
- **Knob**: `$LOCALITY_PRETRAIN_STEPS` replaces `model.pretrain.steps` (tests and debugging use a small
  number); being part of the key, it never touches a real checkpoint.

Fine-tuning loads the base model from the checkpoint for new-head objectives (`cls`, `tok`) and the whole
model, pretrained LM head included, for `clm`/`mlm` (`locality.backbones.load_backbone`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from locality.backbones.hf import AUTO_CLASSES, config_for, no_cache, token_ids
from locality.backbones.tokenizer import vocab_fingerprint
from locality.core.config import ModelConf, PretrainConf
from locality.core.errors import UserError
from locality.core.integrity import manifest, manifest_problem
from locality.core.paths import cache_dir
from locality.data.corpus import pretraining_corpus_version, pretraining_texts

RECIPE_VERSION = 1  # bump when the loop, packing or masking changes: every key changes with it
STEPS_ENV = "LOCALITY_PRETRAIN_STEPS"
HELDOUT_SHARE = 20  # one pretraining text in 20 is held out
MAX_HELDOUT_BLOCKS = 64
_HELDOUT_SALT = b"locality.pretrain-heldout/1:"
INFO_FILE = "pretrain.json"


@dataclass
class Pretrained:
    """A cached pretrained checkpoint: its directory, key and what pretraining reported."""

    path: Path
    key: str
    info: dict = field(default_factory=dict)
    trained_now: bool = False


def head_kind_for(family: str) -> str:
    """The LM head a family is pretrained with: masked LM for encoders, causal LM for everything else."""
    return "masked_lm" if family == "encoder" else "causal_lm"


def settings(spec: ModelConf) -> PretrainConf:
    """`model.pretrain`, with `$LOCALITY_PRETRAIN_STEPS` replacing the step count when set."""
    conf = spec.pretrain
    steps = os.environ.get(STEPS_ENV)
    if steps:
        try:
            conf = replace(conf, steps=int(steps))
        except ValueError:
            raise UserError(f"${STEPS_ENV}={steps!r} must be a whole number of pretraining steps.") from None
    if conf.steps < 1 or conf.batch_size < 1 or conf.seq_len < 8 or conf.lr <= 0:
        raise UserError(
            f"model.pretrain needs steps >= 1, batch_size >= 1, seq_len >= 8 and lr > 0; got {conf}."
        )
    return conf


def cache_root() -> Path:
    root = cache_dir() / "pretrained"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def key_material(spec: ModelConf, tokenizer, head: str, conf: PretrainConf) -> dict:
    """Everything that determines the pretrained weights (the cache key is a hash of it)."""
    pretrain = asdict(conf)
    if head != "masked_lm":
        pretrain.pop("mask_prob")
    return {
        "recipe": RECIPE_VERSION,
        "arch": spec.arch,
        "config_overrides": _plain(spec.config_overrides),
        "token_ids": token_ids(tokenizer),
        "tokenizer": spec.tokenizer,
        "tokenizer_vocab": vocab_fingerprint(tokenizer)[:12],
        "head": head,
        "corpus": pretraining_corpus_version(),
        "pretrain": pretrain,
    }


def cache_key(material: dict) -> str:
    digest = hashlib.sha1(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    return f"{material['arch']}-{digest}"


def is_complete(path: Path) -> bool:
    """An entry with its info file whose every file still has the checksum written with it (an entry that
    fails, or one from before checksums, is pretrained again)."""
    return manifest_problem(path, _read_info(path).get("files")) is None


def pretrained_checkpoint(
    spec: ModelConf, tokenizer, family: str, force: bool = False, log=print
) -> Pretrained:
    """The cached pretrained checkpoint of a config-built preset, pretraining it first on a cache miss."""
    from filelock import FileLock

    if spec.arch is None:
        raise UserError(
            f"model '{spec.name}' loads a checkpoint ({spec.name_or_path}); only presets built from "
            "a config (model.arch, the tiny_* presets) are pretrained by locality.pretrain."
        )
    conf, head = settings(spec), head_kind_for(family)
    material = key_material(spec, tokenizer, head, conf)
    key = cache_key(material)
    root = cache_root()
    path = root / key
    if is_complete(path) and not force:
        return Pretrained(path, key, _read_info(path))
    (root / ".locks").mkdir(exist_ok=True)
    with FileLock(str(root / ".locks" / f"{key}.lock")):
        if is_complete(path) and not force:  # another process finished it while we waited
            return Pretrained(path, key, _read_info(path))
        for stale in root.glob(f".{key}.*.tmp"):  # left by a killed pretraining (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        why = "not in the cache"
        if force:
            why = "forced"
        elif path.exists():
            why = "its cached copy failed its checksums"
        log(
            f"{spec.name}: pretraining on first use ({why}): "
            f"{conf.steps} steps of {head.replace('_', ' ')} at batch {conf.batch_size} x {conf.seq_len} tokens "
            f"-> {path}"
        )
        model, info = pretrain(spec, tokenizer, head, conf, log=log)
        info = {"key": key, "model": spec.name, "material": material, **info}
        tmp = root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["files"] = manifest(tmp)  # checked on every use: a damaged entry is pretrained again
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        if path.exists():  # force=true, or an entry without its info file
            shutil.rmtree(path)
        os.replace(tmp, path)
        log(summary_line(spec.name, info))
    return Pretrained(path, key, info, trained_now=True)


def _read_info(path: Path) -> dict:
    try:
        return json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def summary_line(name: str, info: dict) -> str:
    losses = info.get("losses", [])
    first = " ".join(f"{v:.2f}" for v in losses[:5])
    last = " ".join(f"{v:.2f}" for v in losses[-5:])
    return (
        f"{name}: pretrained {info.get('steps')} steps in {info.get('wall_s', 0):.1f} s "
        f"({info.get('threads')} thread(s), {info.get('cpu_s', math.nan):.1f} CPU-s); train loss first [{first}] last [{last}]; held-out loss "
        f"{info.get('heldout_before', math.nan):.3f} -> {info.get('heldout_after', math.nan):.3f} "
        f"(ln vocab {math.log(info.get('vocab_size', 1)):.2f})"
    )


# --- the pretraining itself ---------------------------------------------------------------------------


def corpus_blocks(tokenizer, seq_len: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks): packed [n, seq_len] token ids of the pretraining texts."""
    texts = pretraining_texts()
    heldout = [_is_heldout(t) for t in texts]
    train = _pack(tokenizer, [t for t, h in zip(texts, heldout, strict=True) if not h], seq_len, masked)
    held = _pack(tokenizer, [t for t, h in zip(texts, heldout, strict=True) if h], seq_len, masked)
    return train, held[:MAX_HELDOUT_BLOCKS]


def _is_heldout(text: str) -> bool:
    return int(hashlib.sha1(_HELDOUT_SALT + text.encode()).hexdigest()[:8], 16) % HELDOUT_SHARE == 0


def _pack(tokenizer, texts: list[str], seq_len: int, masked: bool) -> torch.Tensor:
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    sep = tokenizer.sep_token_id if masked else tokenizer.eos_token_id
    if sep is None:
        raise UserError(
            f"Tokenizer {tokenizer.name_or_path} has no {'[SEP]' if masked else 'end-of-text'} token "
            "to join pretraining texts with."
        )
    stream = [i for ids in encoded for i in (*ids, sep)]
    width = seq_len - 2 if masked else seq_len
    n = len(stream) // width
    blocks = torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)
    if masked:
        cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
        blocks = torch.cat([cls, blocks, torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)], dim=1)
    return blocks


def mask_tokens(
    blocks: torch.Tensor, tokenizer, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: `prob` of the non-special tokens are predicted; of those 80% become [MASK], 10% a
    random token, 10% stay. Returns (inputs, labels with -100 where not predicted)."""
    special = torch.isin(blocks, torch.tensor(tokenizer.all_special_ids))
    chosen = (torch.rand(blocks.shape, generator=generator) < prob) & ~special
    labels = blocks.masked_fill(~chosen, -100)
    roll = torch.rand(blocks.shape, generator=generator)
    inputs = blocks.masked_fill(chosen & (roll < 0.8), tokenizer.mask_token_id)
    random_ids = torch.randint(len(tokenizer), blocks.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs = torch.where(swap, random_ids, inputs)
    return inputs, labels


def _mlm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The masked-LM head of a *ForMaskedLM model (BERT's `cls`, RoBERTa's `lm_head`): its one child besides
    the base model, which maps hidden states [..., H] to vocabulary logits. None if that is not the layout."""
    others = [m for name, m in model.named_children() if name != model.base_model_prefix]
    return others[0] if len(others) == 1 else None


def pretrain(spec: ModelConf, tokenizer, head: str, conf: PretrainConf, log=print):
    """Build the model from its config and pretrain it; returns (model in eval mode on the CPU, report)."""

    masked = head == "masked_lm"
    train_blocks, held_blocks = corpus_blocks(tokenizer, conf.seq_len, masked)
    if len(train_blocks) < conf.batch_size or len(held_blocks) == 0:
        raise UserError(
            f"The pretraining corpus gives only {len(train_blocks)} training and {len(held_blocks)} "
            f"held-out blocks of {conf.seq_len} tokens; lower model.pretrain.seq_len."
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # CPU (and that GPU's) RNG
        torch.manual_seed(conf.seed)
        config = config_for(spec.arch, tokenizer, spec.config_overrides)
        model = AUTO_CLASSES[head].from_config(config, dtype=torch.float32).to(device)
        generator = torch.Generator().manual_seed(conf.seed)
        held = (
            mask_tokens(held_blocks, tokenizer, conf.mask_prob, generator) if masked else (held_blocks,) * 2
        )
        loss_of = _loss_function(model, masked, device)
        before = _heldout_loss(model, loss_of, *held, masked)
        losses = _train(model, loss_of, train_blocks, tokenizer, conf, generator, masked, spec.name)
        after = _heldout_loss(model, loss_of, *held, masked)
    model.eval()
    model.to("cpu")
    info = {
        "steps": conf.steps,
        "head": head,
        "losses": [round(v, 4) for v in losses],
        "heldout_before": before,
        "heldout_after": after,
        "vocab_size": len(tokenizer),
        "train_blocks": len(train_blocks),
        "heldout_blocks": len(held_blocks),
        "seq_len": conf.seq_len,
        "tokens_seen": conf.steps * conf.batch_size * conf.seq_len,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
    }
    return model, info


def _loss_function(model: torch.nn.Module, masked: bool, device: torch.device):
    """loss(inputs, labels) of the model's own LM objective; for MLM the vocabulary projection runs only
    where a token is predicted (15%)."""
    extra = no_cache(model)
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    mlm_head = _mlm_head(model) if masked else None

    def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs, labels = inputs.to(device), labels.to(device)
        mask = {"attention_mask": torch.ones_like(inputs)} if takes_mask else {}
        if mlm_head is not None:
            hidden = model.base_model(input_ids=inputs, **mask)[0]
            scored = labels != -100
            return F.cross_entropy(mlm_head(hidden[scored]), labels[scored])
        return model(input_ids=inputs, labels=labels, **mask, **extra).loss

    return loss_of


@torch.no_grad()
def _heldout_loss(model, loss_of, inputs: torch.Tensor, labels: torch.Tensor, masked: bool) -> float:
    """The mean loss per predicted token over the held-out blocks (eval mode, batches of 32)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), 32):
        batch, targets = inputs[i : i + 32], labels[i : i + 32]
        n = int((targets[:, 1:] if not masked else targets).ne(-100).sum())
        total += float(loss_of(batch, targets)) * n
        count += n
    model.train()
    return total / count


def _train(
    model, loss_of, blocks, tokenizer, conf: PretrainConf, generator, masked: bool, name: str
) -> list[float]:
    """AdamW (decay on matrices), linear warmup then cosine to 10%, clipping at 1; returns each step's loss."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": conf.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=conf.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, round(conf.warmup * conf.steps))

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, conf.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    losses: list[float] = []
    order = torch.randperm(len(blocks), generator=generator)
    position = 0
    model.train()
    for _ in range(conf.steps):
        if position + conf.batch_size > len(order):
            order, position = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[position : position + conf.batch_size]]
        position += conf.batch_size
        inputs, labels = (
            mask_tokens(batch, tokenizer, conf.mask_prob, generator) if masked else (batch, batch)
        )
        loss = loss_of(inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(
                f"pretraining {name} diverged at step {len(losses)} (loss {losses[-1]}); lower model.pretrain.lr."
            )
    return losses
