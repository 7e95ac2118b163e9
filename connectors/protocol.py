"""P <-> D control-plane messages (ZMQ, msgpack via msgspec). All keyed by transfer_id.

  handshake (REQ -> ROUTER): HandshakeRequest -> HandshakeResponse (metadata or refusal)
  notify (PUSH -> PULL):     RemoteBlocks | WriteDone | Release | TransferFailed | Lease
"""

from __future__ import annotations

import msgspec

CONTROL_VERSION = 1


class EngineMetadata(msgspec.Struct, kw_only=True, frozen=True):
    """What a peer must know to move KV to or from this engine."""

    engine_id: str
    host: str
    handshake_port: int
    notify_port: int
    transport: str
    transport_descriptor: bytes
    block_size: int
    block_bytes: int
    num_blocks: int
    dtype: str
    compat_hash: str
    """Hash of model, dtype and KV layout; peers must match exactly."""
    layout: str


class HandshakeRequest(msgspec.Struct, tag="hello", kw_only=True):
    """Sent by the side that starts talking to a peer."""

    version: int
    metadata: EngineMetadata


class HandshakeResponse(msgspec.Struct, tag="hello_ack", kw_only=True):
    """Peer metadata, or why the peer refused."""

    metadata: EngineMetadata | None = None
    error: str | None = None


class RemoteBlocks(msgspec.Struct, tag="remote_blocks", kw_only=True):
    """D -> P (WRITE): destination blocks for a transfer are allocated."""

    transfer_id: str
    engine_id: str
    block_ids: list[int]
    num_tokens: int
    host: str
    handshake_port: int
    notify_port: int


class WriteDone(msgspec.Struct, tag="write_done", kw_only=True):
    """P -> D (WRITE): every block of the transfer is written."""

    transfer_id: str
    engine_id: str


class Release(msgspec.Struct, tag="release", kw_only=True):
    """D -> P (READ): the blocks were read; free them."""

    transfer_id: str
    engine_id: str


class TransferFailed(msgspec.Struct, tag="transfer_failed", kw_only=True):
    """Either side gave up; the receiver frees at once."""

    transfer_id: str
    engine_id: str
    reason: str


class Lease(msgspec.Struct, tag="lease", kw_only=True):
    """Heartbeat: the sender is alive and still working on these transfers."""

    engine_id: str
    transfer_ids: list[str]


Notification = RemoteBlocks | WriteDone | Release | TransferFailed | Lease
notify_decoder = msgspec.msgpack.Decoder(Notification)
hello_decoder = msgspec.msgpack.Decoder(HandshakeRequest)
hello_ack_decoder = msgspec.msgpack.Decoder(HandshakeResponse)
encoder = msgspec.msgpack.Encoder()


def kv_ports(base_port: int, dp_rank: int, tp_rank: int = 0) -> tuple[int, int]:
    """(handshake_port, notify_port) of one rank: every control port comes from here.

    base_port 0 means "any free port" for both (the engine reports what it bound).
    """
    if base_port == 0:
        return 0, 0
    offset = 2 * (dp_rank * 8 + tp_rank)
    return base_port + offset, base_port + offset + 1
