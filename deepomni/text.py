"""Text tokenizers for the text channel.

``bytes`` (UTF-8 bytes, ids 0..255) is the embedded default: it needs no trained vocabulary and fits any
text vocabulary of 256 or more (the tiny preset has 256). With real weights, point ``hf:<dir>`` at the
backbone's tokenizer directory (e.g. DeepSeek-V2-Lite's); it is read locally, never downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer from a local directory (no special tokens added: the chat template adds ours)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str, text_vocab_size: int | None = None) -> TextTokenizer:
    """``bytes`` or ``hf:<dir>``; checks the tokenizer fits the model's text vocabulary."""
    if spec == "bytes":
        tok: TextTokenizer = ByteTokenizer()
    elif spec.startswith("hf:"):
        tok = HFTokenizer(spec[3:])
    else:
        raise ValueError(f"unknown tokenizer {spec!r}: expected 'bytes' or 'hf:<dir>'")
    if text_vocab_size is not None and tok.vocab_size > text_vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} ids but the model's text vocabulary is "
                         f"{text_vocab_size}")
    return tok
