"""``disagg doctor``: what this machine can do for disagg, and why not.

    disagg doctor                 # plain text for people
    disagg doctor --json          # one JSON object for scripts (schema below is stable)
    disagg doctor --require ipc   # exit 1 with one line if that transport is not usable here
    disagg doctor --model M       # also: which tensor-parallel sizes split this model

JSON schema (``schema_version`` 1; keys are only ever added)::

    {"schema_version": 1,
     "platform": {kind, arch, device_count, warp_size, device_name, kernels, torch_build},
     "gpus": [{index, name, arch, total_memory_bytes, uuid}],
     "peer_access": null | {matrix: [[bool]], all: bool, missing: [[i, j]]},
     "rdma": {sysfs, devices: [{name, numa_node, netdevs, ports: [{port, state, link_layer,
              rate}]}], uverbs: [str], memlock_bytes: int | null (null = unlimited)},
     "transports": {name: {usable: bool, reason: str | null}},
     "triton": {available, version, aot: {target: {ok, kernel, detail}}},
     "versions": {python, disagg, torch, hip, cuda, triton, nixl, mori, pyzmq, msgspec,
                  aiohttp, transformers},
     "tp_plans": {gpus, pairs: [[prefill_tp, decode_tp]], model: null | {name, num_heads,
                  num_kv_heads, intermediate_size, tp: [{size, fits, reason}]} | {name, error}}}

``tp_plans.pairs``: the ``--tp-prefill``/``--tp-decode`` pairs from TP_SIZES whose one prefill
plus one decode instance fit the visible GPUs (and split ``--model`` when one is given).

Every probe is fenced: a broken install shows up as a reason in the report, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform as py_platform
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from disagg.common import envs
from disagg.common import platform as plat
from disagg.common.config import ConfigError
from disagg.common.version import __version__

PROG = "disagg doctor"
SCHEMA_VERSION = 1
IB_SYSFS = Path("/sys/class/infiniband")
IB_DEV = Path("/dev/infiniband")
AOT_TARGET = "hip:gfx942"
"""MI300X: every machine is asked whether Triton can compile for it, GPU or not."""
AOT_KERNEL = "silu_and_mul"
"""A small kernel (about a second to compile) that exercises the whole Triton backend."""
TP_SIZES = (1, 2, 4, 8)
"""Tensor-parallel sizes the TP plans are drawn from."""

# report key -> (distribution names to ask importlib.metadata, module to import as a fallback)
VERSION_SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": (("torch",), "torch"),
    "triton": (("triton", "pytorch-triton-rocm", "pytorch-triton"), "triton"),
    "nixl": (("nixl", "nixl-cu12", "nixl-cu13"), "nixl"),
    "mori": (("mori", "amd-mori"), "mori"),
    "pyzmq": (("pyzmq",), "zmq"),
    "msgspec": (("msgspec",), "msgspec"),
    "aiohttp": (("aiohttp",), "aiohttp"),
    "transformers": (("transformers",), "transformers"),
}


def _fenced(probe: Callable[[], Any], fallback: Callable[[str], Any]) -> Any:
    """Run one probe; any exception becomes ``fallback(reason)``."""
    try:
        return probe()
    except Exception as exc:  # a doctor must report a broken install, not crash on it
        return fallback(f"{type(exc).__name__}: {exc}")


def package_version(dists: tuple[str, ...], module: str) -> str | None:
    """Installed version of the first distribution found, else the module's ``__version__``."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(importlib.import_module(module), "__version__", "unknown"))


def versions() -> dict[str, str | None]:
    """The versions that matter to disagg, None for what is not installed."""
    info = plat.current_platform()
    found: dict[str, str | None] = {"python": py_platform.python_version(),
                                    "disagg": __version__}
    for key, (dists, module) in VERSION_SOURCES.items():
        found[key] = _fenced(functools.partial(package_version, dists, module),
                             lambda reason: f"broken ({reason})")
        if key == "torch":  # the runtime torch was built against, next to torch itself
            found["hip"] = info.hip_version
            found["cuda"] = info.cuda_version
    return found


def platform_facts() -> dict[str, Any]:
    """Platform kind, arch and which kernels the engine would run."""
    info = plat.current_platform()
    triton_kernels = (info.kind is not plat.PlatformKind.CPU and plat.triton_available()
                      and not envs.force_torch_kernels())
    return {"kind": info.kind.value, "arch": info.arch, "device_count": info.device_count,
            "warp_size": info.warp_size, "device_name": info.device_name,
            "kernels": "triton" if triton_kernels else "torch",
            "torch_build": (f"ROCm {info.hip_version}" if info.hip_version else
                            f"CUDA {info.cuda_version}" if info.cuda_version else "CPU-only")}


def gpu_facts() -> list[dict[str, Any]]:
    """One entry per GPU torch sees (none on CPU)."""
    info = plat.current_platform()
    if info.kind is plat.PlatformKind.CPU:
        return []
    import torch

    gpus = []
    for index in range(info.device_count):
        props = torch.cuda.get_device_properties(index)
        if info.kind is plat.PlatformKind.ROCM:
            arch = str(getattr(props, "gcnArchName", "") or "unknown").split(":")[0]
        else:
            arch = f"sm_{props.major}{props.minor}"
        uuid = getattr(props, "uuid", None)
        gpus.append({"index": index, "name": str(props.name), "arch": arch,
                     "total_memory_bytes": int(props.total_memory),
                     "uuid": None if uuid is None else str(uuid)})
    return gpus


def peer_access(device_count: int) -> dict[str, Any] | None:
    """Which GPU pairs can map each other's memory (what ``ipc`` and xGMI copies need)."""
    if device_count < 2:
        return None
    import torch

    matrix = [[i == j or bool(torch.cuda.can_device_access_peer(i, j))
               for j in range(device_count)] for i in range(device_count)]
    missing = [[i, j] for i in range(device_count) for j in range(device_count)
               if not matrix[i][j]]
    return {"matrix": matrix, "all": not missing, "missing": missing}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _rdma_ports(device: Path) -> list[dict[str, Any]]:
    ports_dir = device / "ports"
    if not ports_dir.is_dir():
        return []
    ports = []
    for port in sorted(ports_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        state = _read_text(port / "state")
        ports.append({"port": int(port.name) if port.name.isdigit() else port.name,
                      # sysfs says "4: ACTIVE": keep the word
                      "state": state.split(":", 1)[-1].strip() if state else None,
                      "link_layer": _read_text(port / "link_layer"),
                      "rate": _read_text(port / "rate")})
    return ports


def _memlock_bytes() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def rdma_facts(sysfs: Path = IB_SYSFS, dev_dir: Path = IB_DEV) -> dict[str, Any]:
    """RDMA devices the kernel knows, the verbs device files this process can open, memlock."""
    devices = []
    if sysfs.is_dir():
        for device in sorted(sysfs.iterdir(), key=lambda p: p.name):
            numa = _read_text(device / "device" / "numa_node")
            net = device / "device" / "net"
            devices.append({"name": device.name,
                            "numa_node": int(numa) if numa and numa.lstrip("-").isdigit()
                            else None,
                            "netdevs": sorted(p.name for p in net.iterdir()) if net.is_dir()
                            else [],
                            "ports": _rdma_ports(device)})
    uverbs = sorted(p.name for p in dev_dir.glob("uverbs*")) if dev_dir.is_dir() else []
    return {"sysfs": str(sysfs), "devices": devices, "uverbs": uverbs,
            "memlock_bytes": _memlock_bytes()}


def mori_install_hint(reason: str) -> str | None:
    """What to do when the mori transport is not usable because MoRI does not import."""
    if importlib.util.find_spec("mori") is None:
        return ("not installed: pip install 'disagg[mori]' (PyPI's amd-mori: CPython 3.10/3.12, "
                "x86_64, ROCm 7) or build ROCm/mori from source (deploy/README.md)")
    if "libamdhip64" in reason or "libhsa-runtime" in reason:
        return ("installed, but its ROCm libraries do not load: PyPI's amd-mori links ROCm 7; "
                "for another ROCm build ROCm/mori from source (deploy/README.md)")
    return None


def transport_facts() -> dict[str, dict[str, Any]]:
    """Each KV transport: usable here, or the reason why not (for mori, how to install it)."""
    from connectors.transports import available_transports

    reasons = available_transports()
    mori_reason = reasons.get("mori")
    hint = None if mori_reason is None else mori_install_hint(mori_reason)
    if hint is not None:
        reasons["mori"] = f"{mori_reason}; {hint}"
    return {name: {"usable": reason is None, "reason": reason}
            for name, reason in reasons.items()}


def aot_targets() -> list[str]:
    """gfx942 always; this machine's own GPU arch too when it has one."""
    info = plat.current_platform()
    targets = [AOT_TARGET]
    if info.kind is plat.PlatformKind.ROCM and info.arch:
        targets.append(f"hip:{info.arch}")
    elif info.kind is plat.PlatformKind.CUDA and info.arch:
        targets.append(f"cuda:{info.arch.removeprefix('sm_')}")
    return list(dict.fromkeys(targets))


def aot_probe(target: str) -> dict[str, Any]:
    """Compile one small kernel for ``target`` without a GPU; ok, kernel and figures or reason."""
    from hip_kernels.aot import all_specs, compile_spec
    from hip_kernels.launch_config import arch_for_target

    spec = next(s for s in all_specs(arch_for_target(target)) if s.name.startswith(AOT_KERNEL))
    report = compile_spec(spec, target)
    if report.num_vgprs is not None:
        detail = (f"{report.num_vgprs} VGPRs, scratch {report.scratch_bytes} B, "
                  f"occupancy {report.occupancy}")
    else:
        detail = f"{report.num_regs} registers, spill {report.spill_bytes} B"
    return {"ok": not report.spills, "kernel": spec.name,
            "detail": detail + (", spills" if report.spills else "")}


def triton_facts(compile_kernels: bool) -> dict[str, Any]:
    """Whether Triton imports, its version, and whether it compiles for the AOT targets."""
    if not plat.triton_available():
        return {"available": False, "version": None, "aot": {}}
    version = package_version(*VERSION_SOURCES["triton"])
    aot = {}
    if compile_kernels:
        for target in aot_targets():
            aot[target] = _fenced(functools.partial(aot_probe, target),
                                  lambda r: {"ok": False, "kernel": AOT_KERNEL, "detail": r})
    return {"available": True, "version": version, "aot": aot}


def model_tp_fit(model: str) -> dict[str, Any]:
    """The model's head and MLP sizes, and for each of TP_SIZES whether it splits them."""
    from disagg.models.loader import resolve_arch
    from disagg.models.parallel import check_tp

    arch = resolve_arch(model)
    sizes = []
    for size in TP_SIZES:
        try:
            check_tp(arch, size)  # the engine's own rule (heads, KV heads, MLP and experts)
            reason = None
        except ConfigError as exc:
            reason = str(exc)
        sizes.append({"size": size, "fits": reason is None, "reason": reason})
    return {"name": model, "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads,
            "intermediate_size": arch.intermediate_size, "tp": sizes}


def tp_plans(device_count: int, model: str | None) -> dict[str, Any]:
    """(prefill tp, decode tp) pairs whose 1P1D fits the visible GPUs and splits the model."""
    fit = None if model is None else _fenced(functools.partial(model_tp_fit, model),
                                             lambda r: {"name": model, "error": r})
    sizes = [s["size"] for s in fit["tp"] if s["fits"]] if fit and "tp" in fit else TP_SIZES
    pairs = [[p, d] for p in sizes for d in sizes if p + d <= device_count]
    return {"gpus": device_count, "pairs": pairs, "model": fit}


def collect(compile_kernels: bool = True, model: str | None = None) -> dict[str, Any]:
    """The whole report as plain JSON-able data."""
    plat_facts = _fenced(platform_facts, lambda r: {"kind": "unknown", "error": r})
    count = int(plat_facts.get("device_count") or 0)
    return {
        "schema_version": SCHEMA_VERSION,
        "platform": plat_facts,
        "gpus": _fenced(gpu_facts, lambda r: [{"error": r}]),
        "peer_access": _fenced(lambda: peer_access(count), lambda r: {"error": r}),
        "rdma": _fenced(rdma_facts, lambda r: {"error": r, "devices": [], "uverbs": []}),
        "transports": _fenced(transport_facts, lambda r: {"error": {"usable": False,
                                                                    "reason": r}}),
        "triton": _fenced(lambda: triton_facts(compile_kernels),
                          lambda r: {"available": False, "version": None, "aot": {},
                                     "error": r}),
        "versions": _fenced(versions, lambda r: {"error": r}),
        "tp_plans": tp_plans(count, model),
    }


# ---- plain text ----------------------------------------------------------------------------
LABEL_WIDTH = 13
GiB = 1 << 30


def _section(label: str, lines: list[str]) -> list[str]:
    """``label   first line`` then the other lines indented under it."""
    pad = " " * LABEL_WIDTH
    return [f"{label:<{LABEL_WIDTH}}{lines[0]}", *(pad + line for line in lines[1:])]


def _platform_lines(p: dict[str, Any]) -> list[str]:
    if "error" in p:
        return [f"unknown ({p['error']})"]
    if p["kind"] == "cpu":
        head = f"cpu: {p['torch_build']} build of torch, no GPU visible"
        if p["torch_build"] != "CPU-only":
            head += " (check /dev/kfd and /dev/dri or the driver, and *_VISIBLE_DEVICES)"
    else:
        head = (f"{p['kind']} {p['arch']}, {p['device_count']} x {p['device_name']}, "
                f"{'wavefront' if p['kind'] == 'rocm' else 'warp'} {p['warp_size']}")
    kernels = "Triton kernels" if p["kernels"] == "triton" else "pure-torch kernel references"
    return [head, f"engine would run {kernels}"]


def _gpu_lines(gpus: list[dict[str, Any]]) -> list[str]:
    if not gpus:
        return ["none"]
    if "error" in gpus[0]:
        return [f"cannot read GPU properties ({gpus[0]['error']})"]
    return [f"{g['index']}  {g['name']}  {g['arch']}  {g['total_memory_bytes'] / GiB:.1f} GiB"
            for g in gpus]


def _peer_lines(peers: dict[str, Any] | None) -> list[str]:
    if peers is None:
        return ["n/a (fewer than 2 GPUs)"]
    if "error" in peers:
        return [f"cannot check ({peers['error']})"]
    if peers["all"]:
        return [f"every pair of the {len(peers['matrix'])} GPUs can access each other"]
    pairs = ", ".join(f"{i}->{j}" for i, j in peers["missing"])
    return [f"NO peer access for {pairs}: ipc copies between these GPUs will fail"]


def render_tp_plans(plans: dict[str, Any]) -> list[str]:
    """The tp plans section: the pairs that fit, then the model's verdict per TP size."""
    gpus = plans["gpus"]
    if gpus == 0:
        lines = ["no GPU: no TP plan fits on GPU; on CPU any --tensor-parallel-size runs "
                 "(gloo)"]
    elif not plans["pairs"]:
        lines = [f"{gpus} GPU(s): no --tp-prefill/--tp-decode pair from "
                 f"{', '.join(map(str, TP_SIZES))} fits (1P1D needs tp_p + tp_d GPUs)"]
    else:
        lines = [f"{gpus} GPUs, 1P1D (--tp-prefill, --tp-decode) with tp_p + tp_d <= {gpus}:",
                 " ".join(f"({p},{d})" for p, d in plans["pairs"])]
    fit = plans["model"]
    if fit is None:
        return lines
    if "error" in fit:
        return [*lines, f"{fit['name']}: cannot read ({fit['error']})"]
    splits = ", ".join(str(s["size"]) for s in fit["tp"] if s["fits"]) or "none"
    lines.append(f"{fit['name']} ({fit['num_heads']} heads, {fit['num_kv_heads']} KV heads, "
                 f"intermediate {fit['intermediate_size']}): tp {splits} split it")
    lines += [f"tp {s['size']} does not: {s['reason']}" for s in fit["tp"] if not s["fits"]]
    return lines


def render_rdma(rdma: dict[str, Any]) -> list[str]:
    """The rdma section's lines: one per device, then verbs files and memlock."""
    if "error" in rdma:
        return [f"cannot read ({rdma['error']})"]
    if not rdma["devices"]:
        return [f"no RDMA devices ({rdma['sysfs']} is empty or absent)"]
    lines = []
    for dev in rdma["devices"]:
        ports = "; ".join(f"port {p['port']} {p['state']} {p['link_layer']} {p['rate']}"
                          for p in dev["ports"]) or "no ports"
        net = ",".join(dev["netdevs"]) or "-"
        lines.append(f"{dev['name']}  {ports}  net {net}  numa {dev['numa_node']}")
    lines.append(f"{len(rdma['uverbs'])} verbs device files under /dev/infiniband"
                 + ("" if rdma["uverbs"] else ": none, so RDMA cannot be used from this "
                    "process (in a container: --device=/dev/infiniband)"))
    limit = rdma["memlock_bytes"]
    lines.append("memlock unlimited" if limit is None else
                 f"memlock {limit} bytes: RDMA registers whole KV caches, set "
                 "'ulimit -l unlimited' (container: --ulimit memlock=-1)")
    return lines


def _transport_lines(transports: dict[str, dict[str, Any]]) -> list[str]:
    width = max(len(name) for name in transports)
    return [f"{name:<{width}}  " + ("usable" if t["usable"] else f"not usable: {t['reason']}")
            for name, t in transports.items()]


def _triton_lines(triton: dict[str, Any]) -> list[str]:
    if not triton["available"]:
        return ["not installed: GPU kernels fall back to the torch references"
                + (f" ({triton['error']})" if "error" in triton else "")]
    lines = [f"triton {triton['version']}"]
    for target, r in triton["aot"].items():
        verdict = "compiles" if r["ok"] else "FAILS"
        lines.append(f"AOT {target}: {verdict} ({r['kernel']}: {r['detail']})")
    if not triton["aot"]:
        lines.append("AOT check skipped (--no-compile)")
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as aligned plain text."""
    lines = [f"disagg doctor {report['versions'].get('disagg', __version__)}", ""]
    lines += _section("platform", _platform_lines(report["platform"]))
    lines += _section("gpus", _gpu_lines(report["gpus"]))
    lines += _section("peer access", _peer_lines(report["peer_access"]))
    lines += _section("tp plans", render_tp_plans(report["tp_plans"]))
    lines += _section("rdma", render_rdma(report["rdma"]))
    lines += _section("transports", _transport_lines(report["transports"]))
    lines += _section("triton", _triton_lines(report["triton"]))
    lines += _section("versions", [f"{k:<12} {v if v is not None else '-'}"
                                   for k, v in report["versions"].items()])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``disagg doctor``; 1 when a ``--require``d transport is not usable."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the Triton AOT compile check (about a second)")
    parser.add_argument("--require", action="append", default=[], metavar="TRANSPORT",
                        help="exit 1 unless this transport is usable (repeatable)")
    parser.add_argument("--model", default=None,
                        help="also say which tensor-parallel sizes split this model "
                             "(builtin:tiny-llama or a Hugging Face model directory)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse printed the usage and the error
        return int(exc.code or 0)
    report = collect(compile_kernels=not args.no_compile, model=args.model)
    try:
        print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    except BrokenPipeError:  # `disagg doctor | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stops the flush at exit failing)
    return _check_required(report, args.require)


def _check_required(report: dict[str, Any], required: list[str]) -> int:
    """1 (and one line on stderr per problem) if a required transport is unknown or unusable."""
    status = 0
    for name in required:
        entry = report["transports"].get(name)
        if entry is None:
            known = ", ".join(report["transports"])
            print(f"{PROG}: error: unknown transport {name!r}; choose one of {known}",
                  file=sys.stderr)
            status = 1
        elif not entry["usable"]:
            print(f"{PROG}: transport {name} is not usable here: {entry['reason']}",
                  file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
