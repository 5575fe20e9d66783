"""A part that overruns its slot, for tests/test_benchmarks.py: it starts a child that
writes its pid to ``sys.argv[1]``, then both sleep far longer than any slot."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    code = f"import os, time; open({sys.argv[1]!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", code])
    while not Path(sys.argv[1]).exists():
        time.sleep(0.05)
    time.sleep(600)
