"""The OpenAI-compatible HTTP API, built around any :class:`shared.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /health`` (503 while the engine loads). The API owns text: it tokenizes
prompts, renders chat templates, detokenizes and finds stop strings. Each choice of a request is
one engine request; a choice stopped by a stop string, and every choice of a client that went
away, is aborted in the engine at once.

``X-Request-Id`` (``shared/request_id.py``): a client's id is the base of its engine request ids
(``<id>-<choice index>``) and is echoed; without one, the response's generated id is echoed.

Every client mistake is a 4xx with OpenAI's error object naming the field; the body is parsed
here (not by FastAPI) so that malformed JSON and wrong types are 400s, not 422s.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError

from shared import protocol as P
from shared.openapi import document
from shared.engine import Engine, GenerationRequest, ModelInfo, RequestFacts
from shared.errors import RequestError, engine_failed
from shared.request_id import RequestIdMiddleware
from shared.outputs import OutputProcessor, TextDelta
from shared.responses import ChunkBuilder, LogprobFormatter, error_body, now, sse


log = logging.getLogger("shared.api")
STATIC = Path(__file__).parent / "static"  # GET /: the playground (HTML, CSS, plain JavaScript)


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..."
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or None
        raise RequestError(f"{field}: {err['msg']}", param=field) from None


class _Choice:
    """One engine request and the output processor that turns its tokens into text."""

    def __init__(self, index: int, req: GenerationRequest, proc: OutputProcessor, first_of_prompt: bool = True,
                 echo: str | None = None) -> None:
        self.index, self.req, self.proc = index, req, proc
        self.first_of_prompt = first_of_prompt  # usage counts each prompt once, whatever n
        self.echo = echo  # the prompt's text, sent before the completion (``echo``)
        self.engine_done = False
        self.num_cached_tokens: int | None = None  # from the engine's RequestFacts (None: no prefix cache)

    @property
    def text(self) -> str:
        return (self.echo or "") + self.proc.text

    def echo_delta(self, facts: RequestFacts | None) -> TextDelta:
        """The prompt as the first delta, with its tokens' logprobs where the engine sent them."""
        ids = list(self.req.prompt_token_ids)
        entries = facts.prompt_logprobs if facts is not None and facts.prompt_logprobs else [None] * len(ids)
        lps = [None if e is None else e.logprob for e in entries]
        tops = [None if e is None else (*e.top_logprobs, (t, e.logprob)) for t, e in zip(ids, entries)]
        return TextDelta(text=self.echo or "", token_ids=ids, logprobs=lps, top_logprobs=tops, finish_reason=None)


def _cached_tokens(choices: list[_Choice]) -> int | None:
    """Prompt tokens the engine took from its prefix cache (vLLM's ``prompt_tokens_details``),
    once per prompt like ``prompt_tokens``; None where the engine has no prefix cache."""
    counts = [c.num_cached_tokens for c in choices if c.first_of_prompt]
    return None if all(n is None for n in counts) else sum(n or 0 for n in counts)


class OpenAIServer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.load_error: str | None = None  # set if engine.start() failed

    def failure(self) -> str | None:
        """Why this server cannot serve: its engine failed to load, or failed since."""
        return self.load_error or self.engine.error()

    def health(self) -> dict[str, Any]:
        """``/health``'s body: ``status`` ok, loading or failed (with ``error``), and the engine's stats."""
        if (failure := self.failure()) is not None:
            head: dict[str, Any] = {"status": "failed", "error": failure}
        else:
            head = {"status": "ok" if self.engine.info() is not None else "loading"}
        if (info := self.engine.info()) is not None and info.runtime:
            head["model"] = dict(info.runtime)  # how it runs: dtype, quantization, kernels
        return {**head, **dataclasses.asdict(self.engine.stats())}

    def info(self) -> ModelInfo:
        if (failure := self.failure()) is not None:
            raise engine_failed(failure)
        info = self.engine.info()
        if info is None:
            raise RequestError("the model is still loading; retry shortly", status=503,
                               type="service_unavailable")
        return info

    def _check_model(self, info: ModelInfo, name: str | None) -> None:
        if name is not None and name != info.name:
            raise RequestError(f"The model `{name}` does not exist.", param="model", status=404,
                               code="model_not_found")

    def _tokenize(self, info: ModelInfo, prompt: str | list[int], param: str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(info.tokenizer(prompt).input_ids)
        if not prompt:
            raise RequestError(f"{param} must not be empty", param=param)
        if any(not 0 <= t < info.vocab_size for t in prompt):
            raise RequestError(f"{param}: token ids must be in [0, {info.vocab_size})", param=param)
        return tuple(prompt)

    def default_max_tokens(self, room: int) -> int:
        """``max_tokens`` of a request that gives none: what the context leaves (``room``)."""
        return room

    def _choices(self, base_id: str, prompts: list[tuple[int, ...]], max_tokens: int | None,
                 req: P._Common, logprobs: int | None, prompt_param: str, prompt_logprobs: int | None = None,
                 echoes: list[str] | None = None) -> list[_Choice]:
        """One engine request per prompt and per ``n``; choice ``i`` of a seeded request uses
        ``seed + i``, so the choices differ but the whole response is reproducible."""
        info, out = self.info(), []
        for p_idx, ids in enumerate(prompts):
            limit = P.check_fits(len(ids), max_tokens, info.max_model_len, prompt_param)
            if max_tokens is None:
                limit = self.default_max_tokens(limit)
            params = P.sampling_params(req, limit, logprobs, prompt_logprobs)
            for i in range(req.n):
                if req.seed is not None and i:
                    params = P.sampling_params(req.model_copy(update={"seed": req.seed + i}), limit, logprobs,
                                               prompt_logprobs)
                index = p_idx * req.n + i
                greq = GenerationRequest(f"{base_id}-{index}", ids, params, time.monotonic(), req.timeout)
                out.append(_Choice(index, greq, OutputProcessor(info.tokenizer, ids, params.stop), i == 0,
                                   None if echoes is None else echoes[p_idx]))
        return out

    async def _run(self, choice: _Choice, queue: asyncio.Queue) -> None:
        echo_pending = choice.echo is not None
        if echo_pending and choice.req.params.prompt_logprobs is None:  # the prompt alone: send it now
            await queue.put((choice.index, choice.echo_delta(None)))
            echo_pending = False
        try:
            async with contextlib.aclosing(self.engine.generate(choice.req)) as events:
                async for event in events:
                    if isinstance(event, RequestFacts):  # once, before the first token
                        choice.num_cached_tokens = event.num_cached_tokens
                        if echo_pending:  # the prompt with its logprobs, computed in its prefill
                            await queue.put((choice.index, choice.echo_delta(event)))
                            echo_pending = False
                        continue
                    choice.engine_done = event.finish_reason is not None
                    delta = choice.proc.process(event)
                    await queue.put((choice.index, delta))
                    if delta.finish_reason is not None:  # the engine's, or a stop string's
                        break
        finally:
            if not choice.engine_done:  # stop string, client gone, or error
                self.engine.abort(choice.req.request_id)
            queue.put_nowait((choice.index, None))

    async def _merge(self, choices: list[_Choice]) -> AsyncIterator[tuple[int, TextDelta]]:
        """All choices' deltas in arrival order; aborts whatever is unfinished on exit."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._run(c, queue)) for c in choices]
        done = 0
        try:
            while done < len(tasks):
                index, delta = await queue.get()
                if delta is None:
                    done += 1
                    continue
                yield index, delta
            for t in tasks:  # surface engine errors
                t.result()
        finally:
            for t in tasks:  # each task's own cleanup aborts its engine request
                t.cancel()

    async def _respond(self, request: Request, builder: ChunkBuilder, choices: list[_Choice],
                       prompt_tokens: int, stream: bool, include_usage: bool) -> Any:
        if stream:
            return StreamingResponse(self._stream(builder, choices, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        results: dict[int, list[TextDelta]] = {c.index: [] for c in choices}

        async def collect() -> None:
            async for index, delta in self._merge(choices):
                results[index].append(delta)

        await _until_disconnect(request, collect())
        completion = sum(c.proc.num_tokens for c in choices)
        final = {c.index: (c.text, c.proc.finish_reason, results[c.index]) for c in choices}
        return JSONResponse(builder.final(final, prompt_tokens, completion, _cached_tokens(choices)))

    async def _stream(self, builder: ChunkBuilder, choices: list[_Choice], prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        if builder.chat:
            for c in choices:
                yield sse(builder.role_chunk(c.index))
        try:
            async for index, delta in self._merge(choices):
                if delta.text or delta.finish_reason or delta.logprobs[0] is not None:
                    yield sse(builder.chunk(index, delta))
        except Exception as e:  # the stream has begun: report in-band, as OpenAI does
            yield sse(error_body(f"generation failed: {e}", "server_error", None, 500))
            return
        if include_usage:
            yield sse(builder.usage_chunk(prompt_tokens, sum(c.proc.num_tokens for c in choices),
                                          _cached_tokens(choices)))
        yield sse("[DONE]")

    async def _begin(self, request: Request, schema: type[P._Common]) -> tuple[Any, ModelInfo]:
        """Parse and check what every endpoint checks: the body, the model, the common fields."""
        req = await _parse(request, schema)
        info = self.info()
        self._check_model(info, req.model)
        P.check_common(req)
        return req, info

    async def _serve(self, request: Request, req: P._Common, info: ModelInfo, chat: bool,
                     prompts: list[tuple[int, ...]], max_tokens: int | None, logprobs: int | None,
                     prompt_logprobs: int | None = None, echoes: list[str] | None = None) -> Any:
        builder = ChunkBuilder(chat, info.name, _formatter(info, req, logprobs))
        request_id = getattr(request.state, "request_id", None) or builder.id
        request.state.request_id = request_id  # echoed by RequestIdMiddleware
        choices = self._choices(request_id, prompts, max_tokens, req, logprobs, "messages" if chat else "prompt",
                                prompt_logprobs, echoes)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._respond(request, builder, choices, sum(map(len, prompts)), req.stream, include_usage)

    async def completions(self, request: Request) -> Any:
        req, info = await self._begin(request, P.CompletionRequest)
        logprobs, prompt_logprobs = P.completion_logprobs(req, info.prompt_logprobs)
        raw = P.prompt_list(req)
        prompts = [self._tokenize(info, p, "prompt") for p in raw]
        echoes = None  # the prompt as the client sent it (token ids: decoded), before the completion
        if req.echo:
            echoes = [p if isinstance(p, str) else info.tokenizer.decode(list(p)) for p in raw]
        return await self._serve(request, req, info, False, prompts, req.max_tokens, logprobs,
                                 prompt_logprobs, echoes)

    async def chat(self, request: Request) -> Any:
        req, info = await self._begin(request, P.ChatCompletionRequest)
        messages = P.chat_messages(req)
        logprobs = P.chat_logprobs(req)
        try:
            text = info.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, raised for e.g. non-alternating roles
            raise RequestError(f"messages: {e}", param="messages") from None
        ids = tuple(info.tokenizer(text, add_special_tokens=False).input_ids)
        return await self._serve(request, req, info, True, [ids], P.chat_max_tokens(req), logprobs)

    def models(self) -> dict[str, Any]:
        info = self.info()
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": now(),
                                            "owned_by": "stepserve", "max_model_len": info.max_model_len,
                                            **dict(info.runtime)}]}


def _formatter(info: ModelInfo, req: P._Common, logprobs: int | None) -> LogprobFormatter | None:
    return None if logprobs is None else LogprobFormatter(info.tokenizer, req.return_tokens_as_token_ids)


async def _until_disconnect(request: Request, work: Any) -> None:
    """Run ``work``; if the client disconnects first, cancel it (its cleanup aborts the engine)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _record_load_failure(task: asyncio.Task, server: OpenAIServer) -> None:
    """A failed ``engine.start()`` is a clear error on ``/health`` and on requests, never "loading" forever."""
    if task.cancelled() or (e := task.exception()) is None:
        return
    server.load_error = f"loading failed: {type(e).__name__}: {e}"
    log.error("%s", server.load_error, exc_info=e)


def build_app(engine: Engine, server: OpenAIServer | None = None) -> FastAPI:
    """``server``: an ``OpenAIServer`` subclass built around ``engine`` (step 06 adds admission)."""
    server = server or OpenAIServer(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(engine.start())  # serve /health (503) while loading
        loading.add_done_callback(lambda task: _record_load_failure(task, server))
        yield
        loading.cancel()
        await engine.shutdown()

    app = FastAPI(title="stepserve", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(RequestError)
    async def _on_request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error(e)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = server.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    document(app)  # the bodies these handlers parse themselves, and their answers
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the playground's page
    app.get("/", include_in_schema=False)(lambda: FileResponse(STATIC / "index.html"))
    return app
