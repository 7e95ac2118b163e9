"""Does each instance stay inside ``--gpu-memory-utilization x total``? (issue 21, GPU only)

    python -m bench.memory_budget --fractions 0.17,0.25,0.9            # one instance at a time
    python -m bench.memory_budget --fractions 0.17,0.17,0.17,0.17,0.25 --co-located
    python -m bench.memory_budget ... --shape llama3-8b --max-num-batched-tokens 8192

Starts ``disagg serve`` instances on GPU 0 (a dummy-weight model of ``--shape``), runs a
concurrency-64 random load against each (all at once with ``--co-located``), and reads what
each instance's processes hold on the GPU as nvidia-smi counts it (the KFD's count on ROCm)
from its start (loading, profiling and graph capture: a co-located neighbour dies of a
start-up peak too), through the load, and after it. One row per instance goes to
``bench/results/memory.jsonl``: the budget and split the instance logged at start-up, the
peak and final per-process memory, their ratio to the budget, and whether it survived.
Exit status 1 when an instance died or held more than its budget + 2%.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.engine_bench import SHAPES
from bench.metadata import run_metadata
from bench.results import append_row

TOLERANCE = 0.02
"""Acceptance: per-process memory <= budget x (1 + TOLERANCE)."""
SMALL_SHAPE = dict(SHAPES["llama3-8b"], hidden_size=2048, intermediate_size=8192,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4)
"""A ~1.5B Llama shape whose weights fit the smallest fraction on an 80 GB GPU (the test)."""
_CAPTURED = re.compile(r"captured (\d+) decode graphs .* in ([0-9.]+) s, ([0-9.]+) GiB")
_BUDGET = re.compile(r"GPU memory budget ([0-9.]+) GiB \(([0-9.]+) x ([0-9.]+)\): (.*?)(;|$)",
                     re.M)


@dataclass
class Instance:
    """One ``disagg serve`` process and what was measured of it."""

    fraction: float
    port: int
    log: Path
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    ready_s: float = 0.0

    def budget(self) -> tuple[float, str]:
        """(budget GiB, split text) from the instance's start-up line."""
        found = _BUDGET.search(self.log.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(f"{self.log}: no 'GPU memory budget' line")
        return float(found.group(1)), found.group(4)

    def capture(self) -> dict[str, float]:
        """The start-up capture of the decode graphs: count, seconds, GiB (last such line)."""
        found = _CAPTURED.findall(self.log.read_text(errors="replace"))
        if not found:
            return {}
        n, secs, gib = found[-1]
        return {"graphs": int(n), "capture_s": float(secs), "graphs_gib": float(gib)}


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (an instance's engine cores are its children)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def gpu_bytes_by_pid() -> dict[int, int]:
    """Every process's GPU memory, as nvidia-smi (or the KFD's sysfs on ROCm) reports it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return {int(p): int(m) * 2**20 for p, m in
                (line.split(",") for line in out.splitlines() if line.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    from disagg.engine.gpu_memory import kfd_process_bytes

    found = {}
    for folder in Path("/sys/class/kfd/kfd/proc").glob("[0-9]*"):
        held = kfd_process_bytes(int(folder.name))
        if held is not None:
            found[int(folder.name)] = held
    return found


def instance_bytes(inst: Instance, by_pid: dict[int, int]) -> int:
    return sum(by_pid.get(p, 0) for p in descendants(inst.proc.pid))


def start(model_dir: Path, fraction: float, port: int, log_dir: Path,
          extra: Sequence[str]) -> Instance:
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "disagg.cli", "serve", str(model_dir), "--load-format", "dummy",
           "--device", "cuda", "--port", str(port), "--served-model-name", "dummy",
           "--gpu-memory-utilization", str(fraction), *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Instance(fraction, port, log, proc)


def wait_ready(instances: Sequence[Instance], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for inst in instances:
        while "ready on" not in inst.log.read_text(errors="replace"):
            if inst.proc.poll() is not None or time.monotonic() > deadline:
                tail = inst.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"instance at {inst.fraction} did not start:\n{tail}")
            time.sleep(0.5)
        inst.ready_s = time.monotonic() - inst.started


def load(inst: Instance, num_prompts: int, concurrency: int, input_len: int,
         output_len: int, log_dir: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.cli", "serve", "--base-url",
           f"http://127.0.0.1:{inst.port}", "--model", "dummy", "--tokenizer",
           "builtin:tiny-llama", "--random-input-len", str(input_len), "--random-output-len",
           str(output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
           str(concurrency)]
    with (log_dir / f"load-{inst.port}.log").open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


class MemorySampler:
    """Samples every instance's GPU memory twice a second from its start to the load's end:
    the start-up peak (loading, profiling, capture) and the serving peak kept apart."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.instances = instances
        self.serving = False
        self.startup_peak = [0] * len(instances)
        self.serving_peak = [0] * len(instances)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            by_pid = gpu_bytes_by_pid()
            peaks = self.serving_peak if self.serving else self.startup_peak
            for k, inst in enumerate(self.instances):
                peaks[k] = max(peaks[k], instance_bytes(inst, by_pid))
            self._done.wait(0.5)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def measure(instances: Sequence[Instance], *, num_prompts: int = 256, concurrency: int = 64,
            input_len: int = 1024, output_len: int = 128, log_dir: Path,
            timeout_s: float = 300.0) -> list[int]:
    """Run the load against every instance at once; each one's bytes after the load."""
    loads = [load(i, num_prompts, concurrency, input_len, output_len, log_dir)
             for i in instances]
    deadline = time.monotonic() + timeout_s
    try:
        for proc in loads:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in loads:
            if proc.poll() is None:
                proc.kill()
    by_pid = gpu_bytes_by_pid()
    return [instance_bytes(i, by_pid) for i in instances]


def load_counts(log_dir: Path, inst: Instance) -> dict[str, int]:
    """Successful and failed requests of the load against ``inst`` (-1: not reported)."""
    text = (log_dir / f"load-{inst.port}.log").read_text(errors="replace")
    counts = {}
    for key, label in (("completed", "Successful requests:"), ("failed", "Failed requests:")):
        found = re.search(re.escape(label) + r"\s+(\d+)", text)
        counts[key] = int(found.group(1)) if found else -1
    return counts


def stop(instances: Sequence[Instance]) -> None:
    for inst in instances:
        if inst.proc.poll() is None:
            os.killpg(inst.proc.pid, signal.SIGTERM)
    for inst in instances:
        try:
            inst.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(inst.proc.pid, signal.SIGKILL)
            inst.proc.wait()


def write_model(shape: dict[str, Any], folder: Path) -> Path:
    (folder / "config.json").write_text(json.dumps(shape))
    return folder


def run_set(fractions: Sequence[float], model_dir: Path, extra: Sequence[str], log_dir: Path,
            base_port: int, **load_args: Any) -> list[dict[str, Any]]:
    """Start the instances together, load them together; one result dict per instance."""
    instances: list[Instance] = []
    sampler: MemorySampler | None = None
    try:
        for k, f in enumerate(fractions):
            instances.append(start(model_dir, f, base_port + k, log_dir, extra))
        sampler = MemorySampler(instances)
        wait_ready(instances, timeout_s=600.0)
        sampler.serving = True
        after = measure(instances, log_dir=log_dir, **load_args)
        sampler.stop()
        results = []
        for k, (inst, held) in enumerate(zip(instances, after, strict=True)):
            budget_gib, split = inst.budget()
            peak = max(sampler.startup_peak[k], sampler.serving_peak[k]) / 2**30
            results.append({
                "fraction": inst.fraction, "budget_gib": budget_gib, "split": split,
                "held_after_gib": held / 2**30, "peak_gib": peak,
                "startup_peak_gib": sampler.startup_peak[k] / 2**30,
                "serving_peak_gib": sampler.serving_peak[k] / 2**30,
                "peak_over_budget": peak / budget_gib,
                "survived": inst.proc.poll() is None, "ready_s": inst.ready_s,
                **inst.capture(), **load_counts(log_dir, inst)})
        return results
    finally:
        if sampler is not None:
            sampler.stop()
        stop(instances)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_budget", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="0.17,0.25,0.9")
    ap.add_argument("--co-located", action="store_true",
                    help="start every fraction at once on the GPU (else one after another)")
    ap.add_argument("--shape", default="llama3-8b", choices=[*SHAPES, "small"])
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--base-port", type=int, default=18300)
    ap.add_argument("--commit", default=None, help="the commit measured (else git's)")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="keep the instances' and loads' logs here (else a temporary folder)")
    ap.add_argument("--output", type=Path, default=Path("bench/results/memory.jsonl"))
    args = ap.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    shape = SMALL_SHAPE if args.shape == "small" else SHAPES[args.shape]
    extra = ["--max-model-len", str(args.max_model_len)]
    if args.max_num_batched_tokens:
        extra += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    meta = run_metadata("disagg serve, co-located" if args.co_located else "disagg serve")
    if args.commit:
        meta["commit"] = args.commit
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(shape, Path(tmp))
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        sets = [fractions] if args.co_located else [[f] for f in fractions]
        for k, fs in enumerate(sets):
            set_dir = log_dir / f"set{k}"
            set_dir.mkdir(exist_ok=True)
            for r in run_set(fs, model_dir, extra, set_dir, args.base_port,
                             num_prompts=args.num_prompts):
                ok = (r["survived"] and r["peak_over_budget"] <= 1 + TOLERANCE
                      and r["completed"] == args.num_prompts)
                failed |= not ok
                figures = {"peak / budget": round(r["peak_over_budget"], 3),
                           "budget GiB": r["budget_gib"], "peak GiB": round(r["peak_gib"], 2),
                           "split GiB": r["split"], "completed": r["completed"]}
                row = {"kind": "gpu_memory", **meta, "shape": args.shape,
                       "model": f"{args.shape} shape, dummy bf16",
                       "command": " ".join(["python -m bench.memory_budget",
                                            *(argv if argv is not None else sys.argv[1:])]),
                       "figures": figures,
                       "co_located": fs if args.co_located else None,
                       "extra_args": extra, "workload": f"random 1024 in / 128 out, "
                       f"{args.num_prompts} prompts at concurrency 64", **r, "ok": ok}
                append_row(args.output, row)
                print(f"fraction {r['fraction']}: budget {r['budget_gib']:.2f} GiB, peak "
                      f"{r['peak_gib']:.2f} GiB ({r['peak_over_budget']:.3f}x; start-up "
                      f"{r['startup_peak_gib']:.2f}, serving {r['serving_peak_gib']:.2f}), "
                      f"after "
                      f"{r['held_after_gib']:.2f} GiB, survived={r['survived']}, "
                      f"{r['completed']} completed, {r['failed']} failed | "
                      f"{r['split']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
