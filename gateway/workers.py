"""`server.workers: N`: N gateway processes on one port, supervised by this one.

Each worker binds the same address with SO_REUSEPORT, so the kernel spreads
connections across them. Workers write their metrics to one folder
(PROMETHEUS_MULTIPROC_DIR) and /metrics, answered by any of them, adds them all up.
The supervisor passes SIGTERM, SIGINT and SIGHUP on to every worker and restarts a
worker that crashes. Each worker keeps its own count of connections per client address
(server.max_connections_per_address): the kernel spreads one address's connections
across workers, so N workers let an address hold up to N times that many.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from gateway.metrics import MULTIPROCESS_ENV

log = logging.getLogger("gateway.workers")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supervise(config_path: str, host: str, port: int, count: int) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    environment = {**os.environ, MULTIPROCESS_ENV: metrics_dir}
    command = [sys.executable, "-m", "gateway", "serve", "--config", config_path, "--host", host]
    command += ["--port", str(port), "--worker"]
    stopping = False

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=environment)

    workers = [start() for _ in range(count)]
    log.info("started %d workers on http://%s:%d", count, host, port)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    try:
        while True:
            for index, worker in enumerate(workers):
                code = worker.poll()
                if code is not None and not stopping:
                    log.error("worker %d exited with %s; starting another", worker.pid, code)
                    workers[index] = start()
            if stopping and all(worker.poll() is not None for worker in workers):
                break
            time.sleep(0.2)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((worker.returncode or 0) for worker in workers)
