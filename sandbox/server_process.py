"""One process of a multi-process server (`sandbox.supervisor` starts it): a complete server
with its share of the workers, serving on the listening socket it inherited."""

from __future__ import annotations

import os
import signal
import socket
import sys

from sandbox import linux
from sandbox.supervisor import CHILD_ENV, ServerProcess


def main() -> None:
    import uvicorn

    from sandbox.app import create_app
    from sandbox.server import KEEP_ALIVE_S
    from sandbox.shared_stats import SharedStats

    spec = ServerProcess.model_validate_json(os.environ.pop(CHILD_ENV))
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)  # the supervisor gone: stop like on SIGTERM
    if os.getppid() != spec.supervisor_pid:
        sys.exit(0)  # it died before the line above
    shared = SharedStats(spec.stats_fd, spec.count, spec.index)
    sock = socket.socket(fileno=spec.listen_fd)
    config = uvicorn.Config(
        create_app(spec.settings, shared), log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_S,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
