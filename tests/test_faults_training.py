"""Faults in training runs (CPU): preemption (SIGTERM, Ctrl-C) stops every rank at one step with a checkpoint and
--resume continues it exactly; contradicting flags are refused or told truthfully; a resumed run's log.txt holds
each step once, in order."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import fsdp
import train_t2i
import train_t2v
from test_train import REPO, _free_port, tiny


def logged(out):
    """log.txt's steps, losses and grad norms (the samples/s, MFU and memory columns vary between runs)."""
    with open(os.path.join(out, "log.txt")) as f:
        return [" | ".join(line.split(" | ")[:3]) for line in f]


def signalled_run(out, steps, signum, after_step, *extra):
    """train_t2i.py as a subprocess, sent `signum` once it has logged `after_step`: (rc, stdout, stderr)."""
    cmd = [sys.executable, "-u", "train_t2i.py", *tiny(out, steps, "--ckpt-every", "100", *extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(f"step {after_step} |"):
            p.send_signal(signum)
            break
    stdout, stderr = p.communicate(timeout=120)
    return p.returncode, "".join(lines) + stdout, stderr


# -----------------------------------------------------------------------------
# preemption


def test_sigterm_stops_with_a_checkpoint_and_resume_repeats_the_uninterrupted_run(tmp_path):
    rc, stdout, stderr = signalled_run(tmp_path / "cut", 12, signal.SIGTERM, after_step=2)
    # 143 = 128 + SIGTERM: a scheduler sees an unfinished run (fsdp.exit_status); one line says where it stopped
    assert rc == 143 and "Traceback" not in stderr, stderr[-2000:]
    stopped = [name for name in os.listdir(tmp_path / "cut") if name.startswith("ckpt-")]
    assert len(stopped) == 1, stopped  # --ckpt-every 100 would have written none before step 12
    k = int(stopped[0][5:12])
    assert 2 <= k < 12
    assert stdout.splitlines()[-1] == (f"SIGTERM: stopped at step {k} of 12 with {tmp_path / 'cut'}/{stopped[0]}; "
                                       "--resume continues")
    assert not os.path.exists(tmp_path / "cut" / "samples.png")
    train_t2i.main(tiny(tmp_path / "cut", 12, "--ckpt-every", "100", "--resume"))
    train_t2i.main(tiny(tmp_path / "full", 12, "--ckpt-every", "100"))
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")  # steps 1..12, once each, the same losses


def test_ctrl_c_stops_with_one_line_and_no_traceback(tmp_path):
    rc, stdout, stderr = signalled_run(tmp_path, 12, signal.SIGINT, after_step=2)
    assert rc == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    last = stdout.splitlines()[-1]
    assert last.startswith("SIGINT: stopped at step ") and last.endswith("; --resume continues"), stdout[-2000:]


def _signalled_worker(rank, world, port, argv, out_json):
    """One rank of a 2-rank run in which only rank 1 gets SIGTERM, during step 2."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    lr_at = train_t2i.lr_at
    def lr_and_signal(args, step):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(args, step)
    train_t2i.lr_at = lr_and_signal
    try:
        train_t2i.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    with open(f"{out_json}.{rank}", "w") as f:
        json.dump(code, f)


def test_ranks_agree_on_the_stopping_step(tmp_path):
    # rank 0 never sees the signal: it stops at the same check step as rank 1 (an all-reduce), and both exit 143
    argv = tiny(tmp_path / "two", 30, "--batch-size", "8", "--log-every", "4", "--ckpt-every", "0")
    mp.spawn(_signalled_worker, args=(2, _free_port(), argv, str(tmp_path / "rc")), nprocs=2)
    assert [json.load(open(tmp_path / f"rc.{r}")) for r in (0, 1)] == [143, 143]
    # the first check after step 2
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt-0000004", "log.txt", "metrics.jsonl"]


def test_a_second_signal_exits_at_once_and_set_up_is_not_deferred(monkeypatch, capfd):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # what the handler would end the process with
    stop = fsdp.StopSignals()
    stop.handle(signal.SIGINT, None)  # during the set-up: nothing trained yet, nothing to save
    assert exits == [130] and capfd.readouterr().err == "SIGINT during the set-up: exited before training\n"
    stop, exits[:] = fsdp.StopSignals(), []
    stop.phase = "training"
    stop.handle(signal.SIGTERM, None)
    stop.handle(signal.SIGTERM, None)  # the same request twice at once (torchrun passes signals on): no exit
    assert stop.signum == signal.SIGTERM and exits == []
    stop.at -= stop.SAME
    stop.handle(signal.SIGTERM, None)
    assert exits == [143] and "SIGTERM again: exited at once" in capfd.readouterr().err


# -----------------------------------------------------------------------------
# contradictions


def test_resume_with_init_from_says_which_one_it_used(tmp_path, capsys):
    train_t2i.main(tiny(tmp_path / "parent", 2))
    # the script a requeued job runs every time: the first start takes --init-from, later ones the checkpoint
    argv = lambda steps: tiny(tmp_path / "child", steps, "--resume", "--init-from", str(tmp_path / "parent"))
    capsys.readouterr()
    train_t2i.main(argv(2))
    out = capsys.readouterr().out
    assert "scratch" not in out and f"no checkpoint in {tmp_path / 'child'}; starting from --init-from" in out
    train_t2i.main(argv(3))
    assert f"(--init-from {tmp_path / 'parent'} counts only before the first checkpoint)" in capsys.readouterr().out


def test_t2v_refuses_init_from_with_from_scratch(tmp_path):
    with pytest.raises(ValueError, match="--init-from x.pt and --from-scratch contradict each other"):
        train_t2v.main(["--init-from", "x.pt", "--from-scratch", "--out", str(tmp_path)])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("num_samples, eval_n", [(0, 0), (0, 1)])
def test_toy_banner_promises_only_what_the_run_writes(tmp_path, capsys, num_samples, eval_n):
    train_t2i.main(["--max-steps", "1", "--batch-size", "4", "--sample-steps", "2", "--device", "cpu",
                    "--num-samples", str(num_samples), "--eval-n", str(eval_n), "--out", str(tmp_path)])
    banner = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("toy run on the CPU"))
    assert ("samples.png" in banner) == os.path.exists(tmp_path / "samples.png") == bool(num_samples)
    assert ("oracle scores" in banner) == os.path.exists(tmp_path / "oracle.json") == bool(eval_n)


def test_resuming_an_older_checkpoint_cuts_the_log_to_its_step(tmp_path, capsys):
    train_t2i.main(tiny(tmp_path, 4, "--ckpt-every", "2", "--keep", "0"))
    before = logged(tmp_path)
    shutil.rmtree(tmp_path / "ckpt-0000004")  # as if the newest checkpoint were lost: --resume takes step 2's
    train_t2i.main(tiny(tmp_path, 4, "--ckpt-every", "2", "--resume"))
    assert f"{tmp_path}/log.txt: dropped 2 line(s) past step 2" in capsys.readouterr().out
    assert logged(tmp_path) == before  # steps 1..4, once each, in order, as the run before
    assert [line.split(" |")[0] for line in before] == [f"step {k}" for k in range(1, 5)]


def test_truncate_log_keeps_whole_lines_up_to_the_step(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("step 1 | a\nstep 2 | b\nstep 3 | c\nstep 2 | d\nstep 3 | e\nstep 4 | f\nstep 5 | cut sho")
    assert checkpoint.truncate_log(str(path), 2) == 5 and path.read_text() == "step 1 | a\nstep 2 | b\n"
    assert checkpoint.truncate_log(str(path), 2) == 0 and path.read_text() == "step 1 | a\nstep 2 | b\n"
    path.write_text("step 1 | a\nstep 2 | cut sho")  # a line a kill cut short goes, whatever its step
    assert checkpoint.truncate_log(str(path), 5) == 1 and path.read_text() == "step 1 | a\n"
    assert checkpoint.truncate_log(str(tmp_path / "none.txt"), 3) == 0 and not (tmp_path / "none.txt").exists()


def test_a_run_over_bad_files_reports_their_count_once_per_epoch(tmp_path, capsys):
    """A folder of 3 readable and 3 unreadable images (truncated PNG, text named .jpg, zero bytes), 4 images a step:
    each step is a new epoch, and each epoch's line gives the exact total, 3."""
    from test_data import _folder_with_bad_files
    import warnings

    (tmp_path / "imgs").mkdir()
    _folder_with_bad_files(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dataset's own warning at the 1st bad file
        train_t2i.main(tiny(tmp_path / "run", 3, "--data", str(tmp_path / "imgs"), "--resolution", "32",
                            "--latent-space", "pixel", "--num-workers", "0"))
    out = capsys.readouterr().out
    for epoch in (0, 1):
        assert out.count(f"epoch {epoch}: 3 unreadable file(s) skipped so far") == 1, out
