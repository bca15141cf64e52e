"""Response bodies and SSE chunks of /v1/completions and /v1/chat/completions, in OpenAI's shapes."""

from __future__ import annotations

import time

from mixserve.platform.front_door import RequestRecord
from mixserve.platform.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    new_logprobs,
    usage,
)


class CompletionShape:
    """/v1/completions bodies and chunks."""

    def __init__(self, names: TokenText, ident: str, body: CompletionRequest):
        self.names, self.ident, self.body = names, ident, body
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}

    def _frame(self, choices: list[dict]) -> dict:
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.body.model, "choices": choices}

    def _logprobs(self, i: int, tokens, lps) -> dict | None:
        if self.body.logprobs is None:
            return None
        offset = self.text_offsets.get(i, 0)
        result = completion_logprobs(tokens, lps, offset, self.names)
        self.text_offsets[i] = offset + sum(len(t) for t in result["tokens"])
        return result

    def chunks(self, i: int, out) -> list[dict]:
        if not (out.new_text or out.new_token_ids or out.finished):
            return []
        tokens, lps = new_logprobs(out)
        choice = {"index": i, "text": out.new_text, "logprobs": self._logprobs(i, tokens, lps),
                  "finish_reason": out.finish_reason if out.finished else None}
        return [self._frame([choice])]

    def usage_chunk(self, record: RequestRecord) -> dict:
        return {**self._frame([]), "usage": usage(record.prompt_tokens, record.completion_total)}

    def whole(self, finals: list, record: RequestRecord) -> dict:
        choices = [{"index": i, "text": out.text, "finish_reason": out.finish_reason,
                    "logprobs": self._logprobs(i, out.token_ids, out.logprobs or [])} for i, out in enumerate(finals)]
        return {**self._frame(choices), "usage": usage(record.prompt_tokens, sum(len(o.token_ids) for o in finals))}


class ChatShape:
    """/v1/chat/completions bodies and chunks."""

    def __init__(self, names: TokenText, ident: str, body: ChatCompletionRequest):
        self.names, self.ident, self.body = names, ident, body
        self.created = int(time.time())
        self.started: set[int] = set()

    def _frame(self, choices: list[dict], chunk: bool) -> dict:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.body.model, "choices": choices}

    def _logprobs(self, tokens, lps) -> dict | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(tokens, lps, self.body.top_logprobs or 0, self.names)

    def chunks(self, i: int, out) -> list[dict]:
        chunks = []
        if i not in self.started:  # OpenAI opens each choice with the role
            self.started.add(i)
            chunks.append(self._frame([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}], chunk=True))
        if out.new_text or out.new_token_ids or out.finished:
            tokens, lps = new_logprobs(out)
            delta = {"content": out.new_text} if out.new_text else {}
            chunks.append(self._frame([{"index": i, "delta": delta, "logprobs": self._logprobs(tokens, lps),
                                        "finish_reason": out.finish_reason if out.finished else None}], chunk=True))
        return chunks

    def usage_chunk(self, record: RequestRecord) -> dict:
        return {**self._frame([], chunk=True), "usage": usage(record.prompt_tokens, record.completion_total)}

    def whole(self, finals: list, record: RequestRecord) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": out.text},
                    "logprobs": self._logprobs(out.token_ids, out.logprobs or []), "finish_reason": out.finish_reason}
                   for i, out in enumerate(finals)]
        return {**self._frame(choices, chunk=False), "usage": usage(record.prompt_tokens, sum(len(o.token_ids) for o in finals))}
