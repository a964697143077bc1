"""The byte-level BPE tokenizer, seen as bytes: each token id maps to the exact bytes it stands for.

Decoding works on bytes so that generated text can be assembled incrementally (token by token, with
an incremental UTF-8 decoder) instead of re-decoding the whole completion each step, and so that
tokens that are only part of a UTF-8 character show as OpenAI shows them (``bytes:\\xe2\\x80``).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EOT", "ByteTokenizer", "Vocabulary", "bytes_to_unicode", "token_display"]

#: The end-of-text token's content.
EOT = "<|endoftext|>"
#: How many recent texts `ByteTokenizer.encode` remembers, and the longest one it keeps.
REMEMBERED_TEXTS = 256
REMEMBERED_CHARS = 8192


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (ByteLevel BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def token_display(raw: bytes) -> str:
    """A token's OpenAI-style string: its text, or ``bytes:`` + escapes when not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(
            chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw
        )


class ByteTokenizer:
    """A ``tokenizers.Tokenizer`` plus the bytes of every token id.

    ``token_bytes[i]`` is what token i contributes to the text: the byte-level-decoded piece for
    ordinary tokens, the literal content (``<|endoftext|>``) for special tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1 if vocab else 0
        decode_char = {c: b for b, c in bytes_to_unicode().items()}
        special = {
            token_id: added.content
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
        }
        table: list[bytes] = [b""] * size
        byte_level = True
        for piece, token_id in vocab.items():
            if token_id in special:
                table[token_id] = special[token_id].encode("utf-8")
            elif all(ch in decode_char for ch in piece):
                table[token_id] = bytes(decode_char[ch] for ch in piece)
            else:
                # Not a byte-level piece (a different pre-tokenizer): trust the library's decoder.
                byte_level = False
                table[token_id] = tokenizer.decode([token_id], skip_special_tokens=False).encode(
                    "utf-8"
                )
        self.token_bytes: tuple[bytes, ...] = tuple(table)
        self.token_strings: tuple[str, ...] = tuple(token_display(raw) for raw in table)
        #: The most bytes of text one token stands for, when every token is byte-level (a text's
        #: bytes are then exactly its tokens' bytes); None otherwise.
        self.longest_token_bytes: int | None = (
            max(map(len, table), default=0) or None if byte_level else None
        )
        # Per tokenizer (not on the method: that would keep every tokenizer alive); thread-safe.
        self._remembered = lru_cache(maxsize=REMEMBERED_TEXTS)(self._encode_tuple)

    @classmethod
    def from_file(cls, path: str | Path) -> ByteTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def __len__(self) -> int:
        return len(self.token_bytes)

    def token_id(self, content: str) -> int | None:
        token_id = self.tokenizer.token_to_id(content)
        return None if token_id is None else int(token_id)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``. The last `REMEMBERED_TEXTS` texts up to `REMEMBERED_CHARS` long
        are remembered: our server counts a chat's rendered template for its context check and
        then plans the same text, and a sweep sends each prompt once per seed or temperature."""
        if len(text) > REMEMBERED_CHARS:
            return self._encode(text)
        return list(self._remembered(text))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _encode_tuple(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut-off character) becomes U+FFFD."""
        table = self.token_bytes
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    def vocabulary(self, vocab_size: int, eos_token_id: int | None) -> Vocabulary:
        """The model's tokens: this tokenizer's, cut or padded to the model's ``vocab_size``."""
        eot = self.token_id(EOT)
        if eot is None:
            eot = eos_token_id
        if eot is None:
            raise ValueError(f"the tokenizer has no {EOT} token and config.json no eos_token_id")
        pad = max(0, vocab_size - len(self.token_bytes))
        spellable = min(len(self), vocab_size)
        return Vocabulary(
            tokenizer=self,
            token_bytes=self.token_bytes[:vocab_size] + (b"",) * pad,
            token_strings=self.token_strings[:vocab_size] + ("",) * pad,
            eot_token_id=int(eot),
            unspellable=np.arange(spellable, vocab_size),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
    """Every token id of a model as the engine writes it: ``token_bytes[i]`` (what it adds to the
    text) and ``token_strings[i]`` (OpenAI's string for it). Rows of a padded vocabulary that
    the tokenizer cannot spell (``unspellable``) have empty bytes and must never be sampled."""

    tokenizer: ByteTokenizer
    token_bytes: tuple[bytes, ...]
    token_strings: tuple[str, ...]
    eot_token_id: int
    unspellable: np.ndarray

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def fewest_tokens(self, text_bytes: int) -> int:
        """The fewest tokens a text of ``text_bytes`` UTF-8 bytes can take (0: not known), known
        without tokenizing it: a 900 KB prompt took 100 MB to tokenize only to be refused."""
        longest = self.tokenizer.longest_token_bytes
        return -(-text_bytes // longest) if longest else 0

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")
