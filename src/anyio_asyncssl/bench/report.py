"""Medians, ratios to trio.SSLStream, the targets, RESULTS.md and the chart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import peers as P

Results = dict[str, Any]

# scenario -> (metric key, column title, lower is better)
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "saturated": [("hs_per_s", "handshakes/s", False),
                  ("cpu_ms_per_hs", "server CPU ms/hs", True),
                  ("loop_cpu_ms_per_hs", "loop thread CPU ms/hs", True),
                  ("lag_p99_ms", "lag p99 ms", True),
                  ("lag_max_ms", "lag max ms", True),
                  ("load_busy", "load core busy", True)],
    "half": [("hs_per_s", "achieved hs/s", False),
             ("lag_p99_ms", "lag p99 ms", True),
             ("lag_max_ms", "lag max ms", True),
             ("cpu_ms_per_hs", "server CPU ms/hs", True),
             ("hs_latency_p99_ms", "handshake latency p99 ms", True)],
    "bulk": [("mib_per_s", "MiB/s", False),
             ("cpu_ms_per_mib", "server CPU ms/MiB", True),
             ("loop_cpu_ms_per_mib", "loop thread CPU ms/MiB", True),
             ("lag_max_ms", "lag max ms", True),
             ("load_busy", "load core busy", True)],
    "memory": [("kib_per_conn", "KiB per idle connection", True)],
    "memory-sansio": [("kib_per_conn", "KiB per connection (sans-IO pair)", True)],
}
NO_RATIO = {"load_busy"}  # a property of the run, not a figure to compare
SANSIO_BASE = "stdlib-sslobject"
SANSIO_LABELS = {"stdlib-sslobject": "stdlib ssl.SSLObject + MemoryBIOs",
                 "asyncssl": "ours: TLSConnection", "asyncssl-offload":
                 "ours: TLSConnection, offload"}
KEYS = {"rsa2048": "RSA-2048", "rsa3072": "RSA-3072", "p256": "ECDSA P-256"}


def label(peer: str) -> str:
    if peer in P.BY_ID:
        return P.BY_ID[peer].label
    return SANSIO_LABELS.get(peer, peer)


def values(res: Results, scenario: str, variant: str, peer: str, key: str) -> list[float | None]:
    runs = res["scenarios"].get(scenario, {}).get(variant, {}).get(peer, [])
    return [r.get(key) for r in runs]


def med(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def ratios(res: Results, scenario: str, variant: str, peer: str, key: str,
           base: str) -> list[float]:
    """Per-repetition ratios peer/base (repetition i of both ran in the same round)."""
    a = values(res, scenario, variant, peer, key)
    b = values(res, scenario, variant, base, key)
    return [x / y for x, y in zip(a, b, strict=False) if x is not None and y]


def fmt(x: float | None, precise: bool = False) -> str:
    if x is None:
        return "—"
    if precise and abs(x) < 10:
        return f"{x:.3f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def spread(xs: list[float | None], suffix: str = "", precise: bool = False) -> str:
    ys = [x for x in xs if x is not None]
    if not ys:
        return "—"
    m = statistics.median(ys)
    if len(ys) == 1:
        return f"{fmt(m, precise)}{suffix}"
    return f"{fmt(m, precise)}{suffix} [{fmt(min(ys))}-{fmt(max(ys))}]"


# -- targets ------------------------------------------------------------------------

@dataclass
class Target:
    text: str
    peer: str
    ratio: list[float]
    limit: float
    at_least: bool = False
    note: str = ""

    @property
    def value(self) -> float | None:
        return statistics.median(self.ratio) if self.ratio else None

    @property
    def status(self) -> str:
        v = self.value
        if v is None:
            return "not measured"
        ok = v >= self.limit if self.at_least else v <= self.limit
        return "**met**" if ok else "**missed**"


def offload_peers(res: Results, scenario: str) -> list[str]:
    return [p.id for p in P.PEERS if p.group == P.OURS and p.offload and scenario in p.scenarios
            and not p.id.endswith("-always") and p.id in res["peers"]]


def best_python(res: Results, scenario: str, variant: str, key: str) -> str | None:
    best: tuple[float, str] | None = None
    for p in P.PEERS:
        if p.group != P.PYTHON:
            continue
        m = med(values(res, scenario, variant, p.id, key))
        if m is not None and (best is None or m < best[0]):
            best = (m, p.id)
    return best[1] if best else None


def targets(res: Results) -> list[Target]:
    out: list[Target] = []
    base = P.BASELINE
    for key, limit in (("rsa2048", 0.8), ("rsa3072", 0.85)):
        for p in offload_peers(res, "saturated"):
            out.append(Target(f"server CPU per handshake, {KEYS[key]}, <= {limit}x trio",
                              p, ratios(res, "saturated", key, p, "cpu_ms_per_hs", base),
                              limit))
        if "nginx" in res["peers"]:
            out.append(Target(f"(reference) nginx CPU per handshake, {KEYS[key]}", "nginx",
                              ratios(res, "saturated", key, "nginx", "cpu_ms_per_hs", base),
                              limit, note="reference, not a target of ours (issue: 0.63x)"))
    for key in ("rsa2048", "rsa3072"):
        for metric, name in (("lag_p99_ms", "p99"), ("lag_max_ms", "max")):
            bp = best_python(res, "saturated", key, metric)
            for p in offload_peers(res, "saturated"):
                r = ratios(res, "saturated", key, p, metric, bp) if bp else []
                out.append(Target(f"saturated loop lag {name}, {KEYS[key]}, <= 0.5x the best "
                                  "Python peer", p, r, 0.5,
                                  note=f"best Python peer: {label(bp) if bp else '—'}"))
    for key in res["scenarios"].get("half", {}):
        for p in offload_peers(res, "half"):
            out.append(Target(f"half load loop lag max, {KEYS[key]}, <= 0.25x trio", p,
                              ratios(res, "half", key, p, "lag_max_ms", base), 0.25))
    for p in offload_peers(res, "bulk"):
        out.append(Target("bulk MiB/s >= 2.0x trio", p,
                          ratios(res, "bulk", "p256", p, "mib_per_s", base), 2.0, True))
        out.append(Target("bulk server CPU per MiB <= 0.5x trio", p,
                          ratios(res, "bulk", "p256", p, "cpu_ms_per_mib", base), 0.5))
    if "socat" in res["peers"]:
        out.append(Target("(reference) socat bulk MiB/s", "socat",
                          ratios(res, "bulk", "p256", "socat", "mib_per_s", base), 2.0, True,
                          note="reference (issue: 2.03x)"))
    for p in offload_peers(res, "bulk"):
        always = p + "-always"
        if always in res["peers"]:
            out.append(Target("async_mode='always' keeps >= 0.95x of the bulk MiB/s", always,
                              ratios(res, "bulk", "p256", always, "mib_per_s", p), 0.95, True,
                              note=f"against {label(p)}"))
    for kind in ("asyncssl", "asyncssl-offload"):
        out.append(Target("RSS per connection <= 1.0x the stdlib's SSLObject (sans-IO)", kind,
                          ratios(res, "memory-sansio", "p256", kind, "kib_per_conn",
                                 SANSIO_BASE), 1.0))
    pairs = (("asyncssl-trio", base), ("asyncssl-trio-nooffload", base),
             ("asyncssl-anyio-asyncio", "anyio-tlsstream-asyncio"),
             ("asyncssl-anyio-trio", "anyio-tlsstream-trio"))
    for p, b in pairs:
        if p in res["peers"] and b in res["peers"]:
            out.append(Target("RSS per idle connection <= 1.0x the same stack on ssl.SSLObject",
                              p, ratios(res, "memory", "p256", p, "kib_per_conn", b), 1.0,
                              note=f"against {label(b)}"))
    return out


# -- RESULTS.md ------------------------------------------------------------------------

def table(res: Results, scenario: str, variant: str) -> list[str]:
    metrics = METRICS[scenario]
    base = SANSIO_BASE if scenario == "memory-sansio" else P.BASELINE
    runs = res["scenarios"].get(scenario, {}).get(variant, {})
    head = "| peer | " + " | ".join(f"{t} | x {'SSLObject' if base == SANSIO_BASE else 'trio'}"
                                     for _, t, _ in metrics) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(metrics)]
    for peer, reps in runs.items():
        cells = []
        for key, _, _ in metrics:
            vals = [r.get(key) for r in reps]
            cells.append(spread(vals))
            rr = [] if key in NO_RATIO else ratios(res, scenario, variant, peer, key, base)
            cells.append(spread(list(rr), "x") if rr else "—")
        errors = [r["error"] for r in reps if "error" in r]
        first = " ".join(errors[0].split()).replace("|", "/")[-120:] if errors else ""
        name = label(peer) + (f" ({len(errors)} failed: {first})" if errors else "")
        busy = med([r.get("load_busy") for r in reps])
        if scenario == "saturated" and busy is not None and busy > 0.9:
            name += " ‡"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


TITLES = {
    "saturated": "Saturated: C=16 full TLS 1.3 handshakes, server pinned to CPU 0, load to CPU 1",
    "half": "Half load: a fixed rate of half trio.SSLStream's saturated rate, nothing pinned",
    "bulk": "Bulk: {mib} MiB echoed each way on one connection (ECDSA P-256, TLS 1.3 "
            "AES-256-GCM), server pinned to CPU 0, client to CPU 1",
    "memory": "Memory: resident set growth of the server per idle established connection, "
              "{n} open (ECDSA P-256)",
    "memory-sansio": "Memory, sans-IO: {n} client/server pairs over memory BIOs in one "
                     "process (what the stdlib's ssl.SSLObject costs)",
}


def write_markdown(res: Results, path: Path, chart: str | None) -> None:
    cfg = res["config"]
    lines = ["# Benchmark results", "",
             f"Written by `benchmarks/run.py` on {res['meta']['date']} "
             f"({cfg['mode']} mode, {cfg['reps']} repetition(s), peers interleaved: "
             "repetition 1 of every peer, then repetition 2, ...).  Every cell is the median "
             "[min-max] over the repetitions; `x trio` is the median [min-max] of the "
             "per-repetition ratios to trio.SSLStream in the same round.", "",
             "```sh", res["meta"]["command"], "```", ""]
    if res["meta"].get("shared_machine_note"):
        lines += [f"> {res['meta']['shared_machine_note']}", ""]
    lines += ["## Machine and versions", ""]
    for k, v in res["meta"]["machine"].items():
        lines.append(f"- {k}: {v}")
    for k, v in res["meta"]["versions"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Peers", ""]
    for p in P.PEERS:
        if p.id in res["peers"]:
            state = "ran"
        elif p.id in res["missing"]:
            state = f"**not available**: {res['missing'][p.id]}"
        else:
            state = "not selected in this run"
        note = f" ({p.note})" if p.note else ""
        lines.append(f"- {p.label} [`{p.id}`]: {state}{note}")
    lines += ["", "## Targets", "",
              "| target | peer | measured ratio | status | note |", "|---|---|---:|---|---|"]
    for t in targets(res):
        lines.append(f"| {t.text} | {label(t.peer)} | {spread(list(t.ratio), 'x', True)} | "
                     f"{t.status if not t.text.startswith('(reference)') else '—'} | "
                     f"{t.note} |")
    for scenario in ("saturated", "half", "bulk", "memory", "memory-sansio"):
        for variant in res["scenarios"].get(scenario, {}):
            title = TITLES[scenario].format(mib=cfg["bulk_mib"], n=cfg["mem_connections"])
            extra = ""
            if scenario in ("saturated", "half"):
                extra = f", {KEYS.get(variant, variant)}"
            if scenario == "half":
                hr = res["scenarios"].get("half-rate", {}).get(variant, {}).get("rate", [{}])[0]
                if hr:
                    extra += (f", {hr['rate']:.0f} handshakes/s "
                              f"(trio.SSLStream saturated: {hr['capacity']:.0f}/s)")
            lines += ["", f"## {title}{extra}", ""]
            lines += table(res, scenario, variant)
    lines += ["", "‡ the load core was more than 90 % busy: the load generator, not the "
              "server, may have set the rate (CPU per handshake and loop lag stay valid).", ""]
    lines += ["## Method", ""] + [f"- {m}" for m in res["meta"]["method"]]
    if chart:
        lines += ["", f"![ratios to trio.SSLStream]({chart})", ""]
    path.write_text("\n".join(lines) + "\n")


# -- chart ------------------------------------------------------------------------------

# the targets that are ratios to trio.SSLStream, drawn as red dashed lines
CHART_TARGETS = {("saturated", "rsa2048", "cpu_ms_per_hs"): 0.8,
                 ("saturated", "rsa3072", "cpu_ms_per_hs"): 0.85,
                 ("half", "rsa2048", "lag_max_ms"): 0.25,
                 ("half", "rsa3072", "lag_max_ms"): 0.25,
                 ("bulk", "p256", "mib_per_s"): 2.0,
                 ("bulk", "p256", "cpu_ms_per_mib"): 0.5}


def write_chart(res: Results, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no chart"
    panels: list[tuple[str, str, str, str]] = []
    for key in res["scenarios"].get("saturated", {}):
        panels.append(("saturated", key, "cpu_ms_per_hs", f"server CPU/handshake, {KEYS[key]}"))
    for key in res["scenarios"].get("saturated", {}):
        panels.append(("saturated", key, "lag_max_ms", f"saturated lag max, {KEYS[key]}"))
    for key in res["scenarios"].get("half", {}):
        panels.append(("half", key, "lag_max_ms", f"half load lag max, {KEYS[key]}"))
    if "bulk" in res["scenarios"]:
        panels.append(("bulk", "p256", "mib_per_s", "bulk MiB/s (higher is better)"))
        panels.append(("bulk", "p256", "cpu_ms_per_mib", "bulk server CPU/MiB"))
    if "memory" in res["scenarios"]:
        panels.append(("memory", "p256", "kib_per_conn", "RSS per idle connection"))
    if not panels:
        return "no scenario to chart"
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    colors = {P.OURS: "tab:blue", P.PYTHON: "tab:gray", P.C: "tab:orange"}
    for ax, (scenario, variant, key, title) in zip(axes.flat, panels, strict=False):
        names, vals, cols_ = [], [], []
        for peer in res["scenarios"][scenario].get(variant, {}):
            rr = ratios(res, scenario, variant, peer, key, P.BASELINE)
            if rr:
                names.append(label(peer).replace("ours: ", "* "))
                vals.append(statistics.median(rr))
                cols_.append(colors[P.BY_ID[peer].group])
        ax.barh(range(len(vals)), vals, color=cols_)
        ax.set_yticks(range(len(vals)), names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        limit = CHART_TARGETS.get((scenario, variant, key))
        if limit is not None:
            ax.axvline(limit, color="tab:red", lw=1, ls="--")
        ax.set_title(title + " (x trio.SSLStream)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"anyio-asyncssl benchmarks, ratios to trio.SSLStream ({res['meta']['date']}; "
                 "blue: ours, grey: Python peers, orange: C; red dashes: targets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def console_summary(res: Results) -> list[str]:
    out = []
    for t in targets(res):
        out.append(f"{t.status.strip('*'):12s} {t.text} — {label(t.peer)}: "
                   f"{spread(list(t.ratio), 'x', True)}")
    return out
