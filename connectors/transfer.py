"""The transfer state machine: one object per transfer, explicit states, a deadline on each
non-terminal state.

    WAITING_REMOTE --post--> IN_FLIGHT --done--> DONE
         |                      |
         +--- failed/expired ---+--> FAILED | EXPIRED      (terminal: free/release + tell peer)

A layerwise WRITE producer (connectors/pd_stream.py) goes IN_FLIGHT with its first layer
post, while its prefill still runs, and is DONE once the prefill finished and every layer
write has landed.

A READ consumer stays IN_FLIGHT after its read landed until the producer's release_ack vouches
for the hold ("verifying"); a WRITE consumer that failed keeps its blocks "quarantined" until
the producer is quiesced (protocol.py says why).

Deadlines (the clock starts when this engine begins to wait on its peer: a producer's hold at
request finish, a consumer at block allocation, a WRITE producer at arrival, since it will not
prefill before the decode has allocated):
  ops pending     the side that posted one-sided ops: last post + transfer_timeout
  verifying       release sent + transfer_timeout (no ack: the KV is refused)
  own move        a WRITE producer that has its destination owes the next step itself (its
                  prefill may be queued): no peer deadline; its writes carry their own
  own queue       a consumer whose request waits in this engine's queue (for blocks or a
                  seat): entering the queue + defer_timeout (a pause's hold does not count;
                  then its prompt is computed here, or it fails, by policy; the producer's
                  hold is freed either way)
  otherwise       started + defer_timeout, or (once the peer leased it) last lease +
                  lease_timeout; this covers the side waiting on its peer, so a live but slow
                  peer keeps the transfer and a dead one is reaped promptly.
Leases: a side leases a transfer only while the next move is its own (``owes_peer``), so a
lost message can never leave both sides leasing each other while each waits for the other.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from disagg.common.kv_transfer_params import KVTransferParams, TransferMode


def prompt_digest(token_ids: Sequence[int]) -> bytes:
    """16 bytes naming a prompt: both sides of a transfer compute it from their own request,
    so KV moves only between two requests for the very same prompt."""
    ids = np.asarray(token_ids, dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


class TransferState(enum.Enum):
    """Life of one transfer."""

    WAITING_REMOTE = "waiting_remote"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"


TERMINAL_STATES = frozenset({TransferState.DONE, TransferState.FAILED, TransferState.EXPIRED})

_ALLOWED = {
    TransferState.WAITING_REMOTE: frozenset({TransferState.IN_FLIGHT, *TERMINAL_STATES}),
    TransferState.IN_FLIGHT: TERMINAL_STATES,
}


class TransferRole(enum.Enum):
    """Which side of which flow this engine plays for a transfer."""

    PRODUCER_READ = "producer_read"
    """Prefill holds blocks until the decode read them (release) or gave up."""
    PRODUCER_WRITE = "producer_write"
    """Prefill writes its blocks into the decode's blocks, then sends write_done."""
    CONSUMER_READ = "consumer_read"
    """Decode reads the prefill's blocks, then sends release."""
    CONSUMER_WRITE = "consumer_write"
    """Decode sends remote_blocks and waits for write_done."""

    @property
    def is_producer(self) -> bool:
        """Prefill side."""
        return self in (TransferRole.PRODUCER_READ, TransferRole.PRODUCER_WRITE)

    @property
    def posts_ops(self) -> bool:
        """This side posts the one-sided operations (READ on D, WRITE on P)."""
        return self in (TransferRole.CONSUMER_READ, TransferRole.PRODUCER_WRITE)

    @property
    def mode(self) -> str:
        """``read`` or ``write`` (the ``mode`` label of the transfer histograms)."""
        return "write" if self in (TransferRole.PRODUCER_WRITE, TransferRole.CONSUMER_WRITE) \
            else "read"

    @property
    def side(self) -> str:
        """``producer`` or ``consumer`` (the ``role`` label of the transfer histograms)."""
        return "producer" if self.is_producer else "consumer"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines from kv_connector_extra_config."""

    transfer_timeout_s: float = 30.0
    defer_timeout_s: float = 60.0
    lease_timeout_s: float = 5.0
    heartbeat_interval_s: float = 1.0


class IllegalTransition(RuntimeError):
    """A bug: a transfer left a terminal state or skipped one."""


@dataclass(eq=False, slots=True)
class Transfer:
    """One transfer, on one side."""

    transfer_id: str
    role: TransferRole
    request_id: str
    created_s: float
    state: TransferState = TransferState.WAITING_REMOTE
    local_block_ids: list[int] = field(default_factory=list)
    remote_block_ids: list[int] | None = None
    skip_blocks: int = 0
    """Leading blocks the consumer already holds (its prefix cache): never moved."""
    num_tokens: int = 0
    peer_engine_id: str | None = None
    peer_host: str | None = None
    peer_handshake_port: int | None = None
    peer_notify_port: int | None = None
    handles: list[int] = field(default_factory=list)
    """The worker's ids of this side's posted ops that have not settled yet."""
    started_s: float | None = None
    """When the deadline clock started; None = not waiting on the peer yet (no expiry)."""
    queued_s: float | None = None
    """Consumer: when its request entered this engine's queue, or the last resume (None: not
    yet, or paused); until its blocks exist it expires at queued_s + defer_timeout."""
    posted_s: float | None = None
    """When the latest op was posted."""
    first_posted_s: float | None = None
    """When the first op was posted (the request's KV-transfer time starts there)."""
    last_lease_s: float | None = None
    holds_blocks: bool = False
    """Producer: the finished request's blocks are held under this transfer's key."""
    request_finished: bool = False
    layerwise: bool = False
    """WRITE producer: posts each layer's blocks during the prefill, not the prompt after it."""
    stream_peer: str | None = None
    """Layerwise: the peer's engine id once its handshake is done (chunks computed before it
    stream nothing; the next posts catch up, see pd_stream.plan_chunk)."""
    stream_next: int = 0
    """Layerwise: transferred blocks [0, stream_next) are posted; the next post starts here."""
    bytes_moved: int = 0
    error: str | None = None
    generation: int = field(default_factory=lambda: secrets.randbits(62))
    """This side's number for this transfer: a producer's hold (READ) or a consumer's
    destination blocks (WRITE); the peer must echo it to be believed."""
    peer_epoch: int | None = None
    """The peer engine's epoch (from the params or its first identified message)."""
    peer_generation: int | None = None
    """The peer's generation: READ consumer (P's hold) or WRITE producer (D's blocks)."""
    peer_num_blocks: int | None = None
    """Size of the peer's block pool, from its handshake (bounds remote block ids)."""
    verifying_s: float | None = None
    """READ consumer: when the release went out; the KV waits for the producer's ack."""
    digests: list[bytes] | None = None
    """Producer with verify_kv: one digest per block, in transfer order."""
    prompt_digest: bytes = b""
    """This side's request's prompt (prompt_digest), set when the request arrives."""
    first_token_id: int | None = None
    """The token the prefill sampled after the prompt: a producer's to send (READ answer,
    write_done), a consumer's to hand its request (None: the decode computes it)."""
    first_token_reported: bool = False
    """Consumer: the first token went to the scheduler (it is reported once)."""
    release_unread: bool = False
    """READ consumer with nothing to read (a one-token prompt, or a request its first token
    ended): release the producer's hold once the peer is identified (an unidentified
    sender's release is dropped, and the hold would wait for its deadline)."""
    takes_first_token: bool = True
    """Consumer: use the prefill's first token (False: the proxy asked for the recompute
    path, or the request wants logprobs, which only a local computation gives)."""
    announced: bool = False
    """WRITE consumer: its block ids went to the producer (which may write them from then)."""
    acknowledged: bool = False
    """The peer named this transfer in a message (WRITE consumer: it has our blocks)."""
    announced_s: float | None = None
    """WRITE consumer: when they first went (None: not yet; pd_exposure.py may hold them
    back while the producer has too many unacknowledged)."""
    next_resend_s: float = 0.0
    """WRITE consumer: when to send remote_blocks again (a lost one must not leave both sides
    leasing each other forever)."""

    @property
    def terminal(self) -> bool:
        """DONE, FAILED or EXPIRED."""
        return self.state in TERMINAL_STATES

    def deadline_s(self, t: Timeouts) -> float:
        """When this transfer expires if nothing changes (a producer's: inf before the clock
        starts)."""
        if self.started_s is None:
            # a consumer whose request still waits in this engine's queue: the producer holds
            # (READ) or waits (WRITE) meanwhile, so that wait is bounded too
            if self.role.is_producer or self.queued_s is None:
                return float("inf")
            return self.queued_s + t.defer_timeout_s
        if self.handles and self.role.posts_ops:
            assert self.posted_s is not None
            return self.posted_s + t.transfer_timeout_s
        if self.verifying_s is not None:
            return self.verifying_s + t.transfer_timeout_s
        if self.role is TransferRole.PRODUCER_WRITE and self.remote_block_ids is not None:
            return float("inf")
        if self.last_lease_s is not None:
            return max(self.last_lease_s + t.lease_timeout_s,
                       self.started_s + min(t.defer_timeout_s, t.lease_timeout_s))
        return self.started_s + t.defer_timeout_s

    @property
    def owes_peer(self) -> bool:
        """The next move is this side's (the peer waits on it): lease the transfer to it."""
        if self.role is TransferRole.PRODUCER_WRITE:
            return self.remote_block_ids is not None
        if self.role is TransferRole.CONSUMER_WRITE:
            return not self.announced
        return self.role is TransferRole.CONSUMER_READ

    def start_clock(self, now_s: float) -> None:
        """Begin counting toward this transfer's deadline (idempotent)."""
        if self.started_s is None:
            self.started_s = now_s

    def move(self, new: TransferState, error: str | None = None) -> None:
        """Change state; raises IllegalTransition for moves the diagram does not allow."""
        if new not in _ALLOWED.get(self.state, frozenset()):
            raise IllegalTransition(f"transfer {self.transfer_id}: {self.state} -> {new}")
        self.state = new
        if error is not None:
            self.error = error

    @property
    def peer_notify(self) -> tuple[str, int] | None:
        """Where to send notifications for this transfer, when known."""
        if self.peer_host is None or self.peer_notify_port is None:
            return None
        return self.peer_host, self.peer_notify_port


def transfer_from_params(params: KVTransferParams, request_id: str, default_mode: TransferMode,
                         now_s: float, *, layerwise: bool) -> Transfer:
    """The transfer a request's (already validated) ``kv_transfer_params`` ask for.

    ``do_remote_prefill`` makes this side the consumer, ``do_remote_decode`` the producer;
    the request's ``mode`` overrides the engine's. Only a WRITE producer streams layerwise."""
    read = (params.mode or default_mode) is TransferMode.READ
    consumer = params.do_remote_prefill
    role = ((TransferRole.CONSUMER_READ if read else TransferRole.CONSUMER_WRITE) if consumer
            else (TransferRole.PRODUCER_READ if read else TransferRole.PRODUCER_WRITE))
    return Transfer(params.transfer_id, role, request_id, now_s,
                    peer_engine_id=params.remote_engine_id, peer_host=params.remote_host,
                    peer_handshake_port=params.remote_handshake_port,
                    peer_notify_port=params.remote_notify_port,
                    peer_epoch=params.remote_epoch if consumer else None,
                    peer_generation=params.remote_generation if consumer else None,
                    layerwise=layerwise and role is TransferRole.PRODUCER_WRITE)
