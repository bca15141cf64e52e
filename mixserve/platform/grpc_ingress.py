"""The gRPC front door (mixserve.v1, grpc_api/mixserve_v1.proto) on Ray Serve's gRPC proxy.

Serve's gRPC proxy calls the application's ingress deployment by RPC method name, so these
methods are mixed into the HTTP ingress class: one deployment, both protocols, the same
FrontDoor (keys from `authorization` metadata, quotas, validation, metering). ApiError
statuses map to gRPC codes; a quota refusal also sets `retry-after-s` trailing metadata.
"""

from __future__ import annotations

import uuid

import grpc

from mixserve.errors import InvalidRequestError
from mixserve.platform.front_door import ApiError, Caller, FrontDoor, Run
from mixserve.platform.grpc_api import mixserve_v1_pb2 as pb
from mixserve.platform.openai_api import MAX_N, TokenText, new_logprobs
from mixserve.replicas.sampling_params import SamplingParams

SERVICER_FUNCTION = "mixserve.platform.grpc_api.mixserve_v1_pb2_grpc.add_MixserveServicer_to_server"
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def set_error(context, err: ApiError) -> None:
    context.set_code(GRPC_CODES.get(err.status, grpc.StatusCode.INTERNAL))
    context.set_details(err.message)
    if err.retry_after_s:
        context.set_trailing_metadata([("retry-after-s", str(int(err.retry_after_s)))])


def sampling_params(options: pb.SamplingOptions) -> tuple[SamplingParams, int]:
    def opt(name: str, default):
        return getattr(options, name) if options.HasField(name) else default

    n = opt("n", 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}, got {n}", "n")
    try:
        params = SamplingParams(
            max_tokens=opt("max_tokens", 16), temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0),
            top_k=opt("top_k", -1), seed=opt("seed", None), stop=list(options.stop), ignore_eos=options.ignore_eos,
            logprobs=opt("logprobs", None),
        )
    except InvalidRequestError as exc:
        raise ApiError(400, exc.message, exc.param) from None
    return params, n


def token_logprobs(tokens: list[int], lps: list[dict[int, float]], names: TokenText) -> list[pb.TokenLogprob]:
    """tokens with their log-probabilities ({token id: log-prob} each; empty when none were asked for)."""
    return [
        pb.TokenLogprob(
            token_id=token, token=names.text(token), logprob=lp.get(token, 0.0),
            top=[pb.TopLogprob(token_id=t, token=names.text(t), logprob=v) for t, v in sorted(lp.items(), key=lambda kv: -kv[1])],
        )
        for token, lp in zip(tokens, lps)
    ]


class GrpcMethods:
    """The mixserve.v1.Mixserve service, as methods of the ingress deployment."""

    door: FrontDoor
    max_body_bytes: int  # the HTTP body limit, for messages too (Serve's gRPC proxy takes up to 2 GiB)

    def _grpc_caller(self, context) -> Caller:
        metadata = dict(context.invocation_metadata()) if context is not None else {}
        return self.door.authenticate(metadata.get("authorization"))

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        try:
            caller = self._grpc_caller(grpc_context)
        except ApiError as err:
            set_error(grpc_context, err)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.Model(id=m, owned_by="mixserve") for m in self.door.visible_models(caller)])

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        return await self._whole(request, grpc_context, chat=False)

    async def Chat(self, request: pb.ChatRequest, grpc_context=None) -> pb.GenerateResponse:
        return await self._whole(request, grpc_context, chat=True)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):
        async for chunk in self._chunks(request, grpc_context, chat=False):
            yield chunk

    async def ChatStream(self, request: pb.ChatRequest, grpc_context=None):
        async for chunk in self._chunks(request, grpc_context, chat=True):
            yield chunk

    # ---- shared ------------------------------------------------------------------------------
    async def _start(self, request, context, chat: bool, stream: bool) -> Run:
        size = request.ByteSize()
        if size > self.max_body_bytes:  # refused before its text costs any tokenizing
            raise ApiError(413, f"the request message is {size} bytes, larger than {self.max_body_bytes}")
        with self.door.arrival() as arrival:
            caller = self._grpc_caller(context)
            self.door.check_model(caller, request.model)
            params, n = sampling_params(request.sampling)
            if chat:
                messages = [{"role": m.role, "content": m.content} for m in request.messages]
                if not messages or messages[-1]["role"] != "user":
                    raise ApiError(400, "messages must end with a user message", "messages")
                prompt_ids = await self.door.chat_prompt(caller, messages)
            else:
                kind = request.WhichOneof("prompt")
                if kind is None:
                    raise ApiError(400, "set a prompt: text or token_ids", "prompt")
                prompt_ids = await self.door.completion_prompt(request.text if kind == "text" else list(request.token_ids.ids))
            endpoint = "grpc_chat" if chat else "grpc_generate"
            open_ended = chat and not request.sampling.HasField("max_tokens")  # (FrontDoor.start)
            return await self.door.start(caller, prompt_ids, params, n, chat, stream, endpoint, arrival, open_ended)

    async def _whole(self, request, context, chat: bool) -> pb.GenerateResponse:
        try:
            run = await self._start(request, context, chat, stream=False)
        except ApiError as err:
            set_error(context, err)
            return pb.GenerateResponse()
        try:
            finals = await run.finals()
        except ApiError as err:
            set_error(context, err)
            return pb.GenerateResponse()
        choices = [
            pb.Choice(index=i, text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason or "",
                      logprobs=token_logprobs(out.token_ids, out.logprobs or [], self.door.names))
            for i, out in enumerate(finals)
        ]
        return pb.GenerateResponse(id=f"gen-{uuid.uuid4().hex}", model=request.model, choices=choices, usage=self._usage(run))

    async def _chunks(self, request, context, chat: bool):
        try:
            run = await self._start(request, context, chat, stream=True)
        except ApiError as err:
            # A stream that yields nothing would end OK: Serve's proxy takes the code set on the
            # context only when the method raises (it wraps the error with that code).
            set_error(context, err)
            raise
        ident = f"gen-{uuid.uuid4().hex}"
        try:
            async for i, out in run.events():
                if out.new_text or out.new_token_ids or out.finished:
                    yield pb.GenerateChunk(
                        id=ident, index=i, text=out.new_text, token_ids=out.new_token_ids,
                        finish_reason=(out.finish_reason or "") if out.finished else "",
                        logprobs=token_logprobs(*new_logprobs(out), self.door.names),
                    )
            yield pb.GenerateChunk(id=ident, usage=self._usage(run))
        except ApiError as err:
            set_error(context, err)
            raise
        except BaseException:
            run.close("client_closed")  # the client cancelled: every choice aborts and frees its slot
            raise
        finally:
            run.close()

    @staticmethod
    def _usage(run: Run) -> pb.Usage:
        completion = run.record.completion_total
        return pb.Usage(prompt_tokens=run.record.prompt_tokens, completion_tokens=completion,
                        total_tokens=run.record.prompt_tokens + completion)
