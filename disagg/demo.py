"""The README's demo: a local P/D deployment on the built-in tiny model, one request each way.

Starts ``disagg-proxy --launch`` (1 prefill + 1 decode + proxy, CPU, tcp transport) when the
proxy is available, else a single ``disagg serve`` instance; sends a completion and a streamed
chat request; prints them, says that the tiny model's text is noise by design and what to run
with a real model; shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

REAL_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
REAL_MODEL_COMMANDS = (
    ("hf", "download", REAL_MODEL),
    ("disagg-proxy", "--launch", "--model", REAL_MODEL, "--device", "cuda"),
)
"""What to run next on a machine with two GPUs: fetch the weights (``disagg serve`` reads the
Hugging Face cache and downloads nothing; the repository is gated, so ``hf auth login`` first),
then one prefill and one decode instance, one GPU each, behind the proxy."""


def next_steps() -> list[str]:
    """The lines the demo ends with: why the text is noise, and the real-model commands."""
    return [
        "demo: builtin:tiny-llama has random (seeded) weights and a byte-level tokenizer, so "
        "the text above is gibberish by design: the demo checks the P/D path (prefill, KV "
        "transfer, decode, proxy), not a model.",
        "demo: with a real model on 2 GPUs (CUDA or ROCm; the model is gated on the Hugging "
        "Face Hub: `hf auth login` first):",
        *(f"  {shlex.join(command)}" for command in REAL_MODEL_COMMANDS),
        "demo: one node of 8 GPUs: deploy/README.md (deploy/mi300x, deploy/cuda scripts).",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(port: int, single: bool, mode: str) -> list[str]:
    if single:
        return [sys.executable, "-m", "disagg.cli", "serve", "builtin:tiny-llama",
                "--device", "cpu", "--port", str(port), "--kv-cache-memory-bytes", "64MiB"]
    return [sys.executable, "-m", "proxy.launcher", "--launch", "--num-prefill", "1",
            "--num-decode", "1", "--port", str(port), "--mode", mode, "--transport", "tcp"]


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float, marker: str) -> None:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            print("  | " + line.rstrip())
            if line.startswith(marker):
                return
        elif proc.poll() is not None:
            raise SystemExit(f"demo: the deployment exited with code {proc.returncode}")
    raise SystemExit(f"demo: not ready after {timeout_s:.0f} s")


def _post(url: str, body: dict[str, object]) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return bytes(resp.read())


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when both requests succeeded."""
    ap = argparse.ArgumentParser(prog="disagg demo")
    ap.add_argument("--mode", default="read", choices=["read", "write"])
    ap.add_argument("--single", action="store_true", help="one monolithic instance instead")
    args = ap.parse_args(argv)
    have_proxy = os.path.exists(os.path.join(os.path.dirname(__file__), "..", "proxy",
                                             "launcher.py"))
    port = _free_port()
    cmd = _command(port, args.single or not have_proxy, args.mode)
    print("demo: starting", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = args.single or not have_proxy
        _wait_ready(proc, 180, "disagg: ready on" if single else "disagg-proxy: ready on")
        base = f"http://127.0.0.1:{port}"
        out = json.loads(_post(base + "/v1/completions", {
            "model": "builtin:tiny-llama", "prompt": "Disaggregated serving is",
            "max_tokens": 24, "temperature": 0}))
        print("demo: completion ->", repr(out["choices"][0]["text"]), out["usage"])
        raw = _post(base + "/v1/chat/completions", {
            "model": "builtin:tiny-llama", "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello"}]})
        chunks = [json.loads(line[6:]) for line in raw.decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c.get("choices"))
        print(f"demo: streamed chat -> {text!r} ({len(chunks)} chunks)")
        print("demo: OK")
        print("\n".join(next_steps()))
        return 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
