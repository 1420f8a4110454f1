"""Load the tokenizer a preset names (hub id, local dir, bundled model, or the corpus-trained BPE), padded right."""

from __future__ import annotations

import hashlib
import json

from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from locality.backbones.sources import check_hub_access, resolve_source
from locality.core.config import ModelConf
from locality.core.errors import UserError


def load_tokenizer(spec: ModelConf, model_source: str | None) -> PreTrainedTokenizerBase:
    if spec.tokenizer == "corpus_bpe":
        from locality.data.tokenizer import corpus_bpe_tokenizer

        tokenizer = corpus_bpe_tokenizer()
    else:
        source = spec.tokenizer or model_source
        if source is None:
            raise UserError(
                f"model '{spec.name}' is built from a config and needs model.tokenizer "
                "(a hub id, a local dir, or 'corpus_bpe')."
            )
        path, local = resolve_source(source)
        if not local:
            check_hub_access(path, spec.revision)
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha1 of the whole vocabulary (token -> id): two tokenizers with the same name can still differ."""
    return hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
