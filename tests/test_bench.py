"""bench.py runs on CPU as a smoke test (its FLOP formula is pinned in test_model.py)."""

import subprocess
import sys


def test_bench_cpu_smoke():
    out = subprocess.run([sys.executable, "bench.py", "--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1",
                          "--device", "cpu", "--resolution", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(("train", "sample"))}
    assert set(rows) == {"train", "sample"} and all(float(r[1]) > 0 for r in rows.values())  # samples/s > 0

