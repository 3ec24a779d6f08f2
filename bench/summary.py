"""The shapes' section of results.md: the issue-15 table (shape | measured | goal | met?)
and the IoT Core shape's details."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, bool | None]
Measured = tuple[str, bool | None]


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def _iot(goal: float) -> Any:
    def measured(r: dict[str, Any]) -> Measured:
        return (
            f"{r['achieved_vs_allowed']:.2f} of the {r['allowed']:,.0f} msg/s the pacing allows "
            f"(busiest connection {r['busiest_vs_mean']}× the mean); lost {r['lost']}",
            r["achieved_vs_allowed"] >= goal,
        )

    return measured


def _routes(r: dict[str, Any]) -> Measured:
    return (
        f"{r['ratio']:.2f}× the 1-route rate ({r['many']['msg_per_s']:,} vs "
        f"{r['one']['msg_per_s']:,} msg/s); lost {r['lost']}",
        r["ratio"] >= 0.8,
    )


def _qos0(r: dict[str, Any]) -> Measured:
    ours, mosq = r["ours-1"], r["mosquitto"]
    return (
        f"{100 * ours['delivered_ratio']:.1f} % delivered (dropped as full: "
        f"{ours['bridge_dropped']:.0f}); Mosquitto's bridge {100 * mosq['delivered_ratio']:.1f} %",
        ours["unique"] == r["messages"],
    )


def _archive(r: dict[str, Any]) -> Measured:
    best, req = r["runs"]
    s = r["settings"]
    return (
        f"{r['required_vs_best_effort']:.2f}× best_effort ({req['msg_per_s']:,} vs "
        f"{best['msg_per_s']:,} msg/s at `max_inflight` {s['max_inflight']} / "
        f"`flush_interval` {s['flush_interval']:g} s, moto); lost {r['lost']}",
        r["required_vs_best_effort"] >= 0.8,
    )


def _bridge(r: dict[str, Any]) -> Measured:
    return (
        f"{r['vs_in']:.2f}× Mosquitto's bridge as `in` on the target broker, "
        f"{r['vs_out']:.2f}× as `out` on the source broker ({r['ours-1']['msg_per_s']:,}"
        f" vs {r['mosquitto']['msg_per_s']:,} / {r['mosquitto-out']['msg_per_s']:,} msg/s)",
        min(r["vs_in"], r["vs_out"]) >= 1.2,
    )


def _latency(r: dict[str, Any]) -> Measured:
    a, m, mo = (r["added_ms"][k] for k in ("ours-1", "mosquitto", "mosquitto-out"))
    ratios = [v for x in r["ratios"].values() for v in x.values()]
    return (
        f"{a['0.5']:.2f} ms / {a['0.75']:.2f} ms at {r['our_max'] / 2:,.0f} / "
        f"{r['our_max'] * 0.75:,.0f} msg/s ({_x(r['ratios']['mosquitto'])} Mosquitto's "
        f"bridge `in`: {m['0.5']:.2f} / {m['0.75']:.2f} ms; "
        f"{_x(r['ratios']['mosquitto-out'])} `out`: {mo['0.5']:.2f} / {mo['0.75']:.2f} ms)",
        None if None in ratios else all(v <= 1.5 for v in ratios),
    )


def _pacing(r: dict[str, Any]) -> Measured:
    return (
        f"at most {r['max_in_1s_window']} PUBLISH in any 1 s window on one connection "
        f"({r['connections']} connections at rate {r['rate']:g}, burst {r['burst']:g}, "
        f"offered {r['offered_rate']:g} msg/s)",
        r["max_in_1s_window"] <= r["rate"],
    )


# The rows, in its order: (shape, key inside it, row name, goal, how to read it)
ROWS: list[tuple[str, str | None, str, str, Any]] = [
    ("iot", "20000",
     "IoT Core shape: 200 target connections paced at 100 msg/s, 20,000 device topics",
     "≥ 0.97", _iot(0.97)),
    ("iot", "2000", "same, 2,000 device topics", "≥ 0.95", _iot(0.95)),
    ("routes", None, "500 routes, message matching the last one", "≥ 0.8×", _routes),
    ("qos0", None, "QoS 0 flood, 50,000 messages", "100 % with the default policy", _qos0),
    ("archive", None, "`backup.s3.mode: required`", "≥ 0.8× `best_effort` at the same settings",
     _archive),
    ("bridge", None, "1 topic, 1 route, 1 connection, 200 B",
     "≥ 1.2× in both harness configurations", _bridge),
    ("latency", None, "added latency p50 over no bridge, at 50 % / 75 % of our max rate",
     "≤ 1.5× Mosquitto's bridge at both", _latency),
    ("pacing", None, "pacing as the broker sees it (rate 100, burst 0.1)",
     "never above the configured limit in any 1 s window on the wire", _pacing),
]  # fmt: skip


def rows(results: dict[str, Any]) -> list[Row]:
    """Every row of the issue's table; a shape not run (or failed) says so."""
    shapes = results.get("shapes", {})
    failed = {e["where"].removeprefix("shape ") for e in results.get("errors", [])}
    out: list[Row] = []
    for shape, key, name, goal, read in ROWS:
        r = shapes.get(shape)
        if r is not None and key is not None:
            r = r.get(key)
        if r is None:
            why = "failed: see Errors" if shape in failed else f"not run (`--shapes {shape}`)"
            out.append((name, why, goal, None))
            continue
        measured, ok = read(r)
        out.append((name, measured, goal, ok))
    return out


def _x(ratios: dict[str, float | None]) -> str:
    return " / ".join("–" if v is None else f"{v:.1f}×" for v in ratios.values())


def markdown(results: dict[str, Any]) -> list[str]:
    if not results.get("settings", {}).get("shapes"):
        return []
    found = rows(results)
    lines = [
        "",
        "## The shapes users run (issue 15)",
        "",
        "Loopback, Mosquitto on both sides, QoS 1 unless named; how each is measured: "
        'bench/README.md "Shapes". lost must be 0 in every run.',
        "",
        "| shape | measured | goal | met? |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {shape} | {measured} | {goal} | {_met(ok)} |" for shape, measured, goal, ok in found
    ]
    iot = results.get("shapes", {}).get("iot", {})
    if iot:
        lines += [
            "",
            "IoT Core shape details: the window is the steady part of the offer (start-up "
            "excluded); achieved: what the subscriber received in it; worker msg/s: what "
            "the target acknowledged to the worker between its two scrapes; busiest / idlest ÷ "
            "mean: each target connection's `connection_published` over it; in flight: "
            "the worker's `inflight_messages` at the window's start and end (at "
            "`flow.max_inflight` the pool is the limit; well below it with the source broker "
            "near a core, the source broker is); machine cores: every process on the machine "
            "(at the machine's core count, the run is CPU-bound as a whole).",
            "",
            "| topics | offered msg/s | achieved msg/s | ÷ allowed | worker msg/s | busiest ÷ mean "
            "| idlest ÷ mean | worker cores | source broker cores | machine cores "
            "| in flight (2 scrapes) "
            "| lost | dup | order inv. |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (v for v in iot.values() if isinstance(v, dict)):
            lines.append(
                f"| {r['topics']:,} | {r['publish_rate']:,} | {r['achieved']:,} "
                f"| {r['achieved_vs_allowed']:.3f} | {r.get('worker_published_rate', 0):,} "
                f"| {r['busiest_vs_mean']} "
                f"| {r['idlest_vs_mean']} | {r['worker_cores']} | {r.get('source_broker_cores')} "
                f"| {r.get('machine_cores')} of {r.get('machine_cores_total')} "
                f"| {' / '.join(map(str, r.get('worker_inflight', [])))} | {r['lost']} "
                f"| {r['duplicated']} | {r['out_of_order']} |"
            )
    return lines
