"""The host<->device copy link: how long a step's KV block copies take.

One link carries both directions. ``full_duplex=False`` (the default) serializes device-to-host and
host-to-device copies on it, which is the conservative reading of "one link, both directions" (DESIGN.md
section 8); ``full_duplex=True`` lets them run side by side, as two DMA engines on a PCIe link can. Each
direction's copies in one step form one batch that pays ``latency`` once plus ``blocks * block_bytes /
bandwidth``.

The simulator asks the link twice per step: once for the critical-path copies (``sync_swap_out`` and
``sync_swap_in``, done before compute) and once for the overlapped ones (``swap_out`` and ``swap_in``, which
run beside compute; the step ends when both are done). Because a step waits for its overlapped copies, the
link is idle at the start of every step, so the two calls fully describe its timeline; the per-step busy
time is recorded in the iteration trace.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CopyLink:
    block_bytes: int  # bytes of one KV block (all layers, K and V, one GPU shard)
    bandwidth: float  # bytes/s in each direction
    latency: float = 0.0  # seconds per batch of copies in one direction
    full_duplex: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, int) or self.block_bytes < 0:
            raise ValueError(f"CopyLink.block_bytes must be an int >= 0, got {self.block_bytes!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"CopyLink.bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")
        if not self.latency >= 0:
            raise ValueError(f"CopyLink.latency must be >= 0 s, got {self.latency!r}")

    @classmethod
    def from_preset(cls, preset, *, full_duplex: bool | None = None) -> "CopyLink":
        """The link of an ``eval.costmodels.HardwarePreset`` (optionally overriding its duplex mode)."""
        return cls(
            block_bytes=preset.block_bytes,
            bandwidth=preset.link_bandwidth,
            latency=preset.link_latency,
            full_duplex=preset.link_full_duplex if full_duplex is None else full_duplex,
        )

    def one_way(self, num_blocks: int) -> float:
        """Seconds to copy ``num_blocks`` blocks in one direction."""
        if num_blocks <= 0:
            return 0.0
        return self.latency + num_blocks * self.block_bytes / self.bandwidth

    def time(self, blocks_out: int, blocks_in: int) -> float:
        """Seconds for ``blocks_out`` device->host and ``blocks_in`` host->device blocks issued together."""
        t_out = self.one_way(blocks_out)
        t_in = self.one_way(blocks_in)
        return max(t_out, t_in) if self.full_duplex else t_out + t_in
