"""Tokenizers: byte-level (built in), Hugging Face ``tokenizer.json``, sentencepiece ``.model``.

All share one small interface: ``encode(text) -> list[int]`` (no specials), ``decode(ids) -> str`` (specials
dropped), ``pad_id``, ``bos_id``, ``eos_id``, ``vocab_size``. Helpers build the fixed-length arrays the model reads:
questions left-padded (so prompt and answer are contiguous when concatenated), answers right-padded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as _Tok
from tokenizers import decoders, models, pre_tokenizers, trainers

from mirasol_ray import storage
from mirasol_ray.config import BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID, BYTE_VOCAB_SIZE, is_byte_tokenizer


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: PAD=0, BOS=1, EOS=2; byte b -> b + 3. Vocabulary 259. The
    constants are the config's (:data:`mirasol_ray.config.BYTE_VOCAB_SIZE`), which fills the model's vocabulary
    without building a tokenizer."""

    pad_id, bos_id, eos_id = BYTE_PAD_ID, BYTE_BOS_ID, BYTE_EOS_ID
    offset = 3
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= self.offset:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (any model's), via the ``tokenizers`` library."""

    def __init__(self, path: str = "", *, data: bytes | None = None):
        self._tok = _Tok.from_str(data.decode("utf-8")) if data is not None else _Tok.from_file(path)
        vocab = self._tok.get_vocab()
        self.vocab_size = self._tok.get_vocab_size()

        def find(*names):
            for n in names:
                if n in vocab:
                    return vocab[n]
            return None

        pad = find("<pad>", "[PAD]", "<|pad|>")
        bos = find("<s>", "[CLS]", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
        eos = find("</s>", "[SEP]", "<eos>", "<|end_of_text|>", "<|endoftext|>")
        # Missing specials get fresh ids past the vocabulary.
        extra = self.vocab_size
        if pad is None:
            pad, extra = extra, extra + 1
        if bos is None:
            bos, extra = extra, extra + 1
        if eos is None:
            eos, extra = extra, extra + 1
        self.pad_id, self.bos_id, self.eos_id, self.vocab_size = pad, bos, eos, extra

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id) and i < self._tok.get_vocab_size()]
        return self._tok.decode(ids).strip()


class SentencePieceTokenizer:
    def __init__(self, path: str = "", *, data: bytes | None = None):
        self._sp = (spm.SentencePieceProcessor(model_proto=data) if data is not None
                    else spm.SentencePieceProcessor(model_file=path))
        n = self._sp.get_piece_size()
        self.vocab_size = n
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        for name in ("pad_id", "bos_id", "eos_id"):
            if getattr(self, name) is None:
                setattr(self, name, self.vocab_size)
                self.vocab_size += 1

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        n = self._sp.get_piece_size()
        return self._sp.decode([i for i in ids if i < n and i not in (self.pad_id, self.bos_id)])


def train_bpe_tokenizer(texts, vocab_size: int = 512) -> str:
    """A byte-level BPE tokenizer (the ``tokenizers`` library's trainer) learnt from ``texts``, as the JSON text of
    a ``tokenizer.json`` that :class:`HFTokenizer` loads. For a corpus with no pretrained tokenizer (the
    synthetic data): whole words become single tokens, so answers are one or two tokens instead of 3-10 bytes,
    and any text still encodes (byte fallback). A space is prefixed to every text, so a word is the same token
    at the start of an answer and inside a caption."""

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=8)
def get_tokenizer(spec: str = "byte") -> Tokenizer:
    """``byte``, or a path or URI (``s3://``: read into memory once per process, so every Ray worker of a cluster
    can load it) to a ``tokenizer.json`` / a sentencepiece ``.model``."""
    if is_byte_tokenizer(spec):
        return ByteTokenizer()
    suffix = Path(spec).suffix
    if suffix not in (".json", ".model"):
        raise ValueError(f"tokenizer must be 'byte', a tokenizer.json or a sentencepiece .model, got {spec}")
    cls = HFTokenizer if suffix == ".json" else SentencePieceTokenizer
    if storage.is_remote(spec):
        try:
            return cls(data=storage.read_bytes(spec))
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {spec}") from None
    if not Path(spec).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {spec}")
    return cls(spec)


def encode_prompt(tok: Tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Question tokens, left-padded to ``length`` (keeps the end of a long question). Returns (ids, mask)."""
    return prompt_arrays(tok.encode(text) if text else [], length, tok)


def encode_target(tok: Tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``BOS text EOS``, right-padded to ``length`` (text cut to fit, EOS kept). Returns (ids, mask)."""
    return target_arrays(tok.encode(text), length, tok)


def prompt_arrays(ids: list[int], length: int, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_prompt` of text already encoded (``ids``): it needs ``len(ids)`` tokens, more are cut."""
    ids = ids[-length:] if ids else []
    out = np.full(length, tok.pad_id, dtype=np.int32)
    mask = np.zeros(length, dtype=bool)
    if ids:
        out[length - len(ids):] = ids
        mask[length - len(ids):] = True
    return out, mask


def target_arrays(ids: list[int], length: int, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_target` of text already encoded (``ids``): it needs ``len(ids) + 2`` tokens, more are cut."""
    ids = [tok.bos_id] + ids[: length - 2] + [tok.eos_id]
    out = np.full(length, tok.pad_id, dtype=np.int32)
    mask = np.zeros(length, dtype=bool)
    out[: len(ids)] = ids
    mask[: len(ids)] = True
    return out, mask
