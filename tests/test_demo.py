"""`make demo DEMO_ARGS=--keep`: the demo keeps its worker configs and logs and says where."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT


def test_demo_keeps_its_configs_and_prints_where() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.demo", "--seconds", "1", "--rate", "100",
         "--command-rate", "20", "--keep"],
        capture_output=True, text=True, timeout=170, check=False, cwd=ROOT,
    )  # fmt: skip
    kept = re.search(r"^kept in (\S+):$", done.stdout, re.MULTILINE)
    assert kept, done.stdout + done.stderr
    where = Path(kept[1])
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "lost = 0" in done.stdout
        configs = [where / f"{name}.yaml" for name in ("dtb-0", "dtb-1", "btd-0")]
        for config in configs:
            assert config.is_file()
            assert str(config) in done.stdout
            assert config.with_suffix(".log").is_file()
        check = subprocess.run(
            [sys.executable, "-m", "bridge", "check", "-q", "--config", *map(str, configs)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert (check.returncode, check.stderr) == (0, "")
    finally:
        shutil.rmtree(where, ignore_errors=True)
