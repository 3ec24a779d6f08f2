"""Turn the benchmark's results into results.json, results.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench import summary
from bench.paths import PATHS


def _size(n: int) -> str:
    return f"{n // 1024} KB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _cell(results: dict[str, Any], path: str, qos: int, size: int) -> dict[str, Any] | None:
    for c in results["cells"]:
        if c["path"] == path and c["qos"] == qos and c["size"] == size:
            return c
    return None


def _ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    env = results["environment"]
    lines = [
        "# mqtt-bridge benchmark",
        "",
        f"{results['started']} · {env['cpus']} CPUs · Python {env['python']} · "
        f"{env['mosquitto']} · bridge {env['bridge_commit']} · "
        f"{s['messages']:,} messages per throughput run, median of {s['repeats']} · "
        f"{s['publishers']} C publishers (one topic each) · took {results.get('seconds', 0):.0f} s",
        "",
        "msg/s: delivered to the subscriber at full offered speed (median). "
        "Latency: publisher → subscriber at half that rate. CPU: CPU-seconds of the "
        "bridging processes per 100k delivered messages (our workers; for Mosquitto the "
        "bridging broker B, which also delivers to the subscriber), and of every broker + "
        "bridge process. RSS: peak resident set of one bridging process. lost: acknowledged "
        "by the source, never delivered (QoS 1; must be 0). dropped: QoS 0 that did not "
        "arrive (the bridge counts its own in `dropped_total{reason=full}`). order inv.: "
        "a message overtaken by a later one of its topic (expected across a share group). "
        "other load: the most CPU (in cores) that processes outside the benchmark used "
        "during any run of the row; above ~0.3 its figures are disturbed.",
        "",
        "| path | QoS | payload | msg/s | ÷ Mosquitto bridge | ÷ ceiling "
        "| latency p50 / p99 / p99.9 ms (at msg/s) | bridge CPU s/100k | all CPU s/100k "
        "| peak RSS MB | lost | dup | dropped | order inv. | other load |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for qos in s["qos"]:
        for size in s["sizes"]:
            ceiling = _cell(results, "direct", qos, size)
            mosq = _cell(results, "mosquitto", qos, size)
            for path in s["paths"]:
                c = _cell(results, path, qos, size)
                if c is None:
                    lines.append(f"| {PATHS[path]} | {qos} | {_size(size)} | error |" + " |" * 11)
                    continue
                lat = c.get("latency", {})
                latency = (
                    f"{_num(lat.get('p50_ms'))} / {_num(lat.get('p99_ms'))} / "
                    f"{_num(lat.get('p999_ms'))} (@ {_num(round(lat.get('offered_rate') or 0))})"
                )
                cpu = c["cpu_bridge_per_100k"] if path != "direct" else None
                lines.append(
                    f"| {PATHS[path]} | {qos} | {_size(size)} | **{_num(c['msg_per_s'])}** "
                    f"| {_ratio(c['msg_per_s'], mosq and mosq['msg_per_s'])} "
                    f"| {_ratio(c['msg_per_s'], ceiling and ceiling['msg_per_s'])} "
                    f"| {latency} | {_num(cpu)} | {_num(c['cpu_system_per_100k'])} "
                    f"| {_num(c['peak_rss_mb'], 1)} | {c['lost']} | {c['duplicated']} "
                    f"| {c['not_delivered'] if qos == 0 else 0} | {c['out_of_order']} "
                    f"| {_num(c.get('foreign_cores_max'))} |"
                )
    lines += _ratios(results)
    lines += summary.markdown(results)
    lines += _generator(results)
    lines += _memory(results.get("memory"))
    lines += _profile(results.get("profile"))
    if results["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {e['where']}: `{e['error'][:500]}`" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def _ratios(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    ours = [p for p in ("ours-1", "ours-2") if p in s["paths"]]
    if "mosquitto" not in s["paths"] or not ours:
        return []
    lines = [
        "",
        "## Ours ÷ Mosquitto's bridge",
        "",
        "Throughput (higher is better); CPU per message and latency p50/p99 (lower is "
        "better). Bridge CPU compares our workers with broker B (bridge + broker work); "
        "all CPU compares every broker and bridge process of the two paths.",
        "",
        "| ours | QoS | payload | msg/s ratio | bridge CPU/msg ratio | all CPU/msg ratio "
        "| p50 ratio | p99 ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for path in ours:
        for qos in s["qos"]:
            for size in s["sizes"]:
                c, m = _cell(results, path, qos, size), _cell(results, "mosquitto", qos, size)
                if not c or not m:
                    continue
                cl, ml = c.get("latency", {}), m.get("latency", {})
                lines.append(
                    f"| {PATHS[path]} | {qos} | {_size(size)} "
                    f"| {_ratio(c['msg_per_s'], m['msg_per_s'])} "
                    f"| {_ratio(c['cpu_bridge_per_100k'], m['cpu_bridge_per_100k'])} "
                    f"| {_ratio(c['cpu_system_per_100k'], m['cpu_system_per_100k'])} "
                    f"| {_ratio(cl.get('p50_ms'), ml.get('p50_ms'))} "
                    f"| {_ratio(cl.get('p99_ms'), ml.get('p99_ms'))} |"
                )
    return lines


def _generator(results: dict[str, Any]) -> list[str]:
    if not results["generator"]:
        return []
    lines = [
        "",
        "## The load generator alone",
        "",
        "The same publishers into a broker with no subscriber. The generator is not the "
        "bottleneck where it publishes faster than the fastest bridge path measured.",
        "",
        "| QoS | payload | generator msg/s | fastest bridge path msg/s | headroom |",
        "|---|---|---:|---:|---:|",
    ]
    for g in results["generator"]:
        bridged = [
            c["msg_per_s"]
            for c in results["cells"]
            if c["qos"] == g["qos"] and c["size"] == g["size"] and c["path"] != "direct"
        ]
        best = max(bridged, default=0)
        lines.append(
            f"| {g['qos']} | {_size(g['size'])} | {_num(g['msg_per_s'])} | {_num(best)} "
            f"| {_ratio(g['msg_per_s'], best)}× |"
        )
    return lines


def _memory(m: dict[str, Any] | None) -> list[str]:
    if not m:
        return []
    return [
        "",
        "## Memory: target down, backlog offered",
        "",
        f"{m['messages']:,} QoS 1 messages of {m['payload']} B published to the source while "
        f"the target broker was stopped (offered at {m['offer_rate']:,} msg/s, every one "
        f"acknowledged by the source: {m['publish_ok']}); one worker, "
        f"`flow.max_inflight` {m['max_inflight']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| worker RSS at start | {m['worker_rss_baseline_mb']} MB |",
        f"| worker RSS peak while the target was down | {m['worker_rss_max_while_down_mb']} MB |",
        f"| worker RSS peak over the whole scenario | {m['worker_rss_max_mb']} MB |",
        f"| messages in flight in the worker while down | {_num(m['inflight_while_down'], 0)} |",
        f"| source broker RSS peak (holds the backlog) | {m['source_broker_rss_max_mb']} MB |",
        f"| delivered after the target returned | {m['unique']:,} in {m['drain_seconds']} s "
        f"({m['drain_rate']:,} msg/s) |",
        f"| lost | {m['lost']} |",
        f"| duplicated | {m['duplicated']} |",
        "",
        "Timeline: `memory.png`.",
    ]


def _profile(p: dict[str, Any] | None) -> list[str]:
    if not p or "top" not in p:
        return []
    lines = [
        "",
        "## Profile of one worker (py-spy)",
        "",
        f"{p['samples']:,} samples over {p['seconds']} s at {p['load']}. "
        "self: samples in the function itself; total: with its callees. "
        "Collapsed stacks: `profile.txt`.",
        "",
        "| function | self % | total % |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{f['function']}` | {f['self_pct']} | {f['total_pct']} |" for f in p["top"]]
    return lines


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    combos = [(q, z) for q in s["qos"] for z in s["sizes"]]
    names = list(s["paths"])
    colors = {
        "direct": "#999999",
        "mosquitto": "#4c72b0",
        "mosquitto-out": "#8172b3",
        "ours-1": "#dd8452",
        "ours-2": "#55a868",
    }
    written = []

    def bars(key: str, title: str, ylabel: str, fname: str, skip: tuple[str, ...] = ()) -> None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        shown = [p for p in names if p not in skip]
        width = 0.8 / max(1, len(shown))
        for i, path in enumerate(shown):
            values = []
            for q, z in combos:
                c = _cell(results, path, q, z)
                values.append(c[key] if c else 0)
            xs = [j + i * width for j in range(len(combos))]
            rects = ax.bar(xs, values, width, label=PATHS[path], color=colors.get(path))
            ax.bar_label(rects, fmt="{:,.0f}" if key == "msg_per_s" else "{:.2f}", fontsize=7)
        ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(combos))])
        ax.set_xticklabels([f"QoS {q}, {_size(z)}" for q, z in combos])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if shown:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    bars("msg_per_s", "Throughput (median, higher is better)", "messages / s", "throughput.png")
    bars(
        "cpu_bridge_per_100k",
        "CPU-seconds of the bridging processes per 100k messages (lower is better)",
        "CPU s / 100k msgs",
        "cpu.png",
        skip=("direct",),
    )

    fig, axes = plt.subplots(1, len(combos), figsize=(4 * len(combos), 4), squeeze=False)
    for ax, (q, z) in zip(axes[0], combos, strict=True):
        for path in names:
            c = _cell(results, path, q, z)
            qs = (c or {}).get("latency", {}).get("quantiles_ms")
            if not qs:
                continue
            ax.plot(qs, [i / 2 for i in range(len(qs))], label=PATHS[path], color=colors[path])
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency, ms (log)")
        ax.set_title(f"QoS {q}, {_size(z)} at half max rate", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("% of messages at or below")
    if axes[0][0].get_legend_handles_labels()[0]:  # no cells: a shapes-only run
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    written.append("latency.png")

    m = results.get("memory")
    if m and m.get("timeline"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        tl = m["timeline"]
        for key, color in (("worker", colors["ours-1"]), ("source broker", colors["mosquitto"])):
            pts = [(r["t"], r[key]) for r in tl if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"{key} RSS", color=color)
        events = {what: t for t, what in m["events"]}
        down, back = events.get("target stopped"), events.get("target back")
        if down is not None and back is not None:
            ax.axvspan(down, back, color="#d62728", alpha=0.08, label="target broker down")
        for t, what in m["events"]:
            if what in ("target stopped", "offering"):
                continue
            ax.axvline(t, color="#777777", linestyle=":", linewidth=1)
            ax.annotate(
                what, (t, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=7
            )
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS, MB")
        ax.set_title(
            f"Memory: {m['messages']:,} messages offered while the target is down "
            f"(lost {m['lost']})"
        )
        ax.legend(fontsize=8, loc="center left")
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)
        written.append("memory.png")
    return written


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        results["plots"] = plots(results, out)
    except ImportError as exc:
        results["plots"] = []
        results["errors"].append({"where": "plots", "error": f"{exc} (pip install -e .[bench])"})
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
