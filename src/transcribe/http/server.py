"""uvicorn in a thread of the serving process (pool supervisor or lock server).

Signals stay with the serve loop (uvicorn installs none outside the main thread): `serve` starts the
HTTP thread, runs `Supervisor.run()` / `serve_lock`, and stops the thread when they return. The socket is
bound here, in the calling thread, so a port in use is a clear start-up error, not a dead thread.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

from loguru import logger

from transcribe.config import Config, parse_bind
from transcribe.core.errors import TranscribeError

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class HttpServer:
    def __init__(self, cfg: Config) -> None:
        if not cfg.http.bind:
            raise TranscribeError("no address to serve HTTP on: pass --http HOST:PORT or set http.bind")
        self.cfg = cfg
        self.host, self.port = parse_bind(cfg.http.bind)
        self._thread: threading.Thread | None = None
        self._server: object | None = None

    def start(self) -> "HttpServer":
        try:
            import uvicorn

            from transcribe.http.app import create_app
        except ImportError as e:
            raise TranscribeError(f"the HTTP API needs the `http` extra ({e.name} is missing): "
                                  "pip install 'transcribe[http]'") from None
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family, backlog=256)
        except OSError as e:
            raise TranscribeError(f"cannot listen on {self.cfg.http.bind}: {e.strerror or e} (another server "
                                  "on that port? choose another with --http HOST:PORT)") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.cfg), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise TranscribeError(f"the HTTP server on {self.cfg.http.bind} did not start (see the log)")
            time.sleep(0.02)
        logger.info("HTTP API on http://{}:{} (OpenAI-compatible /v1/audio/transcriptions; docs/http.md)",
                    f"[{self.host}]" if family == socket.AF_INET6 else self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True  # type: ignore[attr-defined]
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            logger.warning("the HTTP server did not stop within {}s", STOP_TIMEOUT_S)
        else:
            logger.info("HTTP API stopped")

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
