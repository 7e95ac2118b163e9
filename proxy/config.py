"""The proxy's configuration: one frozen object built once by the launcher or a test."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from disagg.common.kv_transfer_params import TransferMode

__all__ = ["PolicyName", "ProxyConfig", "TransferMode"]


class PolicyName(enum.Enum):
    """Which routing policy picks an instance out of a pool."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    POWER_OF_TWO = "power_of_two"
    KV_AWARE = "kv_aware"
    """Most cached prompt prefix minus load (proxy/policies.py KVAware); registered instances
    only publish their caches: static ones are routed as least_loaded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Everything the proxy app needs; never mutated after creation."""

    host: str = "127.0.0.1"
    """Address the proxy's HTTP server listens on."""
    port: int = 8000
    """HTTP port of the proxy."""
    prefill_urls: tuple[str, ...] = ()
    """Static prefill instances (``http://host:port``)."""
    decode_urls: tuple[str, ...] = ()
    """Static decode instances (``http://host:port``)."""
    mode: TransferMode = TransferMode.READ
    """KV transfer mode; instances that report another mode are rejected."""
    policy: PolicyName = PolicyName.ROUND_ROBIN
    """Routing policy used for both pools."""
    model: str | None = None
    """Model (or tokenizer path) used to count prompt tokens; None: the instances' model."""
    local_prefill_threshold_tokens: int = 0
    """Prompts shorter than this go to a decode instance alone; 0 disables."""
    local_prefill_auto: bool = False
    """``--local-prefill-threshold auto``: the threshold is learned (proxy/local_prefill.py)."""
    local_prefill_max_tokens: int = 1024
    """The largest prompt ``auto`` sends to a decode alone."""
    first_token_from_prefill: bool = True
    """The decode emits the token the prefill already sampled, at once, and computes on from
    it (``--first-token prefill``); False: the decode computes it again (``recompute``)."""
    registration_address: str | None = None
    """ZMQ address (``tcp://host:port``) where instances register; None: no dynamic pool."""
    registration_key: str | None = None
    """Only registration frames sealed with this key count (disagg/common/registration.py);
    None: any frame that decodes does."""
    max_missed_heartbeats: int = 3
    """A registered instance that misses this many heartbeat intervals leaves the pool."""
    kv_index_max_hashes: int = 1 << 20
    """Block hashes the KV-aware index keeps over all instances; past it the view updated
    longest ago is dropped until that instance's next snapshot."""
    admin_key: str | None = None
    """Bearer key for the admin API; None disables the admin API."""
    api_key: str | None = None
    """Bearer key every client /v1/* request must carry (``--api-key``); it is also sent to
    the instances, so ones started with the same key accept the proxy. None: open."""
    kv_params_key: str | None = None
    """Sent to every instance in header X-Disagg-KV-Key (instances started with the same
    ``--kv-params-key`` accept kv_transfer_params and KV aborts only with it); None: not sent."""
    health_check_interval_s: float = 2.0
    """How often every instance's ``/instance_info`` is probed."""
    probe_timeout_s: float = 3.0
    """Deadline of one probe or one abort call."""
    unhealthy_after_failures: int = 3
    """Probes in a row that time out or fail before an instance leaves the rotation
    (a refused connection takes it out at once, and so does a failed probe sent right after
    a request failed on it: proxy/health.py Reviver.suspect)."""
    connect_timeout_s: float = 5.0
    """Deadline to open a TCP connection to an instance."""
    prefill_timeout_s: float = 300.0
    """Deadline of a whole prefill call (``max_tokens=1``)."""
    first_byte_timeout_s: float = 300.0
    """Deadline from sending a streamed decode request to its first response bytes (a
    non-streamed answer arrives whole: ``request_timeout_s`` bounds it)."""
    stream_idle_timeout_s: float = 120.0
    """Longest silence allowed between two chunks of a decode stream."""
    request_timeout_s: float = 3600.0
    """Deadline of a whole decode call, stream included."""
    max_prefill_attempts: int = 3
    """Prefill instances tried before the request fails (nothing reached the client yet)."""
    max_decode_attempts: int = 2
    """Decode instances tried before the request fails (nothing reached the client yet)."""
    max_upstream_connections: int = 8192
    """Connection limit of each upstream pool's client session (1,000+ streams each)."""
    max_request_body_bytes: int = 64 * 1024 * 1024
    """Largest request body a client may send."""
    access_log: bool = False
    """Log one line per request (off: 1,000 concurrent streams make it noise)."""
    log_request_phases_sample_rate: float = 0.0
    """Fraction (0-1) of answered requests that get one INFO line with their id and TTFT
    phases (disagg/common/timings.py); 0: none."""
    log_stats_interval_s: float | None = None
    """Seconds between two periodic stats lines (requests/s, in flight, retries, failures);
    None: none (``--disable-log-stats``; the launcher's default is every 10 s)."""
