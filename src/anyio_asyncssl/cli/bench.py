"""``asyncssl bench``: this library against trio's and anyio's TLS streams, measured now.

Runs the benchmark harness (anyio_asyncssl.bench, the one behind
benchmarks/run.py) in its quick mode on four peers of one event loop: our
stream with offload on and off, trio.SSLStream, and anyio's TLSStream.
Servers and load generators are separate processes (server on CPU 0, load
on CPU 1).  A progress bar on stderr counts the measurements; then a table of
handshakes/s, server CPU per handshake, loop lag p99/max (saturated RSA-2048)
and bulk MiB/s, each also as a ratio to trio.SSLStream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from .common import CLIError, need_trio

PEERS = {
    "trio": ["asyncssl-trio", "asyncssl-trio-nooffload", "trio-sslstream",
             "anyio-tlsstream-trio"],
    "asyncio": ["asyncssl-anyio-asyncio", "asyncssl-anyio-asyncio-nooffload", "trio-sslstream",
                "anyio-tlsstream-asyncio"],
}
LABELS = {
    "asyncssl-trio": "anyio-asyncssl (trio face), offload",
    "asyncssl-trio-nooffload": "anyio-asyncssl (trio face), no offload",
    "asyncssl-anyio-asyncio": "anyio-asyncssl (anyio/asyncio), offload",
    "asyncssl-anyio-asyncio-nooffload": "anyio-asyncssl (anyio/asyncio), no offload",
    "trio-sslstream": "trio.SSLStream",
    "anyio-tlsstream-trio": "anyio TLSStream (trio)",
    "anyio-tlsstream-asyncio": "anyio TLSStream (asyncio)",
}


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="compare with trio.SSLStream and anyio's TLSStream, now",
                       description=(__doc__ or "").split("\n\n")[1].replace("\n", " "))
    b.add_argument("--backend", choices=sorted(PEERS), default="trio",
                   help="which of our faces and which anyio TLSStream (default trio)")
    b.add_argument("--smoke", action="store_true",
                   help="seconds instead of minutes: proves it runs, measures little")
    b.add_argument("--plot", metavar="FILE.png", help="draw the comparison (the plot extra)")
    b.add_argument("--out", metavar="DIR", help="also keep RESULTS.md and results.json here")
    b.set_defaults(func=run)


class Progress:
    """A one-line bar on stderr, advanced by the harness's per-measurement lines."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()

    def __call__(self, line: str) -> None:
        words = line.split()
        if len(words) >= 3 and words[0] in ("saturated", "bulk") and "=" in line:
            self.done += 1
            width = 30
            filled = width * min(self.done, self.total) // self.total
            text = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                    f"{words[0]} {words[2]}")
            print(("\r" if self.tty else "") + text, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _value(res: dict[str, Any], scenario: str, variant: str, peer: str, key: str) -> float | None:
    runs = res["scenarios"].get(scenario, {}).get(variant, {}).get(peer, [])
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return median(values) if values else None


def table(res: dict[str, Any], ids: list[str]) -> list[str]:
    cols = [("handshakes/s", "saturated", "rsa2048", "hs_per_s"),
            ("CPU ms/hs", "saturated", "rsa2048", "cpu_ms_per_hs"),
            ("lag p99 ms", "saturated", "rsa2048", "lag_p99_ms"),
            ("lag max ms", "saturated", "rsa2048", "lag_max_ms"),
            ("bulk MiB/s", "bulk", "p256", "mib_per_s")]
    name_w = max(len(LABELS[i]) for i in ids)
    head = f"{'':{name_w}}" + "".join(f" {c[0]:>20}" for c in cols)
    lines = [head, "-" * len(head)]
    for peer in ids:
        cells = []
        for _, scenario, variant, key in cols:
            v = _value(res, scenario, variant, peer, key)
            base = _value(res, scenario, variant, "trio-sslstream", key)
            if v is None:
                cells.append(f"{'-':>20}")
            else:
                ratio = f" ({v / base:.2f}x)" if base else ""
                cells.append(f"{f'{v:.3g}{ratio}':>20}")
        lines.append(f"{LABELS[peer]:{name_w}}" + "".join(f" {c}" for c in cells))
    lines.append("(x = ratio to trio.SSLStream in the same run; saturated: C=16 TLS 1.3 "
                 "RSA-2048 handshakes, server pinned to one CPU; lag: a 1 ms ticker in the "
                 "server's loop)")
    return lines


def run(args: argparse.Namespace) -> int:
    from ..bench import run as harness

    if len(os.sched_getaffinity(0)) < 2:
        raise CLIError("asyncssl bench needs 2 CPUs (server on one, load on the other)")
    if args.backend == "trio":
        need_trio("the trio peers")
    ids = PEERS[args.backend]
    with tempfile.TemporaryDirectory(prefix="asyncssl-bench-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        keys = 1 if args.smoke else 3
        progress = Progress(len(ids) * (keys + 1))
        argv = ["--smoke" if args.smoke else "--quick", "--only", "saturated,bulk",
                "--peers", ",".join(ids), "--no-install", "--out", str(out)]
        try:
            harness.main(argv, log_to=progress)
        except SystemExit as exc:
            raise CLIError(f"the benchmark could not run: {exc}") from None
        finally:
            progress.finish()
        res = json.loads((out / "results.json").read_text())
        for peer, why in res.get("missing", {}).items():
            print(f"asyncssl: {peer} not measured: {why}", file=sys.stderr)
        print("\n".join(table(res, [i for i in ids if i in res["peers"]])))
        if args.plot:
            chart = out / "results.png"
            if not chart.exists():
                raise CLIError("--plot needs matplotlib: pip install 'anyio-asyncssl[plot]'")
            shutil.copyfile(chart, args.plot)
            print(f"asyncssl: chart written to {args.plot}")
    return 0
