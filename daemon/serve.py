"""`unlearnd serve`: the model over an OpenAI-compatible HTTP API, every request routed through the unlearning
adapters that apply to it (detector.RoutedModel: the user's turns decide, routed adapters at full strength,
everything else the base model token for token).

    POST /v1/chat/completions, /v1/completions, GET /v1/models[/{id}]   OpenAI's API (daemon/openai_api.py), SSE
    POST /v1/route   {"texts": [...]} or {"messages": [...]}     -> the router's decision, no generation
    GET  /v1/adapters                                            -> adapters served now
    GET  /healthz    200 when every active adapter is loaded from a live source, else 503 (daemon/adapter_state.py)
    GET  /metrics

The adapter set is the ledger's active adapters, reconciled periodically and on every adapters-topic event
(daemon/adapter_state.py). Binds 127.0.0.1 unless config [serve] says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request  # a module name: FastAPI reads the endpoints' annotations at run time

from adapters.devices import device_of
from adapters.store import ArtifactStore
from daemon import adapter_state
from daemon import openai_api as oai
from daemon.adapter_state import AdapterSet
from daemon.body_limit import BodyLimit
from daemon.config import Config, Serve
from daemon.ledger_backends import ledger_location
from daemon.metrics import GENERATION_SECONDS, ROUTER_DECISIONS, ROUTER_FEATURE_CACHE, ROUTER_SECONDS
from daemon.models import new_router
from detector import Completion, Encoder, PromptTooLong, RoutedModel, Router, Routing
from detector.text_stream import TextStream

if TYPE_CHECKING:  # imported where used: only `unlearnd serve` needs the web stack
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

log = logging.getLogger("unlearnd.serve")
Reply = TypeVar("Reply")  # an endpoint's answer
# On SIGTERM, requests still running after this long are cancelled, which ends their generations at the next token
SHUTDOWN_GRACE_S = 5


class Service:
    """The routed model (or only its router, for route-only serving) and the adapter set it serves."""

    def __init__(self, model_name: str, routed: RoutedModel, adapters: AdapterSet, *, root: str = "",
                 max_new_tokens: int = 64, route_only: bool = False):
        self.model_name = model_name
        self.routed = routed
        self.adapters = adapters
        self.root = root  # where the base weights come from (/v1/models)
        self.max_new_tokens = max_new_tokens
        self.route_only = route_only
        self.started = time.time()

    @property
    def router(self) -> Router:
        return self.routed.router

    def route(self, texts_of_inputs: list[list[str]]) -> list[Routing]:
        """One Routing per serving input (each given as the texts detector.inputs extracted from it)."""
        out = []
        for texts in texts_of_inputs:
            t0 = time.perf_counter()
            routing = self.routed.route_texts(texts)
            ROUTER_SECONDS.observe(time.perf_counter() - t0)
            ROUTER_DECISIONS.labels(self.model_name, "true" if routing.gate_weights else "false").inc()
            out.append(routing)
        return out

    def listing(self) -> list[dict[str, Any]]:
        return [{"adapter_id": aid, "path": str(ref.path), "sha256": ref.sha256, "created_at": ref.created_at,
                 "vectors": self.router.gates[aid].banks[0].ntotal}
                for aid, ref in sorted(self.adapters.loaded.items()) if aid in self.router.gates]

    def models(self) -> list[dict[str, Any]]:
        cards = [oai.model_card(self.model_name, root=self.root, parent=None, created=self.started)]
        for aid, ref in sorted(self.adapters.loaded.items()):
            cards.append(oai.model_card(aid, root=str(ref.path), parent=self.model_name,
                                        created=ref.created_at or self.started))
        return cards

    def knows_model(self, name: str | None) -> bool:
        return name in (None, "", self.model_name) or name in self.adapters.loaded


def build_app(service: Service, *, max_body_bytes: int = Serve().max_body_bytes) -> FastAPI:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    # No /docs, /redoc or /openapi.json: the API is OpenAI's (README), and those pages fetch scripts from a CDN.
    app = FastAPI(title="unlearnd serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    # Every route says response_model=None: its return annotation is for mypy, not a response model for FastAPI
    # (handlers return plain dicts or Response objects, serialized as they are).

    def fail(message: str, code: int = 400, kind: str = "invalid_request_error",
             param: str | None = None) -> JSONResponse:
        return JSONResponse(oai.error(message, kind=kind, code=code, param=param), status_code=code)

    @app.exception_handler(StarletteHTTPException)
    def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (no such path, method not allowed, a body that cannot be read) in the same
        error shape as every other answer."""
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return fail(str(exc.detail), exc.status_code, kind)

    @app.exception_handler(Exception)
    def crashed(request: Request, exc: Exception) -> JSONResponse:
        """A failure no check foresaw: logged with its traceback, answered in the API's error shape."""
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return fail(f"internal error ({type(exc).__name__}); the server log has the details", 500, "internal_error")

    @app.exception_handler(RequestValidationError)
    def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc holds the character where parsing failed
            at = [x for x in first.get("loc", ()) if isinstance(x, int)]
            return fail(f"the body is not valid JSON ({(first.get('ctx') or {}).get('error', 'invalid')}"
                        + (f" at character {at[0]})" if at else ")"))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type", "missing"):
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        return fail(f"{where}: {message}" if where else message, param=where or None)

    async def until_disconnected(request: Request, answer: Callable[[threading.Event], Reply]
                                 ) -> Reply | JSONResponse:
        """answer(cancel) in a worker thread; `cancel` is set once the client has gone away, which ends a
        generation at its next token instead of running it to its end for no one (requests generate one at a
        time: an abandoned one holds up every request behind it). The same when the server, shutting down, cancels
        the requests still running after its grace period: they are answered 503."""
        from starlette.concurrency import run_in_threadpool

        cancel = threading.Event()
        work = asyncio.ensure_future(run_in_threadpool(answer, cancel))
        try:
            while not (await asyncio.wait({work}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    cancel.set()
        except asyncio.CancelledError:
            cancel.set()
            return fail("the server is shutting down; send the request again", 503, "service_unavailable")
        return work.result()

    def refuse(body: oai._Body) -> JSONResponse | None:
        if service.route_only:
            return fail("route-only server: no model loaded", 409, "conflict_error")
        if not service.knows_model(body.model):
            return fail(f"The model `{body.model}` does not exist.", 404, "NotFoundError", "model")
        why = oai.unsupported(body)
        return fail(why) if why else None

    def too_long(exc: PromptTooLong, param: str) -> JSONResponse:
        refused = oai.error(str(exc), param=param)
        refused["error"]["code"] = "context_length_exceeded"  # OpenAI's code for it
        return JSONResponse(refused, status_code=400)

    def timed(completion: Completion) -> Completion:
        GENERATION_SECONDS.labels(service.model_name).observe(completion.seconds)
        return completion

    def sse(events: Iterator[dict[str, Any]], stream: TextStream) -> StreamingResponse:
        """The events as server-sent events, then [DONE]. A generation that fails midway ends the stream with an
        error event; a client that goes away closes `stream`, which ends the generation at its next token."""
        from starlette.concurrency import iterate_in_threadpool

        async def body() -> AsyncIterator[str]:
            try:
                async for event in iterate_in_threadpool(events):
                    yield f"data: {json.dumps(event)}\n\n"
            except Exception as exc:  # the status line is sent already: say so in the stream
                log.exception("a streamed generation failed")
                failed = oai.error(f"generation failed: {type(exc).__name__}", kind="server_error", code=500)
                yield f"data: {json.dumps(failed)}\n\n"
            finally:
                stream.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: oai.ChatCompletionBody, request: Request) -> Response | dict[str, Any]:
        return await until_disconnected(request, lambda cancel: chat(body, cancel))

    def chat(body: oai.ChatCompletionBody, cancel: threading.Event) -> Response | dict[str, Any]:
        if (refused := refuse(body)) is not None:
            return refused
        routed = service.routed
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = routed.chat_prompt(messages)
        except ValueError as exc:
            return fail(str(exc))
        [routing] = service.route([routed.chat_texts(messages)])
        sampling = body.sampling(service.max_new_tokens)
        try:
            if not body.stream:
                done = routed.generate(prompt, routing, sampling, cancel=cancel)
                return oai.chat_response(service.model_name, timed(done))
            stream = routed.stream(prompt, routing, sampling)
        except PromptTooLong as exc:
            return too_long(exc, "messages")
        rid, created = oai.new_id("chatcmpl"), int(time.time())

        def events() -> Iterator[dict[str, Any]]:
            yield oai.chat_chunk(rid, service.model_name, created, {"role": "assistant", "content": ""},
                                 unlearnd=oai.extra(routing))
            try:
                for piece in stream:
                    yield oai.chat_chunk(rid, service.model_name, created, {"content": piece})
            finally:
                stream.close()
            c = timed(cast(Completion, stream.completion))  # read to its end above: its completion is set
            yield oai.chat_chunk(rid, service.model_name, created, {}, c.finish_reason)
            if body.include_usage:
                yield {**oai.chat_chunk(rid, service.model_name, created, {}), "choices": [], "usage": oai.usage([c])}

        return sse(events(), stream)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: oai.CompletionBody, request: Request) -> Response | dict[str, Any]:
        return await until_disconnected(request, lambda cancel: complete(body, cancel))

    def complete(body: oai.CompletionBody, cancel: threading.Event) -> Response | dict[str, Any]:
        if (refused := refuse(body)) is not None:
            return refused
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not all(prompts) or sum(map(len, prompts)) > oai.MAX_PROMPT_CHARS:
            return fail(f"prompt must be non-empty and at most {oai.MAX_PROMPT_CHARS} characters", param="prompt")
        routed = service.routed
        routings = service.route([routed.prompt_texts(p) for p in prompts])
        sampling = body.sampling(16)  # OpenAI's default for completions
        if body.stream and len(prompts) != 1:
            return fail("stream one prompt at a time", param="prompt")
        try:
            if not body.stream:
                done = []
                for p, r in zip(prompts, routings, strict=True):
                    if cancel.is_set():  # the client went away: not one more generation for it
                        return fail("the client went away", 499)
                    done.append(timed(routed.generate(p, r, sampling, templated=False, cancel=cancel)))
                texts = [(p if body.echo else "") + c.text for p, c in zip(prompts, done, strict=True)]
                return oai.completion_response(service.model_name, done, texts)
            stream = routed.stream(prompts[0], routings[0], sampling, templated=False)
        except PromptTooLong as exc:
            return too_long(exc, "prompt")
        rid, created = oai.new_id("cmpl"), int(time.time())

        def events() -> Iterator[dict[str, Any]]:
            yield oai.completion_chunk(rid, service.model_name, created, prompts[0] if body.echo else "",
                                       unlearnd=oai.extra(routings[0]))
            try:
                for piece in stream:
                    yield oai.completion_chunk(rid, service.model_name, created, piece)
            finally:
                stream.close()
            c = timed(cast(Completion, stream.completion))  # read to its end above: its completion is set
            yield oai.completion_chunk(rid, service.model_name, created, "", c.finish_reason,
                                       **({"usage": oai.usage([c])} if body.include_usage else {}))

        return sse(events(), stream)

    @app.get("/v1/models", response_model=None)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.models()}

    @app.get("/v1/models/{name}", response_model=None)
    async def model(name: str) -> Response | dict[str, Any]:
        card = next((c for c in service.models() if c["id"] == name), None)
        return card if card is not None else fail(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")

    @app.post("/v1/route", response_model=None)
    def route(body: oai.RouteBody) -> Response | dict[str, Any]:
        if (body.texts is None) == (body.messages is None):
            return fail("give exactly one of texts, messages")
        if body.messages is not None:
            [routing] = service.route([service.routed.chat_texts([m.model_dump() for m in body.messages])])
            return {"routes": [routing.gate_weights], "adapters": routing.report()}
        assert body.texts is not None  # exactly one of the two, checked above
        routings = service.route([service.routed.prompt_texts(t) for t in body.texts])  # each as a prompt
        return {"routes": [r.gate_weights for r in routings]}

    @app.get("/v1/adapters", response_model=None)
    def adapters() -> dict[str, Any]:
        return {"model": service.model_name, "adapters": service.listing()}

    # Probes and scrapes never wait for a thread behind the requests: the shared pool's threads can all be taken
    # by requests waiting for the model (one generation at a time), and a probe that times out restarts the pod.
    # The health report waits for the adapter set's lock (held while an adapter loads), so in a thread of its own.
    probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healthz")

    @app.api_route("/healthz", methods=["GET", "HEAD"], response_model=None)  # HEAD: some load balancers' checks
    async def healthz() -> JSONResponse:
        ok, report = await asyncio.get_running_loop().run_in_executor(probes, service.adapters.health)
        return JSONResponse({"ok": ok, "model": service.model_name, **report}, status_code=200 if ok else 503)

    @app.get("/metrics", response_model=None)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _count_cache_lookups(hits: int, misses: int) -> None:
    ROUTER_FEATURE_CACHE.labels("hit").inc(hits)
    ROUTER_FEATURE_CACHE.labels("miss").inc(misses)


def load_service(cfg: Config, model: str, *, base_dir: Path | None = None, route_only: bool = False) -> Service:
    """The service for one registered causal_lm model; base weights from `base_dir` or the model's bootstrap.
    Its adapter set is empty until `adapter_state.start` (or `AdapterSet.reconcile`) fills it."""
    lm = tok = None
    root = ""
    if not route_only:
        from adapters.lm import loading as lm_mod

        spec = cfg.model(model)
        if base_dir is None:
            base_dir = lm_mod.resolve_source(spec.bootstrap.source or "smollm2",
                                             ArtifactStore(cfg.state.artifacts_path).root / model)
        lm, tok = lm_mod.load(base_dir, device=spec.device, dtype=spec.dtype)
        root = str(base_dir)
    # the router's encoder runs next to the model it routes for (a route-only service: where it is configured)
    encoder = Encoder(device=str(device_of(lm)) if lm is not None else cfg.model(model).device,
                      cache_entries=cfg.serve.feature_cache_entries, on_cache_lookup=_count_cache_lookups)
    routed = RoutedModel(lm, tok, new_router(cfg, encoder), context_turns=cfg.serve.context_turns)
    ledger = ledger_location(cfg.state)  # the SQLite file or the shared PostgreSQL, read-only
    adapters = AdapterSet(model, routed, ledger_path=ledger, reconcile_s=cfg.serve.reconcile_s, lazy=route_only)
    return Service(model, routed, adapters, root=root, max_new_tokens=cfg.serve.max_new_tokens,
                   route_only=route_only)


def serve(cfg: Config, model: str, sock: socket.socket, *, base_dir: Path | None = None,
          route_only: bool = False) -> None:
    """`unlearnd serve`: blocks serving HTTP on `sock` until interrupted. The CLI binds `sock` before the model
    loads, so a port in use is said at once and cannot be taken meanwhile."""
    import uvicorn

    service = load_service(cfg, model, base_dir=base_dir, route_only=route_only)
    threads = adapter_state.start(service.adapters, cfg)
    ok, report = service.adapters.health()
    log.info("serving %s with %d adapter(s) (source: %s)", model, len(service.adapters.loaded), report["source"])
    config = uvicorn.Config(build_app(service, max_body_bytes=cfg.serve.max_body_bytes), log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (uvicorn.run swallows it the same way)
        pass
    finally:
        adapter_state.stop(threads)


def route_text(cfg: Config, model: str, text: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """`unlearnd route "text"`: the router's decision with per-adapter scores, from the ledger's active adapters
    (or, where the ledger is not readable, from the adapters topic)."""
    service = load_service(cfg, model, route_only=True)
    threads = adapter_state.start(service.adapters, cfg, wait_s=timeout_s)
    try:
        texts = service.routed.prompt_texts(text)
        decision = service.router.explain(texts[0] if texts else text)
        decision["routed_text"] = texts[0] if texts else text
        return decision
    finally:
        adapter_state.stop(threads)

