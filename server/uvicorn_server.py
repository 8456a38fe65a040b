"""uvicorn's server wired to the runtime's shutdown, for `uda-serve` and EmbeddedServer alike.

The first SIGTERM or Ctrl-C drains: new work is refused at once (uvicorn closes its listening
socket only on its next tick) and what is queued is answered within --grace-period. A second
Ctrl-C is uvicorn's force quit: it stops waiting for connections, and the queue is dropped too,
instead of being computed for clients that are about to lose their connections anyway.
"""
from __future__ import annotations

import uvicorn

from server.runtime import ServeRuntime


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: ServeRuntime):
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig, frame) -> None:
        self.runtime.begin_drain()
        super().handle_exit(sig, frame)
        if self.force_exit:
            self.runtime.begin_stop(grace=0.0)

    def serve_then_stop(self) -> None:
        """Serve until told to exit, then release the runtime (the lifespan shutdown already
        did unless the exit was forced)."""
        self.run()
        self.runtime.stop(grace=0.0 if self.force_exit else None)
