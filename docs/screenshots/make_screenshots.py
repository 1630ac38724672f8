"""Regenerate the dashboard screenshots in this folder.

Runs the dashboard's browser test (tests/fleet_manager/test_dashboard.py), which drives a real Chromium
through every page against a real broker and a simulated fleet, with EDGEFLEET_SCREENSHOT_DIR pointing
here. From the repository root, with the dev install (`make install`) and Chromium (`make chromium`):

    .venv/bin/python docs/screenshots/make_screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEST = "tests/fleet_manager/test_dashboard.py"


def main() -> int:
    env = {**os.environ, "EDGEFLEET_SCREENSHOT_DIR": str(HERE)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST, "-k", "chromium"]
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code == 0:
        for png in sorted(HERE.glob("*.png")):
            print(f"{png.relative_to(ROOT)}  {png.stat().st_size // 1024} KiB")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
