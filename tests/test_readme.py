"""README's quick start, run as written: every `python ...` line of its first bash block (the test command aside),
in a fresh folder, in order, each expected to succeed and to leave the files README says it writes. README cannot
drift from the code without this failing."""

import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_commands():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("python ") and "pytest" not in line]


def test_readme_quick_start_runs_as_written(tmp_path):
    commands = quick_start_commands()
    assert [shlex.split(c)[1] for c in commands] == ["sample.py", "sample.py", "sample.py", "train_t2i.py"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    for command in commands:
        argv = shlex.split(command)
        argv = [sys.executable, os.path.join(REPO, argv[1]), *argv[2:]]  # README's `python x.py` from the repo
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{command}\n{out.stderr[-2000:]}"
        if command == commands[0]:  # the line README quotes
            assert "wrote 1 sample(s), grid.png and samples.json to out" in out.stdout
    assert (tmp_path / "out" / "grid.png").exists() and (tmp_path / "out" / "samples.json").exists()
    assert (tmp_path / "out" / "from_json" / "samples.json").exists()
    # --from-json remakes sample 0 exactly
    first = sorted(p for p in (tmp_path / "out").glob("0000_*.png"))
    again = sorted(p for p in (tmp_path / "out" / "from_json").glob("0000_*.png"))
    assert first and again and first[0].read_bytes() == again[0].read_bytes()
    assert any(p.suffix == ".gif" for p in (tmp_path / "out-2").iterdir())
    assert {"samples.png", "oracle.json", "log.txt"} <= {p.name for p in (tmp_path / "runs" / "first").iterdir()}
