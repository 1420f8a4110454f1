"""A real byte-level BPE tokenizer trained on the offline corpus, for tiny decoder/SSM/RNN presets.

Tiny presets are built from configs, but they still tokenize with a real tokenizer: this one is the
GPT-2 recipe (byte-level BPE, `<|endoftext|>` as bos/eos/pad) trained with `tokenizers` on the
standard-library docstrings and pydoc topics, cached on disk after the first call (about a second).
"""

from __future__ import annotations

import os
from functools import lru_cache

from transformers import PreTrainedTokenizerFast

from locality.core.paths import cache_dir
from locality.data.corpus import pydoc_paragraphs, stdlib_docstrings

VOCAB_SIZE = 4096
EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def corpus_bpe_tokenizer() -> PreTrainedTokenizerFast:
    path = cache_dir() / f"corpus_bpe_{VOCAB_SIZE}"
    if not (path / "tokenizer.json").is_file():
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        texts = [doc for _, doc in stdlib_docstrings()] + list(pydoc_paragraphs())
        bpe.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
        )
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tokenizer.save_pretrained(tmp)
        if not path.exists():  # another process may have finished first; both results are identical
            tmp.replace(path)
    return PreTrainedTokenizerFast.from_pretrained(path)
