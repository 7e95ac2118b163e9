"""P <-> D control-plane messages (ZMQ, msgpack via msgspec). All keyed by transfer_id.

  handshake (REQ -> ROUTER): HandshakeRequest -> HandshakeResponse (metadata or refusal)
  notify (PUSH -> PULL):     RemoteBlocks | WriteDone | Release | ReleaseAck | TransferFailed
                             | Quiesce | Quiesced | Lease

Every field is typed and bounded, so a frame that decodes is already safe to read: block ids
are in [0, 2**31), lists and strings have a length cap, ports are ports. Whether a block id is
inside the *peer's* pool is checked against its handshake (``num_blocks``) before any use.

Identity: every message names its sender's ``engine_id`` and ``epoch`` (random per engine
start). A notification counts only when that pair is a peer this engine has identified by a
handshake (its own to the peer, or the peer's to it), never this engine itself.

Vouching for KV (the fail-closed handoff):
  READ   D reads P's blocks, then sends ``release`` with P's epoch and generation of the hold.
         P answers ``release_ack``: held=true only if that hold was still live when the
         release arrived, i.e. through the whole read. D uses the KV only on held=true,
         when the ack's blocks are the ones it read and its prompt digest is D's prompt's
         (params a proxy garbled or mixed up never decode on another prompt's KV).
  WRITE  D sends ``remote_blocks`` with its generation and its prompt's digest; P writes
         only when that digest is its own prompt's; P's ``write_done`` must echo the
         generation.
         A consumer that gives up keeps its blocks quarantined (never reused) until the
         producer says ``quiesced`` (no op of it can still write them) or is gone.
  verify_kv  ``release_ack`` / ``write_done`` also carry an 8-byte digest per block, which the
         consumer compares with what landed.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from disagg.common.kv_transfer_params import (
    BlockIds,
    EngineId,
    Epoch,
    Generation,
    Host,
    NumTokens,
    TokenId,
    TransferId,
)

CONTROL_VERSION = 5
"""3: per-rank descriptors and tp_size in the metadata, ``skip`` in remote_blocks.
4: the prompt's digest in remote_blocks and release_ack, the hold's blocks in release_ack.
5: ``received`` leases (a WRITE prefill acknowledging decode blocks it holds for no transfer:
an older decode would take them as leases and keep such a transfer alive), leases of draining
writes, transfer_failed in answer to a resent remote_blocks of a failed transfer."""
MAX_FRAME_BYTES = 64 * 1024 * 1024
"""ZMQ drops (and disconnects) any frame above this: no message can exhaust memory."""

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Reason = Annotated[str, msgspec.Meta(max_length=2000)]
Digests = Annotated[list[Annotated[bytes, msgspec.Meta(max_length=32)]],
                    msgspec.Meta(max_length=1 << 20)]
ShortStr = Annotated[str, msgspec.Meta(max_length=512)]
PromptDigest = Annotated[bytes, msgspec.Meta(max_length=32)]
"""connectors/transfer.py prompt_digest: which prompt a transfer's KV belongs to."""


class EngineMetadata(msgspec.Struct, kw_only=True, frozen=True):
    """What a peer must know to move KV to or from this engine."""

    engine_id: EngineId
    epoch: Epoch
    """Random per engine start: a restarted engine is a different peer."""
    host: Host
    handshake_port: Port
    notify_port: Port
    transport: ShortStr
    transport_descriptor: Annotated[bytes, msgspec.Meta(max_length=1 << 20)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    block_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 40)]
    num_blocks: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
    dtype: ShortStr
    compat_hash: ShortStr
    """Hash of model, dtype and KV layout; peers must match exactly."""
    layout: ShortStr
    tp_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """Tensor-parallel ranks; each holds kv_head_range(H, tp_size, rank) of the KV heads."""
    rank_descriptors: Annotated[list[Annotated[bytes, msgspec.Meta(max_length=1 << 20)]],
                                msgspec.Meta(max_length=64)] = []
    """Every rank's transport descriptor in rank order (tp_size of them)."""
    kv_cache_dtype: ShortStr = "auto"
    """The --kv-cache-dtype the cache was built with (``auto`` or ``fp8_e4m3``); ``dtype`` is
    its element dtype."""
    kv_scales: Annotated[list[float], msgspec.Meta(max_length=1 << 14)] = []
    """fp8 cache: [k_0, v_0, k_1, v_1, ...] per-layer scales (stored = value / scale); empty
    otherwise. Peers must match exactly: the scales are what the bytes mean."""


class HandshakeRequest(msgspec.Struct, tag="hello", kw_only=True):
    """Sent by the side that starts talking to a peer."""

    version: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
    metadata: EngineMetadata
    proof: Annotated[bytes, msgspec.Meta(max_length=64)] = b""
    """HMAC of (engine_id, epoch) under the shared auth_key, when one is configured."""


class HandshakeResponse(msgspec.Struct, tag="hello_ack", kw_only=True):
    """Peer metadata, or why the peer refused."""

    metadata: EngineMetadata | None = None
    error: Reason | None = None
    proof: Annotated[bytes, msgspec.Meta(max_length=64)] = b""


class _Sent(msgspec.Struct, kw_only=True):
    """Who sent a notification (checked against the handshaken peers)."""

    engine_id: EngineId
    epoch: Epoch


class RemoteBlocks(_Sent, tag="remote_blocks", kw_only=True):
    """D -> P (WRITE): destination blocks for a transfer are allocated."""

    transfer_id: TransferId
    generation: Generation
    block_ids: BlockIds
    num_tokens: NumTokens
    host: Host
    handshake_port: Port
    notify_port: Port
    skip: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)] = 0
    """Leading blocks of ``block_ids`` the decode already holds (prefix cache): not written."""
    prompt_digest: PromptDigest = b""
    """The decode's prompt: the prefill writes only KV of this very prompt (none named:
    none written)."""


class WriteDone(_Sent, tag="write_done", kw_only=True):
    """P -> D (WRITE): every block of the transfer is written; echoes D's generation."""

    transfer_id: TransferId
    generation: Generation
    digests: Digests | None = None
    first_token_id: TokenId | None = None
    """The token P sampled after the prompt (D emits it and computes on from it)."""


class FirstToken(_Sent, tag="first_token", kw_only=True):
    """P -> D (WRITE): the token P sampled after the prompt, sent the moment it is known, so
    D streams it while the KV is still being written; echoes D's generation. write_done
    carries it again (a lost first_token costs only time)."""

    transfer_id: TransferId
    generation: Generation
    token_id: TokenId


class Release(_Sent, tag="release", kw_only=True):
    """D -> P (READ): the blocks were read; free them and say whether the hold was live."""

    transfer_id: TransferId
    generation: Generation
    """P's generation of the hold, from P's kv_transfer_params."""


class ReleaseAck(_Sent, tag="release_ack", kw_only=True):
    """P -> D (READ): whether the hold of ``generation`` was live until the release came."""

    transfer_id: TransferId
    generation: Generation
    held: bool
    digests: Digests | None = None
    block_ids: BlockIds = []
    """With held=true: the hold's blocks, which must be the ones the decode read."""
    prompt_digest: PromptDigest = b""
    """With held=true: the prompt the hold's KV belongs to, which must be the decode's."""


class TransferFailed(_Sent, tag="transfer_failed", kw_only=True):
    """Either side gave up; the receiver frees at once (a consumer: once quiesced)."""

    transfer_id: TransferId
    reason: Reason
    quiesced: bool = False
    """Sent by a WRITE producer: none of its ops can still write the peer's blocks."""


class Quiesce(_Sent, tag="quiesce", kw_only=True):
    """D -> P (WRITE): D gave up; answer ``quiesced`` once no op of yours can write my blocks."""

    transfer_id: TransferId


class Quiesced(_Sent, tag="quiesced", kw_only=True):
    """P -> D (WRITE): no op of P can write D's blocks of this transfer any more."""

    transfer_id: TransferId


MAX_LEASE_IDS = 1 << 14
"""Transfer ids in one Lease; a sender with more splits them over several. Small: a frame is
decoded before its sender is identified, and a few huge forged ones per second held the
control thread (and with it the GIL) long enough to stall the engine."""


class Lease(_Sent, tag="lease", kw_only=True):
    """Heartbeat: the sender is alive and still working on these transfers."""

    transfer_ids: Annotated[list[TransferId], msgspec.Meta(max_length=MAX_LEASE_IDS)]
    received: bool = False
    """A WRITE prefill acknowledging decode blocks that reached it before their request (or
    after it finished with them): it is alive and has them, but has no transfer to work on,
    so the decode's deadlines are not extended by it (pd_exposure.py)."""


Notification = (RemoteBlocks | WriteDone | FirstToken | Release | ReleaseAck | TransferFailed
                | Quiesce | Quiesced | Lease)
notify_decoder = msgspec.msgpack.Decoder(Notification)
hello_decoder = msgspec.msgpack.Decoder(HandshakeRequest)
hello_ack_decoder = msgspec.msgpack.Decoder(HandshakeResponse)
encoder = msgspec.msgpack.Encoder()


def tag_of(msg: Notification) -> str:
    """The wire tag of a notification (``release``, ``lease``, ...)."""
    return str(type(msg).__struct_config__.tag)


def kv_ports(base_port: int, dp_rank: int, tp_rank: int = 0) -> tuple[int, int]:
    """(handshake_port, notify_port) of one rank: every control port comes from here (the
    control plane runs on TP rank 0 only; rank offsets leave room for 8 TP ranks).

    base_port 0 means "any free port" for both (the engine reports what it bound).
    """
    if base_port == 0:
        return 0, 0
    offset = 2 * (dp_rank * 8 + tp_rank)
    return base_port + offset, base_port + offset + 1


def transport_port(port: int, dp_rank: int, tp_rank: int) -> int:
    """The port of one rank's transport endpoint when the transport option ``port`` is set
    (0 stays 0: any free port, carried in the rank's descriptor)."""
    return 0 if port == 0 else port + dp_rank * 8 + tp_rank
