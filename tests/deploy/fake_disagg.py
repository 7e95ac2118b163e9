"""Stand-in for ``disagg`` and ``disagg-proxy`` in tests of the scripts' real (not dry) mode.

    python fake_disagg.py disagg doctor ...        exit 0, or 1 when FAKE_DOCTOR_FAIL is set
    python fake_disagg.py disagg serve M --host H --port P ...
    python fake_disagg.py disagg-proxy --host H --port P ...

serve and the proxy write ``$FAKE_RECORD_DIR/<port>.json`` (argv, pid, RECORDED_ENV)
and answer ``GET /health`` with 200 until SIGTERM; FAKE_EXIT_PORT=<port> makes the one on
that port exit 3 at once instead, as an instance that dies during start-up.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
from pathlib import Path

RECORDED_ENV = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def _serve(argv: list[str]) -> int:
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    if os.environ.get("FAKE_EXIT_PORT") == str(port):
        return 3
    record: dict[str, object] = {"argv": argv, "pid": os.getpid()}
    record.update({name: os.environ.get(name) for name in RECORDED_ENV})
    Path(os.environ["FAKE_RECORD_DIR"], f"{port}.json").write_text(json.dumps(record))
    server = http.server.HTTPServer(("127.0.0.1" if host == "0.0.0.0" else host, port),
                                    _Health)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()
    return 0


def main(argv: list[str]) -> int:
    """Act as ``argv[0]`` (disagg or disagg-proxy) given the rest."""
    if argv[:2] == ["disagg", "doctor"]:
        return 1 if os.environ.get("FAKE_DOCTOR_FAIL") else 0
    return _serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
