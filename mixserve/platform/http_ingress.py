"""The HTTP front door on Ray Serve (FastAPI): OpenAI-compatible completions and chat
completions (plain and SSE), models, usage, Prometheus metrics and health.

Every refusal is OpenAI's error body with its status: 400 bad parameters or a prompt too long,
401 no or wrong key, 403 model not allowed, 404 unknown model, 413 body too large, 429 over
quota and 503 overloaded (both with Retry-After). The shared work (keys, quotas, tokenizing,
fan-out to replicas, metering) lives in front_door.py so the gRPC ingress does the same.

No `from __future__ import annotations` here: FastAPI must see the request models' real types
on the Serve-wrapped methods, or it reads the body as query parameters.
"""

import json
import sys
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from mixserve.errors import InvalidRequestError
from mixserve.platform.body_limit import BodyLimit
from mixserve.platform.front_door import ApiError, Arrival, Caller, FrontDoor, Run
from mixserve.platform.generations import InProcessReplica, on_replicas
from mixserve.platform.grpc_ingress import GrpcMethods
from mixserve.platform.openai_api import ChatCompletionRequest, CompletionRequest
from mixserve.platform.openai_shapes import ChatShape, CompletionShape
from mixserve.replicas.deployment import AttentionReplica

app = FastAPI(title="mixserve", description="OpenAI-compatible serving of Mistral / Mixtral", version="1")


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(int(err.retry_after_s))} if err.retry_after_s else None
    return JSONResponse(status_code=err.status, content=err.body(), headers=headers)


# Everything the ingress class uses must be defined above it: @serve.deployment pickles the
# class when it is defined, with the module globals that exist at that moment.
@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
    if first.get("type") == "json_invalid":  # loc is ("body", the character offset): not a parameter
        reason = (first.get("ctx") or {}).get("error") or first["msg"]
        return error_response(ApiError(400, f"the request body is not valid JSON: {reason}", None))
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return error_response(ApiError(400, f"{param or 'body'}: {first['msg']}", param))


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


app.add_middleware(BodyLimit)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator, and the run it streams, however the response ends. Starlette
    abandons the generator when a client disconnects while a chunk is being sent; its cleanup
    (abort the choices, settle the lease) would then wait for garbage collection, and a tenant's
    concurrency slot with it. And a generator cancelled before its first step runs none of its
    code, cleanup included: the run is closed here too (a no-op when the generator closed it)."""

    def __init__(self, content, run: Run, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.run.close("client_closed")  # (the status only applies where nothing ended the run)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@serve.deployment
@serve.ingress(app)
class HttpIngress(GrpcMethods):  # gRPC methods mixed in: Serve's gRPC proxy calls the ingress by method name
    """The front door. Given `replica` (a handle) it runs in its own deployment and starts
    generations on the attention replicas; given `in_process` (an attention replica's
    constructor arguments and its request capacity) it IS an attention replica, and outputs
    reach the response without leaving the process (mixserve.platform.generations)."""

    async def __init__(self, replica, ledger, router, model_name: str, checkpoint, tenants: list[dict],
                       system_prompt: str | None = None, max_body_bytes: int = 1 << 20,
                       first_output_timeout_s: float = 300.0, max_model_len: int | None = None,
                       in_process: dict | None = None):
        self.replica: AttentionReplica | None = None
        if in_process is not None:
            self.replica = await AttentionReplica.start(**in_process["replica"])
            open_generation = InProcessReplica(self.replica, in_process["capacity"]).open
        else:
            open_generation = on_replicas(replica)
        self.door = FrontDoor(open_generation, ledger, router, model_name, checkpoint, tenants, system_prompt,
                              first_output_timeout_s, max_model_len)
        if self.replica is not None:  # the engine hears how many requests are on their way to it
            self.replica.engine.arrivals = lambda: self.door.arriving
        BodyLimit.max_bytes = self.max_body_bytes = max_body_bytes
        # Serve runs this class on its own event-loop thread beside its system loop; a short GIL
        # switch interval keeps one busy thread from making every other request wait 5 ms a turn.
        sys.setswitchinterval(0.0005)

    def check_health(self) -> None:
        """Serve's health check: when the attention replica runs here, its health is this one's."""
        if self.replica is not None:
            self.replica.check_health()

    # ---- the attention replica's own calls, when it runs here (`mixserve status`, reports) --
    def stats(self) -> dict:
        return self._local().stats()

    def startup_report(self) -> dict:
        return self._local().startup_report()

    def weights_report(self) -> dict:
        return self._local().weights_report()

    def _local(self) -> AttentionReplica:
        if self.replica is None:
            raise RuntimeError("this front door runs apart from the attention replicas; ask them (AttentionReplica)")
        return self.replica

    def _caller(self, request: Request) -> Caller:
        return self.door.authenticate(request.headers.get("authorization"))

    # ---- plain endpoints ---------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        caller = self._caller(request)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mixserve"} for m in self.door.visible_models(caller)]
        return {"object": "list", "data": data}

    @app.get("/v1/usage")
    async def usage_report(self, request: Request) -> dict[str, Any]:
        caller = self._caller(request)
        if not caller.admin:
            raise ApiError(403, "reading usage needs an admin key")
        await self.door.meter.flush()  # this replica's batched metering first (others lag by at most 0.25 s)
        return {"object": "usage", "tenants": await self.door.ledger.usage.remote()}

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        caller = self._caller(request)
        if not caller.admin:
            raise ApiError(403, "reading metrics needs an admin key")
        shard_tokens = None
        if self.door.router is not None:
            shard_tokens = (await self.door.router.status.remote()).shard_tokens
        await self.door.meter.flush()
        text = await self.door.ledger.metrics.remote(shard_tokens)
        return Response(content=text, media_type="text/plain; version=0.0.4")

    # ---- generation --------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        with self.door.arrival() as arrival:
            caller = self._caller(request)
            self.door.check_model(caller, body.model)
            if body.echo:
                raise ApiError(400, "echo is not supported", "echo")
            params = self._params(body, body.logprobs)
            prompt_ids = await self.door.completion_prompt(body.prompt)
            return await self._generate(caller, body, params, prompt_ids, False, "completions", arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        with self.door.arrival() as arrival:
            caller = self._caller(request)
            self.door.check_model(caller, body.model)
            params = self._params(body)
            if body.messages[-1].role != "user":
                raise ApiError(400, "the last message must be from the user", "messages")
            prompt_ids = await self.door.chat_prompt(caller, [m.model_dump() for m in body.messages])
            # (sampling_params took max_completion_tokens into max_tokens)
            return await self._generate(caller, body, params, prompt_ids, True, "chat", arrival, open_ended=body.max_tokens is None)

    @staticmethod
    def _params(body, *args):
        try:
            return body.sampling_params(*args)
        except InvalidRequestError as exc:
            raise ApiError(400, exc.message, exc.param) from None

    async def _generate(self, caller: Caller, body, params, prompt_ids: list[int], chat: bool, endpoint: str,
                        arrival: Arrival | None = None, open_ended: bool = False):
        run = await self.door.start(caller, prompt_ids, params, body.n, chat, body.stream, endpoint, arrival, open_ended)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = ChatShape(self.door.names, ident, body) if chat else CompletionShape(self.door.names, ident, body)
        if body.stream:
            return ClosingStreamingResponse(self._stream(run, shape, body), run, media_type="text/event-stream")
        return shape.whole(await run.finals(), run.record)

    async def _stream(self, run: Run, shape, body):
        try:
            async for i, out in run.events():
                for chunk in shape.chunks(i, out):
                    yield sse(chunk)
            if body.include_usage:
                yield sse(shape.usage_chunk(run.record))
        except ApiError as err:
            yield sse(err.body())
        except BaseException:
            run.close("client_closed")  # the client left: every choice aborts and frees its slot
            raise
        finally:
            run.close()
        yield sse("[DONE]")
