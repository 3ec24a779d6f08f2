"""The shapes' section of results.md: the issue-15 table (shape | measured | goal | met?)
and a line of detail per shape. Only what bench/shapes.py measured is shown."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, bool | None]


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def _iot(shapes: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    goals = {"20000": 0.97, "2000": 0.95}
    for key, goal in goals.items():
        r = shapes.get("iot", {}).get(key)
        name = (
            "IoT Core shape: 200 target connections paced at 100 msg/s, 20,000 device topics"
            if key == "20000"
            else "same, 2,000 device topics"
        )
        if not r:
            continue
        measured = (
            f"{r['achieved_vs_allowed']:.2f} of the {r['allowed']:,.0f} msg/s the pacing allows "
            f"(busiest connection {r['busiest_vs_mean']}× the mean); lost {r['lost']}"
        )
        rows.append((name, measured, f"≥ {goal}", r["achieved_vs_allowed"] >= goal))
    return rows


def rows(results: dict[str, Any]) -> list[Row]:
    shapes = results.get("shapes", {})
    out = _iot(shapes)
    if r := shapes.get("routes"):
        out.append(
            (
                f"{r['routes']} routes, message matching the last one",
                f"{r['ratio']:.2f}× the 1-route rate ({r['many']['msg_per_s']:,} vs "
                f"{r['one']['msg_per_s']:,} msg/s); lost {r['lost']}",
                "≥ 0.8×",
                r["ratio"] >= 0.8,
            )
        )
    if r := shapes.get("qos0"):
        ours, mosq = r["ours-1"], r["mosquitto"]
        out.append(
            (
                f"QoS 0 flood, {r['messages']:,} messages",
                f"{100 * ours['delivered_ratio']:.1f} % delivered (dropped as full: "
                f"{ours['bridge_dropped']:.0f}); Mosquitto's bridge "
                f"{100 * mosq['delivered_ratio']:.1f} %",
                "100 % with the default policy",
                ours["unique"] == r["messages"],
            )
        )
    if r := shapes.get("archive"):
        best, req = r["runs"]
        s = r["settings"]
        out.append(
            (
                "`backup.s3.mode: required`",
                f"{r['required_vs_best_effort']:.2f}× best_effort ({req['msg_per_s']:,} vs "
                f"{best['msg_per_s']:,} msg/s at `max_inflight` {s['max_inflight']} / "
                f"`flush_interval` {s['flush_interval']:g} s, moto); lost {r['lost']}",
                "≥ 0.8× `best_effort` at the same settings",
                r["required_vs_best_effort"] >= 0.8,
            )
        )
    if r := shapes.get("bridge"):
        out.append(
            (
                "1 topic, 1 route, 1 connection, 200 B",
                f"{r['vs_in']:.2f}× Mosquitto's bridge as `in` on the target broker, "
                f"{r['vs_out']:.2f}× as `out` on the source broker ({r['ours-1']['msg_per_s']:,}"
                f" vs {r['mosquitto']['msg_per_s']:,} / {r['mosquitto-out']['msg_per_s']:,} "
                "msg/s)",
                "≥ 1.2× in both harness configurations",
                min(r["vs_in"], r["vs_out"]) >= 1.2,
            )
        )
    if r := shapes.get("latency"):
        a, m, mo = (
            r["added_ms"]["ours-1"],
            r["added_ms"]["mosquitto"],
            r["added_ms"]["mosquitto-out"],
        )
        ratios = [v for x in r["ratios"].values() for v in x.values()]
        out.append(
            (
                "added latency p50 over no bridge, at 50 % / 75 % of our max rate",
                f"{a['0.5']:.2f} ms / {a['0.75']:.2f} ms at {r['our_max'] / 2:,.0f} / "
                f"{r['our_max'] * 0.75:,.0f} msg/s ({_x(r['ratios']['mosquitto'])} Mosquitto's "
                f"bridge `in`: {m['0.5']:.2f} / {m['0.75']:.2f} ms; "
                f"{_x(r['ratios']['mosquitto-out'])} `out`: {mo['0.5']:.2f} / "
                f"{mo['0.75']:.2f} ms)",
                "≤ 1.5× Mosquitto's bridge at both",
                None if None in ratios else all(v <= 1.5 for v in ratios),
            )
        )
    if r := shapes.get("pacing"):
        out.append(
            (
                f"pacing as the broker sees it (rate {r['rate']:g}, burst {r['burst']:g})",
                f"at most {r['max_in_1s_window']} PUBLISH in any 1 s window on one connection "
                f"({r['connections']} connections offered {r['offered_rate']:g} msg/s)",
                "never above the configured limit in any 1 s window on the wire",
                r["max_in_1s_window"] <= r["rate"],
            )
        )
    return out


def _x(ratios: dict[str, float | None]) -> str:
    return " / ".join("–" if v is None else f"{v:.1f}×" for v in ratios.values())


def markdown(results: dict[str, Any]) -> list[str]:
    found = rows(results)
    if not found:
        return []
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
            "excluded); achieved: what the subscriber received in it; busiest / idlest ÷ "
            "mean: each target connection's `connection_published` over it; in flight: "
            "the worker's `inflight_messages` at the window's start and end (at "
            "`flow.max_inflight` the pool is the limit; well below it with the source broker "
            "near a core, the source broker is).",
            "",
            "| topics | offered msg/s | achieved msg/s | ÷ allowed | busiest ÷ mean "
            "| idlest ÷ mean | worker cores | source broker cores | in flight (2 scrapes) "
            "| lost | dup | order inv. |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (v for v in iot.values() if isinstance(v, dict)):
            lines.append(
                f"| {r['topics']:,} | {r['publish_rate']:,} | {r['achieved']:,} "
                f"| {r['achieved_vs_allowed']:.3f} | {r['busiest_vs_mean']} "
                f"| {r['idlest_vs_mean']} | {r['worker_cores']} | {r.get('source_broker_cores')} "
                f"| {' / '.join(map(str, r.get('worker_inflight', [])))} | {r['lost']} "
                f"| {r['duplicated']} | {r['out_of_order']} |"
            )
    return lines
