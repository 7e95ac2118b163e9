"""Worker side of the P/D connector: the transport, the registered KV tensor, block copies.

Memory layout (blocks outermost, see hip_kernels/__init__.py): block b of the cache is the
byte run [b * block_bytes, (b + 1) * block_bytes) of the registered region, all layers, K and V,
so moving a block is one segment and runs of consecutive blocks merge into one. Layer l of
block b is the run [b * block_bytes + l * layer_bytes, + layer_bytes):

    block b:  | layer 0: K V | layer 1: K V | ... | layer L-1: K V |
              ^ b * block_bytes               ^ + l * layer_bytes, layer_bytes long
"""

from __future__ import annotations

import torch

from connectors.pd_poster import Posts
from connectors.transports import make_transport
from connectors.transports.base import Segment, TransferOp, TransferStatus, merge_segments


class PDWorkerSide:
    """Posts one-sided block copies (whole blocks, or one layer of blocks) and polls them."""

    def __init__(self, transport_name: str, agent_name: str, host: str,
                 kv_cache: torch.Tensor, options: dict[str, object],
                 ready_timeout_s: float) -> None:
        self.transport = make_transport(transport_name, agent_name=agent_name, host=host,
                                        **options)
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.layer_bytes = self.block_bytes // kv_cache.shape[1]
        self.transport.register_region(kv_cache)
        self.posts = Posts(self.transport, ready_timeout_s)
        self.peers: set[str] = set()

    def descriptor(self) -> bytes:
        """This side's transport descriptor (sent in handshakes)."""
        return self.transport.descriptor()

    def add_peer(self, engine_id: str, descriptor: bytes) -> None:
        """Connect the transport to a peer once."""
        if engine_id not in self.peers:
            self.transport.add_peer(engine_id, descriptor)
            self.peers.add(engine_id)

    def segments(self, local_blocks: list[int], remote_blocks: list[int]) -> list[Segment]:
        """Whole-block segments, consecutive runs merged."""
        bb = self.block_bytes
        return merge_segments([Segment(lb * bb, rb * bb, bb)
                               for lb, rb in zip(local_blocks, remote_blocks)])

    def layer_segments(self, layer: int, local_blocks: list[int],
                       remote_blocks: list[int]) -> list[Segment]:
        """Layer ``layer`` of each block: one run of layer_bytes per block pair."""
        bb, lb, off = self.block_bytes, self.layer_bytes, layer * self.layer_bytes
        return merge_segments([Segment(loc * bb + off, rem * bb + off, lb)
                               for loc, rem in zip(local_blocks, remote_blocks)])

    def post(self, op: TransferOp, peer: str, local_blocks: list[int],
             remote_blocks: list[int]) -> tuple[int, int]:
        """Start the copy of whole blocks after the step's KV writes; returns (op id, bytes)."""
        if self.kv_cache.is_cuda:
            torch.cuda.current_stream().synchronize()  # the step's KV writes are complete
        segs = self.segments(local_blocks, remote_blocks)
        label = f"{op.value} of {len(segs)} runs to {peer}"
        return self.posts.post(op, peer, segs, label), sum(s.length for s in segs)

    def post_layer(self, peer: str, layer: int, local_blocks: list[int],
                   remote_blocks: list[int]) -> tuple[int, int]:
        """WRITE one layer of blocks whose K/V the current step just wrote; never blocks the
        host: on a GPU cache the copy is ordered after the work queued on the current stream,
        by the transport itself (``stream_ordered``) or by the poster thread waiting on an
        event. Returns (op id, bytes)."""
        segs = self.layer_segments(layer, local_blocks, remote_blocks)
        label = f"layer {layer} write to {peer}"
        nbytes = sum(s.length for s in segs)
        if not self.kv_cache.is_cuda or self.transport.stream_ordered:
            return self.posts.post(TransferOp.WRITE, peer, segs, label), nbytes
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.kv_cache.device))
        return self.posts.post_after(event, peer, segs, label), nbytes

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
