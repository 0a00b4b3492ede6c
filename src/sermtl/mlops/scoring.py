"""`sermtl serve`: MLflow's own scoring server behind a request-size limit.

Design notes (why it is built this way): docs/design/scoring.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from sermtl.params import ServingParams

MODEL_PATH_ENV = "SERMTL_SERVE_MODEL_PATH"  # the downloaded model, for each uvicorn worker
MAX_REQUEST_BYTES_ENV = "SERMTL_MAX_REQUEST_BYTES"  # overrides the model's serving.max_request_bytes
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # read by MLflow's scoring app
DRAIN_MAX_BYTES = 256 * 2**20  # of a refused body, read and discarded before the 413; beyond: cut off
DRAIN_MAX_S = 10.0
ERROR_CODE = "REQUEST_LIMIT_EXCEEDED"  # an MLflow error code, in MLflow's error body format

_logger = logging.getLogger("uvicorn.error")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestSizeLimit:
    """ASGI middleware: HTTP request bodies over `max_bytes` get 413 and never reach `app`."""

    def __init__(
        self,
        app: App,
        max_bytes: int,
        *,
        drain_max_bytes: int = DRAIN_MAX_BYTES,
        drain_max_s: float = DRAIN_MAX_S,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = int(max_bytes)
        self.drain_max_bytes = drain_max_bytes
        self.drain_max_s = drain_max_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and websockets, which MLflow does not serve)
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        size = _content_length(headers)
        if size is not None:
            if size <= self.max_bytes:
                await self.app(scope, receive, send)
                return
            if b"100-continue" not in headers.get(b"expect", b"").lower() and size <= self.drain_max_bytes:
                await self._drain(receive)
            await self._refuse(send, f"the request body is {size} bytes")
            return
        # No length given (chunked): count the body as it comes, keep at most max_bytes of it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                await self._refuse(send, f"the request body (chunked) is at least {size} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _drain(self, receive: Receive, received: int = 0) -> None:
        """Read and discard the rest of a refused body, within DRAIN_MAX_BYTES and DRAIN_MAX_S."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_max_s):
                while received <= self.drain_max_bytes:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    received += len(message.get("body", b""))

    async def _refuse(self, send: Send, what: str) -> None:
        message = (
            f"{what}; the limit is {self.max_bytes} bytes (serving.max_request_bytes): send less audio per "
            "request, as wav files (base64) rather than JSON floats"
        )
        body = json.dumps({"error_code": ERROR_CODE, "message": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    """The declared body size; None when the body is chunked or the header absent (or unreadable, which
    the server, h11 or httptools, has refused already): then the body is counted as it arrives. With a
    Content-Length the server delivers exactly that many bytes."""
    if b"transfer-encoding" in headers:
        return None
    try:
        return int(headers[b"content-length"])
    except (KeyError, ValueError):
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already read body first, then whatever the server sends (disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got {text!r}")
    return value


def request_limit(model: Any) -> int:
    """$SERMTL_MAX_REQUEST_BYTES, else the model's own max_request_bytes (serving.json), else the default."""
    override = os.environ.get(MAX_REQUEST_BYTES_ENV, "").strip()
    if override:
        return _positive_int(override, MAX_REQUEST_BYTES_ENV)
    from mlflow.exceptions import MlflowException

    python_model = None
    with contextlib.suppress(MlflowException, AttributeError):  # not a Python-model pyfunc
        python_model = model.unwrap_python_model()
    value = getattr(python_model, "max_request_bytes", None)
    return int(value) if value else ServingParams().max_request_bytes


def create_app() -> App:
    """The uvicorn app factory (one call per worker): the model at $SERMTL_SERVE_MODEL_PATH loaded as
    `mlflow models serve` loads it, served by MLflow's scoring app behind RequestSizeLimit."""
    from mlflow.pyfunc import scoring_server

    path = os.environ.get(MODEL_PATH_ENV)
    if not path:
        raise RuntimeError(
            f"${MODEL_PATH_ENV} is not set: start the server with `sermtl serve -m <model uri>`"
        )
    model = scoring_server.load_model_with_mlflow_config(path)
    limit = request_limit(model)
    _logger.info("sermtl serve: request bodies over %d bytes are refused with 413", limit)
    return RequestSizeLimit(scoring_server.init(model), limit)


def serve(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 1,
    timeout_s: int | None = None,
    max_request_bytes: int | None = None,
) -> None:
    """Download the model (as `mlflow models serve` does; `models:/` URIs need $MLFLOW_TRACKING_URI),
    then run uvicorn with `workers` processes of create_app until stopped (SIGINT/SIGTERM)."""
    import mlflow.artifacts
    import uvicorn

    if max_request_bytes is not None:
        os.environ[MAX_REQUEST_BYTES_ENV] = str(_positive_int(str(max_request_bytes), "--max-request-bytes"))
    if timeout_s is not None:
        os.environ[TIMEOUT_ENV] = str(int(timeout_s))
    from sermtl.mlops import tracking

    with tempfile.TemporaryDirectory(prefix="sermtl-serve-") as tmp:
        # A registry that does not answer fails within the retry budget, naming it without credentials.
        with tracking.mlflow_service():
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        os.environ[MODEL_PATH_ENV] = local
        uvicorn.run("sermtl.mlops.scoring:create_app", factory=True, host=host, port=port, workers=workers)
