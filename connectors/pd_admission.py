"""When a WRITE prefill may start (PDConnector.can_schedule).

A WRITE prefill writes into blocks the decode announces (``remote_blocks``); a layerwise one
also needs the handshake that lets it stream. With ``early_start`` it may start before that,
but prefills whose destination is not known yet hold at most EARLY_START_POOL_FRACTION of the
pool: the rest stays for prefills whose destination is known, so a prefill holding blocks a
busy decode cannot take yet never starves the ones that decode waits for (P and D cannot
deadlock).
"""

from __future__ import annotations

from connectors.transfer import Transfer

EARLY_START_POOL_FRACTION = 0.5
"""WRITE prefills whose destination is not known yet may hold at most this share of the
pool."""


def destination_known(t: Transfer) -> bool:
    """The decode's blocks are known (layerwise: and the peer to stream them to)."""
    return t.remote_block_ids is not None and (not t.layerwise or t.stream_peer is not None)


class EarlyStarts:
    """WRITE prefills admitted before their destination was known, and the blocks each
    prompt takes (the one owner of that ledger)."""

    def __init__(self, transfers: dict[str, Transfer], block_size: int,
                 num_blocks: int) -> None:
        self._transfers = transfers
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._blocks: dict[str, int] = {}
        """Transfer id -> the blocks its prompt takes."""

    def admit(self, t: Transfer, num_prompt_tokens: int) -> bool:
        """Admit ``t`` (once admitted, always) if the blocks of such prefills, its prompt's
        included, stay within the early-start share of the pool."""
        if t.transfer_id in self._blocks:
            return True
        for tid in list(self._blocks):  # a destination known, or the transfer gone: not early
            e = self._transfers.get(tid)
            if e is None or e.terminal or destination_known(e):
                del self._blocks[tid]
        need = -(-num_prompt_tokens // self._block_size)
        if sum(self._blocks.values()) + need > EARLY_START_POOL_FRACTION * self._num_blocks:
            return False
        self._blocks[t.transfer_id] = need
        return True
