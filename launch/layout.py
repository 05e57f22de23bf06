"""The derived parallel layout: what ``launch.config.derive_layout`` makes of ``parallel``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """A complete parallel layout; tp * pp * cp * dp == world_size."""

    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int = 1
    sp: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        return (f"TP={self.tp} PP={self.pp} VPP={self.vpp} CP={self.cp} DP={self.dp} "
                f"SP={'on' if self.sp else 'off'}")
