"""The HTTP front door on Ray Serve: OpenAI-style /v1/completions (plain and SSE), /v1/models,
/health. Errors use OpenAI's error body. (Tenants, keys, chat and gRPC: the front-door issue.)

No `from __future__ import annotations` here: FastAPI must see the request model's real type on
the Serve-wrapped methods, or it reads the body as a query parameter.
"""


import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from mixserve.errors import InvalidRequestError
from mixserve.replicas.deployment import GenerateError, GenerateRequest
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput

app = FastAPI(title="mixserve", description="OpenAI-compatible serving of Mistral / Mixtral")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="Served model name (see /v1/models).")
    prompt: str | list[int] = Field(..., description="Text, or token ids used exactly as given.")
    max_tokens: int = Field(16, description="Most tokens to generate.")
    temperature: float = Field(1.0, description="0 is greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(-1, description="Extension: keep the k most likely tokens (-1 = off).")
    seed: int | None = Field(None, description="Per-request seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Stop strings, cut from the text.")
    stream: bool = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    logprobs: int | None = Field(None, description="Top log-probabilities per generated token.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    n: int = Field(1, description="Completions per prompt (1 until the front-door issue).")


RETRY_AFTER_S = 1


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    content = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(status_code=status, content=content, headers=headers)


def _error_of(err: GenerateError) -> JSONResponse:
    if err.kind == "invalid_request":
        return error_response(400, err.message, "invalid_request_error", err.param)
    return error_response(503, err.message, "service_unavailable")


# Everything the ingress class uses must be defined above it: @serve.deployment pickles the
# class when it is defined, with the module globals that exist at that moment.
@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return error_response(400, f"{param or 'body'}: {first['msg']}", "invalid_request_error", param)


@serve.deployment
@serve.ingress(app)
class HttpIngress:
    def __init__(self, replica, model_name: str):
        self.replica = replica
        self.model_name = model_name

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "mixserve"}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        if body.model != self.model_name:
            return error_response(404, f"model {body.model!r} does not exist", "not_found_error", "model")
        if body.n != 1:
            return error_response(400, "n must be 1", "invalid_request_error", "n")
        try:
            params = SamplingParams(
                max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                seed=body.seed, stop=body.stop, logprobs=body.logprobs, ignore_eos=body.ignore_eos,
            )
        except InvalidRequestError as exc:
            return error_response(400, exc.message, "invalid_request_error", exc.param)
        stream = self.replica.options(stream=True).generate.remote(GenerateRequest(body.prompt, params))
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        first = await anext(stream, None)  # errors about the request arrive first: answer them with a status
        if isinstance(first, GenerateError):
            stream.cancel()
            return _error_of(first)
        if body.stream:
            return StreamingResponse(
                self._sse(first, stream, completion_id, created), media_type="text/event-stream"
            )
        final = first
        async for out in stream:
            if isinstance(out, GenerateError):
                return _error_of(out)
            final = out
        return self._completion(completion_id, created, final.text, final)

    async def _sse(self, first: RequestOutput, stream, completion_id: str, created: int):
        try:
            out = first
            while True:
                if isinstance(out, GenerateError):
                    yield f"data: {json.dumps({'error': {'message': out.message, 'type': out.kind}})}\n\n"
                    break
                if out.new_text or out.finished:
                    chunk = self._completion(completion_id, created, out.new_text, out, final=out.finished)
                    yield f"data: {json.dumps(chunk)}\n\n"
                if out.finished:
                    break
                out = await anext(stream)
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()  # a client that left aborts its request and frees its cache slot

    def _completion(self, completion_id: str, created: int, text: str, out: RequestOutput, final: bool = True) -> dict:
        body = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": out.finish_reason if final else None}],
        }
        if final:
            prompt_tokens, completion_tokens = len(out.prompt_token_ids), len(out.token_ids)
            body["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return body
