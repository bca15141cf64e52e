"""The Mistral SentencePiece tokenizer (32000 pieces), with chat encoding from mistral-common.

`tokenizer.model` from the checkpoint folder is used when present, else the v1 model shipped
inside mistral-common: the tokenizer of Mistral 7B and Mixtral 8x7B.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import sentencepiece

from mixserve.errors import CheckpointError, InvalidRequestError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bundled_tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def require_utf8(text: str, param: str) -> None:
    """SentencePiece takes UTF-8. JSON can carry a lone surrogate ("\\ud800"), which Python keeps
    in a str but UTF-8 cannot hold: refuse it here as the caller's error, before it reaches the
    tokenizer (which fails with a bare RuntimeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{param} is not valid Unicode: a lone surrogate at character {exc.start}",
                                  param=param) from None


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.model_file} is not a SentencePiece model: {exc}") from None
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> Tokenizer:
        local = Path(folder) / "tokenizer.model"
        return cls(local if local.is_file() else bundled_tokenizer_path())

    def encode(self, text: str, bos: bool = True) -> list[int]:
        require_utf8(text, "prompt")
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if not self._sp.is_control(i)])

    @cached_property
    def piece_bytes(self) -> list[bytes]:
        """The bytes each token adds to the text: '▁' is a space, <0xNN> is one raw byte,
        control tokens (<s>, </s>) add nothing. Lets the detokenizer work in O(1) per token."""
        table = []
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i)
            byte = _BYTE_PIECE.match(piece)
            if self._sp.is_control(i):
                table.append(b"")
            elif byte and self._sp.is_byte(i):
                table.append(bytes([int(byte.group(1), 16)]))
            elif self._sp.is_unknown(i):
                table.append(" \u2047 ".encode())  # what SentencePiece prints for <unk>
            else:
                table.append(piece.replace("\u2581", " ").encode())
        return table

    @cached_property
    def _chat(self):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        return MistralTokenizer.from_file(str(self.model_file))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Mistral instruct format: <s>[INST] sys\\n\\nuser [/INST] answer</s>[INST] ... [/INST]."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        for message in messages:
            for value in message.values():
                if isinstance(value, str):
                    require_utf8(value, "messages")
        try:
            request = ChatCompletionRequest(messages=messages)
            return self._chat.encode_chat_completion(request).tokens
        except (MistralCommonException, ValidationError, ValueError, TypeError) as exc:
            raise InvalidRequestError(f"invalid chat messages: {exc}", param="messages") from None
