"""A real uvicorn server in a background thread of this process (tests, benchmarks, notebooks).

    with EmbeddedServer(ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(path), port=0)) as srv:
        httpx.post(f"{srv.url}/predict?task=A", files={"file": png})
"""
from __future__ import annotations

import signal
import threading
import time

from server.app import create_app
from server.config import ServeConfig
from server.ports import free_port
from server.runtime import ServeRuntime
from server.uvicorn_server import DrainingServer


class EmbeddedServer:
    """Starts `uda-serve`'s app with uvicorn on a thread; `url` once started."""

    def __init__(self, config: ServeConfig, startup_timeout: float = 120.0):
        if config.port == 0:
            import dataclasses

            config = dataclasses.replace(config, port=free_port(config.host))
        self.config = config
        self.runtime = ServeRuntime(config)
        self.app = create_app(config, self.runtime)
        self._server = DrainingServer(self.app, config, self.runtime, log_level="warning")
        self._thread = threading.Thread(target=self._server.serve_then_stop, name="uda-uvicorn",
                                        daemon=True)
        self._startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> EmbeddedServer:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uda-serve failed to start; see the log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uda-serve did not start within {self._startup_timeout:g} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """What SIGTERM does to `uda-serve`: drain within --grace-period, then stop."""
        self._server.handle_exit(signal.SIGTERM, None)
        self._thread.join(timeout=self.config.grace_period + 30)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
