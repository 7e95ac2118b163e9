"""Per-step trace lines (``DISAGG_STEP_TRACE_FILE``): when each model step ran, in wall-clock
time, so the steps of instances sharing one GPU can be lined up (a P/D pair co-located on one
device: does one's step slow the other's?). One JSON object a line, appended; several processes
may share the file (each line is one ``write`` of a few hundred bytes,
appended with O_APPEND)."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class StepTrace:
    """Appends one line per executed step to a file; never raises into the step."""

    def __init__(self, path: str, engine_id: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._engine_id = engine_id
        self._pid = os.getpid()

    def step(self, started_s: float, out: Any) -> None:
        """The step that began at ``started_s`` (``time.time()``) has ended (its tokens are
        on the host, so its GPU work is done)."""
        line = json.dumps({"engine_id": self._engine_id, "pid": self._pid, "start": started_s,
                           "end": time.time(), "tokens": out.num_batched_tokens,
                           "requests": len(out.chunks)})
        try:
            os.write(self._fd, (line + "\n").encode())
        except OSError:
            pass

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)
