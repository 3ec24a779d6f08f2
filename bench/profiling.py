"""py-spy on one worker while it bridges QoS 1, 200-byte messages at full speed.

Writes ``profile.txt`` (py-spy's collapsed stacks: ``frame;frame;… count``) and returns
the top functions by self and total samples, so the hot spots in ``bridge/`` can be
read without a viewer (``flamegraph.pl`` or https://speedscope.app read the file too).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench import load
from bench.paths import open_path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _key(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``file.py:func``, shortened to the package path."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("/bridge/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = (
                path.split(marker, 1)[1]
                if marker != "/bridge/"
                else "bridge/" + path.split(marker, 1)[1]
            )
            break
    return f"{path}:{m['func']}"


def summarize(text: str, top: int = 20) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _key(f)
            for f in stack.split(";")
            if not f.startswith(("process ", "thread ")) and "(" in f
        ]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for key in set(frames):
            total_counts[key] += count

    def pct(n: int) -> float:
        return round(100.0 * n / samples, 1) if samples else 0.0

    rows = [
        {"function": k, "self_pct": pct(v), "total_pct": pct(total_counts[k])}
        for k, v in self_counts.most_common(top)
    ]
    ours = sorted(
        ((k, v) for k, v in total_counts.items() if k.startswith("bridge/")),
        key=lambda kv: -kv[1],
    )[:top]
    return {
        "samples": samples,
        "top": rows,
        "bridge_by_total": [
            {"function": k, "self_pct": pct(self_counts[k]), "total_pct": pct(v)} for k, v in ours
        ],
    }


def run(bench: Any, s: Any, spy: str, log: Callable[[str], None]) -> dict[str, Any]:
    seconds = s.profile_seconds
    count = int(seconds * 25_000)  # more than one worker can take in that time
    out = s.out / "profile.txt"
    with open_path("ours-1", 1, bench.wd / "profile", s.max_inflight) as path:
        k, tag = bench.next_tag()
        topics = [f"bench/r{k}/t{i}" for i in range(s.publishers)]
        counts = load.spread(count, s.publishers)
        files = bench.files(200, counts)
        sub_out = bench.wd / f"{tag}.out"
        sub = load.Subscriber(bench.procs, path.target_port, f"out/bench/r{k}/#", 1, sub_out, tag)
        try:
            sub.wait_path(path.source_port, f"bench/r{k}/probe", 1, timeout=20)
            pid = path.bridge[0].pid
            cmd = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
            cmd += ["--duration", str(int(seconds)), "--output", str(out), "--nonblocking"]
            spy_proc = bench.procs.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            pub = load.publish_files(
                bench.procs, path.source_port, topics, files, counts, 1, tag, 120 + count / 500
            )
            sub.wait_bytes(count * (200 + load.LINE_OVERHEAD), s.stall, 120 + count / 500, None)
            try:
                spy_proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
            err = spy_proc.stderr.read().decode(errors="replace") if spy_proc.stderr else ""
        finally:
            sub.stop()
        d = load.account(sub_out, counts, stamped=False)
        sub_out.unlink(missing_ok=True)
    if not out.exists():
        log(f"profile: py-spy wrote nothing: {err.strip()[-300:]}")
        return {"skipped": err.strip()[-300:]}
    summary = summarize(out.read_text())
    rate = round(d.unique / max(1e-9, d.last_recv - pub.started)) if d.unique else 0
    summary |= {"seconds": seconds, "load": f"QoS 1, 200 B, {rate:,} msg/s", "lost": d.lost}
    log(f"profile: {summary['samples']} samples at {rate} msg/s; top self:")
    for row in summary["top"][:10]:
        log(f"  {row['self_pct']:5.1f}% self {row['total_pct']:5.1f}% total  {row['function']}")
    return summary
