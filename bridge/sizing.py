"""Sizing rules: settings that are valid one by one but cap the worker when combined.

Pure functions of a loaded configuration; `check` prints what they find as warnings
(``--strict`` makes them errors) and `run` logs them at start. README "Sizing" explains
each rule.
"""

from __future__ import annotations

from bridge.config import BridgeConfig


def target_windows(cfg: BridgeConfig) -> int | None:
    """Messages the target connections can hold unacknowledged together (None: unbounded)."""
    window = cfg.target.limits.inflight
    return None if window is None else cfg.target.connections * window


def sizing_problems(cfg: BridgeConfig) -> list[str]:
    problems = []
    flow = cfg.flow.max_inflight
    windows = target_windows(cfg)
    if windows is not None and flow < windows:
        problems.append(
            f"flow.max_inflight {flow} < target.connections {cfg.target.connections} × "
            f"limits.inflight {cfg.target.limits.inflight} = {windows}: the target "
            f"connections can never all be busy; set flow.max_inflight to at least {windows}"
        )
    s3 = cfg.backup.s3
    if s3 is not None and s3.mode == "required" and windows is not None and flow < 2 * windows:
        # Messages wait for S3 after the target answered them: the same bound has to hold
        # the target windows and the batches being written.
        problems.append(
            f"backup.s3.mode required with flow.max_inflight {flow} < 2 × {windows} (the "
            f"target windows): the archive's batches and the target compete for the same "
            f"bound; set flow.max_inflight to at least {2 * windows}"
        )
    return problems
