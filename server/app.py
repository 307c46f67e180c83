"""`omnivox serve`: one process for the browser pages, the Realtime websocket and the chat endpoint.

Starlette on uvicorn with uvicorn's `websockets` protocol layer: plain `websockets` serves no POST (the chat
completions endpoint) and no static files, while Starlette adds routing and static files in a few lines and keeps
`websockets` doing the websocket framing. All model work goes through one `Engine` (one worker thread, see
engine.py); `app.state` holds omni, engine, metrics, options and the live sessions.

Security: binds 127.0.0.1 by default; with `api_key`, /v1/* (HTTP and websocket) need `Authorization: Bearer
KEY` or the `openai-insecure-api-key.KEY` subprotocol; browser Origins are checked against `allow_origins`
(pages served from this same loopback server always pass). The pages, /healthz and /metrics stay open.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from omnivox.server.engine import Engine
from omnivox.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from omnivox.server.metrics import Metrics
from omnivox.server.openai_chat import chat_completions
from omnivox.server.realtime import RealtimeSession, SessionLimits
from omnivox.server.security import check_api_key, origin_allowed, select_subprotocol

WEB_DIR = Path(__file__).resolve().parent / "web"


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str | None = None                 # None: the checkpoint directory's name
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    max_sessions: int = 16                      # open websocket sessions; more are refused with server_busy
    max_active: int = 4                         # responses stepped together by the engine
    max_queued: int = 16                        # responses waiting for a slot; more -> server_busy
    limits: SessionLimits = field(default_factory=SessionLimits)

    @property
    def ws_max_size(self) -> int:
        # over the event limit, so an oversized event is answered with an error event instead of a dropped socket
        return 2 * self.limits.max_event_bytes + (1 << 20)


# ------------------------------------------------------------------------------------------------ security hooks
def _origin_ok(headers, options: ServerOptions) -> bool:
    return origin_allowed(headers.get("origin"), options.allow_origins, options.host,
                          request_host=headers.get("host"))


def _error_body(code: str, message: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"type": type_, "code": code, "message": message, "param": None}}


def _gate(request: Request) -> Response | None:
    options = request.app.state.options
    if not _origin_ok(request.headers, options):
        return JSONResponse(_error_body("origin_not_allowed", "this Origin may not use the server; start it with "
                                        "--allow-origin"), status_code=403)
    if not check_api_key(request.headers, (), options.api_key):
        return JSONResponse(_error_body("invalid_api_key", "missing or wrong API key"), status_code=401)
    return None


# ------------------------------------------------------------------------------------------------ routes
def _page(name: str):
    async def page(request: Request) -> Response:
        path = WEB_DIR / name
        if not path.is_file():
            return PlainTextResponse(f"{name} is not installed", status_code=404)
        return FileResponse(path, media_type="text/html")
    return page


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), headers={"content-type": METRICS_CONTENT_TYPE})


async def voices(request: Request) -> Response:
    if (denied := _gate(request)) is not None:
        return denied
    names = sorted(request.app.state.omni.speakers or {})
    default = ("Chelsie" if "Chelsie" in names else names[0]) if names else None
    return JSONResponse({"voices": names, "default": default})


async def models(request: Request) -> Response:
    if (denied := _gate(request)) is not None:
        return denied
    model_id = request.app.state.options.model_id
    return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                      "owned_by": "omnivox"}]})


async def chat(request: Request) -> Response:
    if (denied := _gate(request)) is not None:
        return denied
    return await chat_completions(request)


async def realtime(ws: WebSocket) -> None:
    state = ws.app.state
    options: ServerOptions = state.options
    offered = ws.scope.get("subprotocols") or []
    # refusing before accept answers the handshake with HTTP 403
    if not _origin_ok(ws.headers, options) or not check_api_key(ws.headers, offered, options.api_key):
        await ws.close(code=1008)
        return
    await ws.accept(subprotocol=select_subprotocol(offered))  # "realtime" when offered, never the key
    if len(state.sessions) >= options.max_sessions:
        state.metrics.errors_total.inc(type="server_busy")
        await ws.send_text(json.dumps({"type": "error", "event_id": "event_busy", "error": {
            "type": "server_error", "code": "server_busy", "param": None, "event_id": None,
            "message": f"the server is at its limit of {options.max_sessions} sessions; try again later"}}))
        await ws.close(code=1013)
        return
    beta = ws.headers.get("openai-beta", "").startswith("realtime") or "openai-beta.realtime-v1" in offered
    session = RealtimeSession(ws, state, options.limits, options.model_id, beta=beta)
    state.sessions[session.id] = session
    state.metrics.sessions.inc()
    try:
        await session.run()
    finally:
        state.sessions.pop(session.id, None)
        state.metrics.sessions.dec()
        with contextlib.suppress(Exception):
            await ws.close()


def create_app(omni, options: ServerOptions | None = None) -> Starlette:
    options = options or ServerOptions()
    if options.model_id is None:
        options.model_id = Path(omni.path).name
    engine = Engine(omni, max_active=options.max_active, max_queued=options.max_queued)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            for s in list(app.state.sessions.values()):
                with contextlib.suppress(Exception):
                    await s.ws.close(code=1001)
            engine.close()

    routes = [
        Route("/", _page("index.html")),
        Route("/call", _page("call.html")),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/v1/voices", voices),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        WebSocketRoute("/v1/realtime", realtime),
        Mount("/static", app=StaticFiles(directory=str(WEB_DIR), check_dir=False), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.omni = omni
    app.state.engine = engine
    app.state.options = options
    app.state.metrics = Metrics()
    app.state.sessions = {}
    app.state.metrics.queue_depth.set_function(lambda: engine.stats()["queued"])
    return app


def uvicorn_config(app: Starlette, options: ServerOptions, log_level: str = "info"):
    import uvicorn

    return uvicorn.Config(app, host=options.host, port=options.port, ws="websockets-sansio",
                          ws_max_size=options.ws_max_size, log_level=log_level, lifespan="on")


def serve(omni, options: ServerOptions) -> None:
    import uvicorn

    uvicorn.Server(uvicorn_config(create_app(omni, options), options)).run()
