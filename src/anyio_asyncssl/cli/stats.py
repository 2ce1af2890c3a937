"""What ``asyncssl serve`` counts, for ``GET /stats`` and the exit summary.

Counters are touched only from the event loop's thread (no locks).  Loop lag
is measured by a ticker task that sleeps 10 ms and records how late it woke;
the last 1,000 samples give the percentiles.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from ..offload import Offload

TICK = 0.010


@dataclass
class ServerStats:
    started: float = field(default_factory=time.monotonic)
    connections_open: int = 0
    connections_total: int = 0
    handshakes: int = 0
    pauses: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lag_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    offload: Offload | None = None

    async def measure_lag(self) -> None:
        """Run for ever: how late a 10 ms sleep wakes, in ms."""
        while True:
            t0 = time.perf_counter()
            await anyio.sleep(TICK)
            self.lag_ms.append(max(0.0, (time.perf_counter() - t0 - TICK) * 1000))

    def lag_percentiles(self) -> dict[str, float | None]:
        samples = sorted(self.lag_ms)
        if not samples:
            return {"p50": None, "p90": None, "p99": None, "max": None, "samples": 0}

        def pct(p: float) -> float:
            return round(samples[min(len(samples) - 1, int(p / 100 * len(samples)))], 3)

        return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(samples[-1], 3),
                "samples": len(samples)}

    def as_dict(self) -> dict[str, Any]:
        off: dict[str, Any] | None = None
        if self.offload is not None and not self.offload.closed:
            off = {k: v for k, v in asdict(self.offload.stats()).items()
                   if isinstance(v, (int, float))}
            off["workers"] = self.offload.workers
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "connections": {"open": self.connections_open, "total": self.connections_total},
            "handshakes": self.handshakes,
            "errors": dict(self.errors),
            "pauses": self.pauses,
            "offload": off,
            "loop_lag_ms": self.lag_percentiles(),
        }
