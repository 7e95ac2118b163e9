"""Instance <-> proxy discovery messages (ZMQ, msgpack via msgspec): what an instance says
about itself (``InstanceInfo``, also the body of ``GET /instance_info``), the heartbeat that
carries it, the deregistration, and the instance's prefix-cache changes (``KVEvents``, for
KV-aware routing). Both the instance (disagg/server/registrar.py) and the proxy
(proxy/registration.py) import these; nothing else is accepted on the channel.

With a registration key (``--registration-key``, env DISAGG_REGISTRATION_KEY, the same on the
proxy and its instances) every frame is sealed: ``tag || sent || message``, where ``tag`` is
HMAC-SHA256 over ``sent || message`` and ``sent`` the sender's wall clock (8 bytes, big-endian
float, strictly increasing per sender). A keyed proxy drops unsealed, forged and stale frames
(``sent`` more than MAX_CLOCK_SKEW_S from its own clock, or not after the last one it took
from that instance: a replay), so nobody without the key can register an instance, change
one's info (e.g. its max_model_len) or deregister it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import struct
import time
from typing import Annotated, NamedTuple, overload

import msgspec

from disagg.common.kv_transfer_params import TransferMode

PROTOCOL_VERSION = 1
"""Bumped when a message changes incompatibly; the proxy drops other versions."""
MAX_MESSAGE_BYTES = 64 * 1024
"""Larger frames are dropped by ZMQ before they reach the decoder."""
MIN_KEY_LENGTH = 8
MAX_CLOCK_SKEW_S = 120.0
"""A sealed frame sent further than this from the receiver's clock is dropped (a replay)."""
_SEAL = struct.Struct(">32sd")
SEAL_BYTES = _SEAL.size


class KVRole(enum.Enum):
    """An instance's role in P/D (the ``kv_role`` of its kv-transfer-config)."""

    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"


class InstanceInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What an instance says about itself: the body of ``GET /instance_info``."""

    role: KVRole
    engine_id: str
    http_url: str
    max_model_len: int
    mode: TransferMode | None = None
    block_size: int | None = None
    dp_size: int = 1
    model: str | None = None
    model_aliases: tuple[str, ...] = ()
    """More names the instance answers to (``--served-model-name A B``: B)."""
    model_root: str | None = None
    """The model as loaded (its directory or id): the model cards' ``root``."""
    kv_host: str | None = None
    kv_handshake_port: int | None = None
    kv_notify_port: int | None = None
    hash_seed: int | None = None
    """Root of the instance's block hash chain (disagg/common/block_hash.py); None: it keeps
    no prefix cache."""


class Heartbeat(msgspec.Struct, tag="heartbeat", kw_only=True, frozen=True):
    """Instance -> proxy, every ``interval_s``: "I am alive and this is who I am"."""

    info: InstanceInfo
    interval_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)]
    """Seconds to the next heartbeat (bounded: NaN, negative or huge would never expire)."""
    seq: int
    version: int = PROTOCOL_VERSION


class Deregister(msgspec.Struct, tag="deregister", kw_only=True, frozen=True):
    """Instance -> proxy, once, on a clean shutdown: remove me now."""

    http_url: str
    engine_id: str
    version: int = PROTOCOL_VERSION


MAX_KV_EVENTS_PER_MESSAGE = 4096
"""Changes or snapshot hashes in one ``KVEvents`` (11 bytes each at most: the frame stays far
under MAX_MESSAGE_BYTES with the longest URL and engine id)."""
BlockHash = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
"""A block hash of disagg/common/block_hash.py (63 bits)."""


class KVEvents(msgspec.Struct, tag="kv_events", kw_only=True, frozen=True):
    """Instance -> proxy, when its prefix cache changed: hashes it now holds (True) or no
    longer holds (False), in order, for the instance as a whole (any DP rank holding it).

    ``seq`` counts this instance's KVEvents from 0, one stream per (http_url, engine_id): a
    gap means lost changes, and the receiver's view is stale until a message with
    ``snapshot``. A snapshot replaces the view with its hashes; one too large for a frame
    continues in the following messages' ``changes`` (stored hashes only)."""

    http_url: Annotated[str, msgspec.Meta(max_length=1024)]
    engine_id: Annotated[str, msgspec.Meta(max_length=256)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    changes: Annotated[list[tuple[bool, BlockHash]],
                       msgspec.Meta(max_length=MAX_KV_EVENTS_PER_MESSAGE)] = []
    snapshot: Annotated[list[BlockHash],
                        msgspec.Meta(max_length=MAX_KV_EVENTS_PER_MESSAGE)] | None = None
    version: int = PROTOCOL_VERSION


RegistrationMessage = Heartbeat | Deregister | KVEvents
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RegistrationMessage)


def encode_message(msg: RegistrationMessage) -> bytes:
    """One message as msgpack bytes."""
    return _encoder.encode(msg)


@overload
def check_key(key: str) -> str: ...
@overload
def check_key(key: None) -> None: ...
def check_key(key: str | None) -> str | None:
    """A registration key, or ValueError when it is too short to be a secret."""
    if key is not None and len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"a registration key needs {MIN_KEY_LENGTH}+ characters")
    return key


def _tag(key: str, body: bytes) -> bytes:
    return hmac.new(key.encode(), body, hashlib.sha256).digest()


def seal(payload: bytes, key: str | None, now_s: float | None = None) -> bytes:
    """The frame for ``payload`` (itself when there is no key)."""
    if key is None:
        return payload
    sent = struct.pack(">d", time.time() if now_s is None else now_s)
    return _tag(key, sent + payload) + sent + payload


class Unsealed(NamedTuple):
    """A frame's payload and when its sender sealed it (None: no key, nothing sealed)."""

    payload: bytes
    sent_s: float | None


class SealError(ValueError):
    """A keyed receiver refuses the frame (the message says why)."""


def unseal(frame: bytes, key: str | None, now_s: float | None = None) -> Unsealed:
    """The payload of a frame (a keyed receiver's view); SealError when it is not sealed
    with ``key`` or was sealed too far from this clock."""
    if key is None:
        return Unsealed(frame, None)
    if len(frame) < SEAL_BYTES:
        raise SealError("not sealed with the registration key")
    tag, sent = _SEAL.unpack_from(frame)
    if not hmac.compare_digest(tag, _tag(key, frame[32:])):
        raise SealError("not sealed with this proxy's registration key")
    skew = (time.time() if now_s is None else now_s) - sent
    if not abs(skew) <= MAX_CLOCK_SKEW_S:  # NaN too
        raise SealError(f"sent {skew:.0f} s from this proxy's clock (more than "
                        f"{MAX_CLOCK_SKEW_S:g} s: a replay, or the clocks disagree)")
    return Unsealed(frame[SEAL_BYTES:], sent)


def decode_message(data: bytes) -> RegistrationMessage:
    """Bytes back to a message; raises ``msgspec.DecodeError`` / ``ValidationError``."""
    return _decoder.decode(data)


_ZMQ_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):(\d{1,5}|\*)$")


def zmq_address(value: str, *, bind: bool = False) -> str:
    """A ZMQ ``tcp://HOST:PORT`` (``*`` as the port only where it binds) or ``ipc://PATH``;
    ValueError naming what is wrong otherwise (the registration thread died on a bad one)."""
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return value
    match = _ZMQ_TCP.match(value)
    port = match.group(2) if match else ""
    if match is None or (port == "*" and not bind) or (port != "*" and int(port) > 65535):
        where = "tcp://HOST:PORT" + (" (PORT may be *)" if bind else "")
        raise ValueError(f"{value!r} is not a ZMQ address: use {where} or ipc://PATH")
    return value


