"""Incremental detokenization for streaming.

Tokens are turned into bytes (see `Tokenizer.piece_bytes`) and fed to an incremental UTF-8
decoder, so a character split over several byte tokens is held back until it is complete:
a stream never carries a broken character. Only the very first piece's space can be stripped
(chat answers start after "[/INST] "); a completion keeps it, so prompt + completion reads
as one text.
"""

from __future__ import annotations

import codecs

from mixserve.replicas.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, strip_leading_space: bool = False):
        self._bytes = tokenizer.piece_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_leading_space
        self._started = False

    def add(self, token_id: int) -> str:
        """The text token_id completes (possibly empty while a character is incomplete)."""
        piece = self._bytes[token_id] if token_id < len(self._bytes) else b""  # past the tokenizer: no text
        text = self._decoder.decode(piece)
        if text and not self._started:
            self._started = True
            if self._strip and text.startswith(" "):
                text = text[1:]
        return text

    def flush(self) -> str:
        """At the end of a sequence: whatever bytes remain (a truncated character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
