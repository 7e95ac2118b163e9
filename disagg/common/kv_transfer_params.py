"""``kv_transfer_params``: the one typed struct the proxy, the instances and the connector share.

It rides in the JSON body of a completion request (proxy -> P, proxy -> D) and in P's READ
response (P -> proxy). It is parsed once, at the edge that receives it (the instance's API
server, the proxy reading P's answer), with every field typed and bounded; nothing past the edge
sees a raw dict. Clients never need to send it; an instance accepts it only from the proxy's side
of the wire (see ``--kv-params-key``) or, without a key, validated as strictly as anything else.

``transfer_id`` vs ``request_id``: a request has a different request id on each instance (each
API server makes its own), so the two sides of one KV transfer cannot use it to find each
other. The proxy draws one random ``transfer_id`` per attempt and gives it to both; every
control message between P and D is keyed by it. A retry on another instance gets a new one.

``remote_epoch`` / ``remote_generation`` (READ, from P's answer): P's engine epoch (changes when
the engine restarts) and P's generation number of this transfer. D echoes both in ``release``;
P confirms the hold was still live after D's read, or says it was not, and D then refuses the KV.

This module imports nothing but msgspec: the proxy, the engine and the connector all use it.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

MAX_BLOCK_ID = 2**31 - 1
"""Block ids are bounded here at the edge; each side also checks them against the real pool."""
MAX_BLOCKS_PER_TRANSFER = 1 << 20
MAX_TOKENS = 1 << 30
PEER_GAVE_UP = "the KV peer gave up on this transfer"
"""A producer's reason when its consumer failed the transfer (the decode expired it in its
queue, refused the KV, was aborted)."""
KV_TRANSFER_FAILED = "KV transfer failed"
"""How a request's error begins when its KV transfer failed (either side). A WRITE prefill's
such failure is known to its decode (the prefill notified it, or the decode caused it), which
then settles its own request by its kv_load_failure_policy: so the proxy waits for the
decode's answer instead of failing the pair."""
KV_TRANSFER_FAILED_CODE = "kv_transfer_failed"
"""The error ``code`` an instance answers for KV_TRANSFER_FAILED errors."""

TransferId = Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                         pattern=r"^[A-Za-z0-9._:\-]+$")]
EngineId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=255,
                                    pattern=r"^[A-Za-z0-9._\-:\[\]%]+$")]
"""A DNS name, IPv4 or IPv6 address: nothing a ZMQ or TCP endpoint could not be."""
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
BlockId = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK_ID)]
BlockIds = Annotated[list[BlockId], msgspec.Meta(max_length=MAX_BLOCKS_PER_TRANSFER)]
NumTokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
Epoch = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Generation = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
MAX_FIRST_TOKEN_TEXT = 4096
FirstTokenText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FIRST_TOKEN_TEXT)]
"""The text of one token (characters; the longest vocabulary entries are far shorter)."""
PromptDigestHex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
"""16 bytes in hex: which prompt a prefill's KV belongs to (connectors/transfer.py)."""
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
"""Bounded here; the decode engine also checks it against its vocabulary."""


class TransferMode(enum.Enum):
    """How KV moves from prefill to decode (DESIGN.md section 4)."""

    READ = "read"
    """Decode pulls: P runs first and returns its block ids, then D reads them."""
    WRITE = "write"
    """Prefill pushes: P and D get the request at once and P writes into D's blocks."""


class KVTransferParams(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True,
                       omit_defaults=True):
    """One side's instructions for one KV transfer (see the module docstring)."""

    transfer_id: TransferId
    """The key both sides use for this transfer (request ids differ per instance)."""
    do_remote_decode: bool = False
    """Proxy -> P: another instance consumes this prefill's KV (hold it, run 1 token)."""
    do_remote_prefill: bool = False
    """Proxy -> D: the prompt's KV comes from a remote prefill."""
    mode: TransferMode | None = None
    """read or write; None: the instance's configured mode."""
    remote_engine_id: EngineId | None = None
    remote_host: Host | None = None
    remote_handshake_port: Port | None = None
    remote_notify_port: Port | None = None
    remote_block_ids: BlockIds | None = None
    """READ, P's answer: P's blocks holding the prompt's KV, in order."""
    remote_num_tokens: NumTokens | None = None
    """READ, P's answer: prompt tokens P computed (D checks its prompt has as many)."""
    remote_epoch: Epoch | None = None
    """READ, P's answer: P's engine epoch when it took the hold."""
    remote_generation: Generation | None = None
    """READ, P's answer: P's generation of this transfer's hold."""
    remote_prompt_digest: PromptDigestHex | None = None
    """READ, P's answer: the digest of the prompt P computed. D refuses params whose digest
    is not its own prompt's before it takes the first token or reads a byte (params handed
    to the wrong request); P's release_ack confirms it again with the hold's blocks."""
    first_token_id: TokenId | None = None
    """READ, P's answer (and proxy -> D): the token P sampled after the prompt. D emits it at
    once and computes on from it instead of recomputing it (DESIGN.md section 4)."""
    first_token_text: FirstTokenText | None = None
    """READ, proxy -> D (with ``first_token_id``): the text of that token, which the proxy
    already streamed to the client from the prefill's answer. D leaves it out of its own
    stream, and fails the request if its output does not begin with it."""
    decode_max_tokens: NumTokens | None = None
    """Proxy -> P (with ``decode_max_model_len``): the max_tokens the client asked the
    decode for. P refuses (400) a prompt that leaves no room for them in the largest context a
    decode serves before computing it, where a decode would refuse it after."""
    decode_max_model_len: NumTokens | None = None
    """Proxy -> P: the largest max_model_len of the decode pool (it may exceed P's own)."""
    recompute_first_token: bool = False
    """Proxy -> D: ignore the prefill's first token and compute it again (the recompute path;
    both give the monolithic output)."""

    def role_error(self) -> str | None:
        """Why these params cannot describe a transfer (None when they can)."""
        if self.do_remote_decode and self.do_remote_prefill:
            return "do_remote_decode and do_remote_prefill are exclusive"
        if not (self.do_remote_decode or self.do_remote_prefill):
            return "one of do_remote_decode or do_remote_prefill must be true"
        if self.first_token_text is not None and (
                self.first_token_id is None or self.recompute_first_token):
            return "first_token_text needs first_token_id (and no recompute_first_token)"
        return None


class KVParamsError(ValueError):
    """kv_transfer_params that do not parse or do not make sense; the message names why."""


def parse_kv_params(raw: Any, *, require_role: bool = True) -> KVTransferParams:
    """Parse one untrusted ``kv_transfer_params`` value (already JSON-decoded) or raise
    KVParamsError with a readable message. ``require_role``: a request's params must say which
    side this instance plays (P's READ answer, read by the proxy, does not)."""
    if isinstance(raw, KVTransferParams):
        params = raw
    else:
        if not isinstance(raw, dict):
            raise KVParamsError("kv_transfer_params must be an object")
        try:
            params = msgspec.convert(raw, KVTransferParams)
        except msgspec.ValidationError as exc:
            raise KVParamsError(f"invalid kv_transfer_params: {exc}") from None
    error = params.role_error() if require_role else None
    if error is not None:
        raise KVParamsError(f"invalid kv_transfer_params: {error}")
    return params


def kv_params_to_json(params: KVTransferParams) -> dict[str, Any]:
    """The JSON object form (what an HTTP body carries)."""
    out: dict[str, Any] = msgspec.to_builtins(params)
    return out
