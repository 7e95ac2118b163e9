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


class StepProfiler:
    """``DISAGG_TORCH_PROFILE_DIR``: a torch.profiler window (CPU ops and GPU kernels, copies
    included) over model steps ``skip .. skip + count`` of this engine core, idle time between
    them included, written once as ``<dir>/<engine id>-<pid>.json.gz`` (chrome trace; load it
    in Perfetto). Kernels of co-located instances line up by the trace's
    ``baseTimeNanoseconds``. Profiling costs a few microseconds per op: figures measured with
    it are not the engine's speed."""

    def __init__(self, out_dir: str, engine_id: str, skip: int, count: int) -> None:
        self._path = os.path.join(out_dir, f"{engine_id}-{os.getpid()}.json.gz")
        self._skip, self._count = skip, count
        self._steps = 0
        self._prof: Any = None
        os.makedirs(out_dir, exist_ok=True)

    def before_step(self) -> None:
        """A model step is about to run: the window opens before step ``skip``."""
        if self._prof is None and self._steps == self._skip:
            import torch.profiler as tp

            acts = [tp.ProfilerActivity.CPU]
            if tp.ProfilerActivity.CUDA in tp.supported_activities():
                acts.append(tp.ProfilerActivity.CUDA)
            self._prof = tp.profile(activities=acts)
            self._prof.__enter__()

    def after_step(self) -> None:
        """A model step ended: the window closes (and is written) after ``count`` of them."""
        self._steps += 1
        if self._prof is not None and self._steps == self._skip + self._count:
            self.close()

    def close(self) -> None:
        """Write the window if one is open (also when the engine stops early)."""
        prof, self._prof = self._prof, None
        if prof is None:
            return
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(self._path)
