"""bench/gpu_check.py is the one prepared run for a lent GPU, which few sessions get: its checks must
not rot between them. Its --cpu-smoke runs every check that does not need CUDA at tiny sizes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_passes_its_cpu_smoke_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = done.stdout + done.stderr
    failures = [line for line in report.splitlines() if "FAIL" in line]
    assert done.returncode == 0, "\n".join(failures) or report[-3000:]
    assert "all checks passed" in report
