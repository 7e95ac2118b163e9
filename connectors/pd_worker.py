"""Worker side of the P/D connector: the transport, the registered KV tensor, block copies.

Memory layout (blocks outermost, see hip_kernels/__init__.py): block b of the cache is the
byte run [b * block_bytes, (b + 1) * block_bytes) of the registered region, all layers, K and V,
so moving a block is one segment and runs of consecutive blocks merge into one. Layer l of
block b is the run [b * block_bytes + l * layer_bytes, + layer_bytes):

    block b:  | layer 0: K V | layer 1: K V | ... | layer L-1: K V |
              ^ b * block_bytes               ^ + l * layer_bytes, layer_bytes long
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from connectors.faults import FaultPlan
from connectors.pd_poster import Posts
from connectors.transports import make_transport
from connectors.transports.base import TransferOp, TransferStatus, merge_array


class PDWorkerSide:
    """Posts one-sided block copies (whole blocks, or one layer of blocks) and polls them."""

    def __init__(self, transport_name: str, agent_name: str, host: str,
                 kv_cache: torch.Tensor, options: dict[str, object],
                 ready_timeout_s: float, faults: FaultPlan | None = None) -> None:
        self.transport = make_transport(transport_name, agent_name=agent_name, host=host,
                                        **options)
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.layer_bytes = self.block_bytes // kv_cache.shape[1]
        self.transport.register_region(kv_cache)
        self.posts = Posts(self.transport, ready_timeout_s)
        self.peers: set[str] = set()
        self._faults = faults

    def descriptor(self) -> bytes:
        """This side's transport descriptor (sent in handshakes)."""
        return self.transport.descriptor()

    def add_peer(self, engine_id: str, descriptor: bytes) -> None:
        """Connect the transport to a peer once."""
        if engine_id not in self.peers:
            self.transport.add_peer(engine_id, descriptor)
            self.peers.add(engine_id)

    def rows(self, local_blocks: list[int], remote_blocks: list[int]) -> np.ndarray:
        """Whole-block (local, remote, length) rows, consecutive runs merged."""
        return block_rows(local_blocks, remote_blocks, self.block_bytes, 0, self.block_bytes)

    def layer_rows(self, layer: int, local_blocks: list[int],
                   remote_blocks: list[int]) -> np.ndarray:
        """Layer ``layer`` of each block: one run of layer_bytes per block pair."""
        return block_rows(local_blocks, remote_blocks, self.block_bytes,
                          layer * self.layer_bytes, self.layer_bytes)

    def post(self, op: TransferOp, peer: str, local_blocks: list[int],
             remote_blocks: list[int]) -> tuple[int, int]:
        """Start the copy of whole blocks after the step's KV writes; returns (op id, bytes).
        A ``stream_ordered`` transport orders the copy after the current stream itself; for
        the others the host waits for the stream here."""
        if self.kv_cache.is_cuda and not self.transport.stream_ordered:
            torch.cuda.current_stream().synchronize()  # the step's KV writes are complete
        rows = self.rows(local_blocks, remote_blocks)
        label = f"{op.value} of {len(rows)} runs to {peer}"
        injected = self._injected(label)
        if injected is not None:
            return injected, int(rows[:, 2].sum())
        return self.posts.post(op, peer, rows, label), int(rows[:, 2].sum())

    def _injected(self, label: str) -> int | None:
        """An injected ``post`` fault's op instead of a real post (connectors/faults.py)."""
        for f in self._faults.fire("post") if self._faults is not None else ():
            return self.posts.inject(label, "injected fault: post failed"
                                     if f.action == "fail" else None)
        return None

    def digests(self, block_ids: list[int]) -> list[bytes]:
        """An 8-byte digest of each block's bytes (verify_kv; a GPU cache is copied to host)."""
        out = []
        for b in block_ids:
            data = self.kv_cache[b].detach().contiguous().view(torch.uint8).cpu().numpy()
            out.append(hashlib.blake2b(data.tobytes(), digest_size=8).digest())
        return out

    def flip_byte(self, block_id: int) -> None:
        """Flip the first byte of a block (an injected ``landed`` fault: corruption in flight)."""
        view = self.kv_cache[block_id].view(-1).view(torch.uint8)
        view[0] ^= 0xFF

    def post_layer(self, peer: str, layer: int, local_blocks: list[int],
                   remote_blocks: list[int]) -> tuple[int, int]:
        """WRITE one layer of blocks whose K/V the current step just wrote; never blocks the
        host: on a GPU cache the copy is ordered after the work queued on the current stream,
        by the transport itself (``stream_ordered``) or by the poster thread waiting on an
        event. Returns (op id, bytes)."""
        rows = self.layer_rows(layer, local_blocks, remote_blocks)
        label = f"layer {layer} write to {peer}"
        nbytes = int(rows[:, 2].sum())
        injected = self._injected(label)
        if injected is not None:
            return injected, nbytes
        if not self.kv_cache.is_cuda or self.transport.stream_ordered:
            return self.posts.post(TransferOp.WRITE, peer, rows, label), nbytes
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.kv_cache.device))
        return self.posts.post_after(event, peer, rows, label), nbytes

    def poll(self, op_id: int) -> TransferStatus:
        """State of a posted copy."""
        return self.posts.poll(op_id)

    def error(self, op_id: int) -> str | None:
        """Why a copy failed."""
        return self.posts.error(op_id)

    def release(self, op_id: int) -> None:
        """Forget a copy (cancelling it if still pending)."""
        self.posts.release(op_id)

    def drop_unposted(self, op_ids: list[int]) -> list[int]:
        """Cancel the copies still waiting for their KV; returns the ids of the others."""
        return self.posts.drop_unposted(op_ids)

    def close(self) -> None:
        """Stop the poster thread, then close the transport."""
        self.posts.close()
        self.transport.close()


def block_rows(local_blocks: list[int], remote_blocks: list[int], block_bytes: int,
               offset: int, length: int) -> np.ndarray:
    """(local, remote, length) rows of ``length`` bytes at ``offset`` inside each block pair,
    runs contiguous on both sides merged; built in numpy (256 blocks: ~10 us, against ~100 us
    for a list of Segments merged in Python)."""
    n = min(len(local_blocks), len(remote_blocks))
    top = max([*local_blocks[:n], *remote_blocks[:n], 0])
    if min([*local_blocks[:n], *remote_blocks[:n], 0]) < 0 or \
            (top + 1) * block_bytes >= 2**62:  # int64 rows must not wrap (checked at the edge)
        raise ValueError(f"block id {top} is out of range for {block_bytes}-byte blocks")
    rows = np.empty((n, 3), dtype=np.int64)
    rows[:, 0], rows[:, 1] = local_blocks[:n], remote_blocks[:n]
    rows[:, :2] *= block_bytes
    rows[:, :2] += offset
    rows[:, 2] = length
    return merge_array(rows)
