"""Worker side of the P/D connector: the transport, the registered KV tensor, block copies.

Memory layout (blocks outermost, see hip_kernels/__init__.py): block b of the cache is the
byte run [b * block_bytes, (b + 1) * block_bytes) of the registered region, all layers, K and V,
so moving a block is one segment and runs of consecutive blocks merge into one.
"""

from __future__ import annotations

import torch

from connectors.transports import make_transport
from connectors.transports.base import Segment, TransferOp, TransferStatus, merge_segments


class PDWorkerSide:
    """Posts one-sided block copies and polls them."""

    def __init__(self, transport_name: str, agent_name: str, host: str,
                 kv_cache: torch.Tensor, options: dict[str, object]) -> None:
        self.transport = make_transport(transport_name, agent_name=agent_name, host=host,
                                        **options)
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.transport.register_region(kv_cache)
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

    def post(self, op: TransferOp, peer: str, local_blocks: list[int],
             remote_blocks: list[int]) -> tuple[int, int]:
        """Start the copy; returns (handle, bytes)."""
        if self.kv_cache.is_cuda:
            torch.cuda.current_stream().synchronize()  # the step's KV writes are complete
        segs = self.segments(local_blocks, remote_blocks)
        return self.transport.post(op, peer, segs), sum(s.length for s in segs)

    def poll(self, handle: int) -> TransferStatus:
        """State of a posted copy."""
        return self.transport.poll(handle)

    def error(self, handle: int) -> str | None:
        """Why a copy failed."""
        return self.transport.error(handle)

    def release(self, handle: int) -> None:
        """Forget a handle."""
        self.transport.release(handle)

    def close(self) -> None:
        """Close the transport."""
        self.transport.close()
