"""Faults and bad input (CPU, ~30 s): checkpoints whose bytes changed on the disk, folders of junk, a full disk
and an output folder that cannot be written. Each ends in one line, and a corrupt newest checkpoint is skipped
for the newest one that verifies."""
import argparse
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import types

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest
import torch
import torch.distributed.checkpoint as dcp

import checkpoint
import evaluate
import sample
import train_t2i
from model import make_config


def tiny(out, steps, *extra):
    """argv of a tiny run: GenTron-tiny on shapes, 4 images per step, no sample grid, no oracle scores."""
    return ["--size", "tiny", "--batch-size", "4", "--max-steps", str(steps), "--log-every", "1",
            "--num-samples", "0", "--eval-n", "0", "--device", "cpu", "--lr", "1e-3", "--out", str(out), *extra]


def overwrite(folder, name, values):
    """Overwrite the bytes of tensor `name` ("model.blocks.0.attn.qkv.weight") inside a checkpoint folder's shard
    file, in place, with values of its dtype: the damage a bad disk or copy does, which no reader notices."""
    key, param = name.split(".", 1)
    t = checkpoint.read_sharded(str(folder), (key,))[key][param]
    path = folder / "__0_0.distcp"
    data = open(path, "rb").read()
    at = data.index(t.numpy().tobytes())  # where DCP put its bytes (only there: asserted)
    assert data.find(t.numpy().tobytes(), at + 1) == -1
    new = values(t).to(t.dtype).numpy().tobytes()
    assert len(new) == t.nbytes and new != t.numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(new)


def single_file(folder, path, sums=True):
    """A checkpoint folder rewritten as one .pt file, the format single-file checkpoints have."""
    ckpt = checkpoint.load_checkpoint(str(folder))
    if sums:
        ckpt["checksums"] = checkpoint.checksums(ckpt)
    torch.save(ckpt, path)
    return ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4, and its per-step losses."""
    out = tmp_path_factory.mktemp("run") / "a"
    losses = train_t2i.main(tiny(out, 4, "--ckpt-every", "2", "--keep", "0"))["loss"]
    return out, losses


# -----------------------------------------------------------------------------
# checksums


def test_every_file_has_a_checksum_and_the_state_stays_plain(run):
    folder = run[0] / "ckpt-0000004"
    sums = json.load(open(folder / "checksums.json"))
    assert set(sums) == set(os.listdir(folder)) - {"checksums.json"} == {".metadata", "__0_0.distcp", "state.pt"}
    assert all(s == [os.path.getsize(folder / f), checkpoint.file_crc(folder / f)] for f, s in sums.items())
    state = torch.load(folder / "state.pt", weights_only=True)  # plain types only
    assert state["step"] == 4 and state["data"] == {"epoch": 0, "offset": 16} and "torch" in state["rng"]
    # a real hash: swapping two values (the same sum) or a sign flip changes it
    t = checkpoint.read_sharded(str(folder), ("model",))["model"]["blocks.0.attn.qkv.weight"]
    swapped = t.flatten().clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checkpoint.crc(swapped.view_as(t)) != checkpoint.crc(t) != checkpoint.crc(-t)
    assert checkpoint.crc(t.bfloat16()) == checkpoint.crc(t.bfloat16().clone())  # any dtype (bf16 has no numpy)


@pytest.mark.parametrize("garbage", ["finite", "nan"])
def test_a_corrupt_newest_checkpoint_is_skipped_by_resume_and_the_nan_guard(run, tmp_path, capsys, garbage):
    """Finite garbage would train on silently, and NaNs be named "last good checkpoint" by the NaN guard: --resume
    says in one line that the newest is corrupt, continues from the one before exactly as the uninterrupted run
    did, and moves or deletes nothing; the NaN guard names the checkpoint that verifies."""
    out = tmp_path / "a"
    out.mkdir()
    for name in ("ckpt-0000002", "ckpt-0000004"):
        shutil.copytree(run[0] / name, out / name)
    newest = out / "ckpt-0000004"
    values = (lambda t: torch.rand_like(t.float()) - 0.5) if garbage == "finite" else (lambda t: torch.full_like(t, float("nan")))
    overwrite(newest, "model.blocks.0.attn.qkv.weight", values)
    damaged = (newest / "__0_0.distcp").read_bytes()
    with pytest.raises(ValueError, match=r"ckpt-0000004 is corrupt: the bytes of __0_0.distcp are not those written"):
        checkpoint.load_checkpoint(str(newest))
    capsys.readouterr()

    # resume to step 3: starts from step 2, with the uninterrupted run's step-3 loss; the corrupt one stays as it was
    losses = train_t2i.main(tiny(out, 3, "--ckpt-every", "2", "--keep", "1", "--resume"))["loss"]
    said = capsys.readouterr().out.splitlines()
    skip = [line for line in said if "ckpt-0000004" in line]
    assert len(skip) == 1 and skip[0].startswith("--resume: skipping ") and "is corrupt" in skip[0]
    assert any(line.endswith("ckpt-0000002 at step 2") for line in said)
    assert losses == run[1][2:3]  # bit for bit
    # --keep 1 removed ckpt-2 (older than the new ckpt-3) but left the corrupt later one alone
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-0000003", "ckpt-0000004", "log.txt", "metrics.jsonl"]
    assert (newest / "__0_0.distcp").read_bytes() == damaged

    # a NaN loss at step 4 names ckpt-3, the newest that verifies, not the corrupt ckpt-4
    with pytest.raises(SystemExit, match=r"non-finite loss .* Last good checkpoint: .*ckpt-0000003$"):
        train_t2i.main(tiny(out, 4, "--resume", "--debug-nan-at-step", "4"))
    # sample.py and evaluate.py take a run folder's newest good checkpoint too, and say which they skipped
    model, meta = sample.load_model(str(out), fast=False)
    assert meta["step"] == 3 and "--ckpt: skipping" in capsys.readouterr().out


def test_an_unfinished_checkpoint_folder_is_skipped_and_a_killed_write_removed(run, tmp_path, capsys):
    """A folder without its checksums.json (a copy cut short) is skipped by --resume; a ckpt-NNNNNNN.tmp folder (a
    write killed midway, never renamed) is deleted when the next run starts."""
    out = tmp_path / "a"
    shutil.copytree(run[0], out)
    os.remove(out / "ckpt-0000004" / "checksums.json")
    shutil.copytree(run[0] / "ckpt-0000002", out / "ckpt-0000005.tmp")
    losses = train_t2i.main(tiny(out, 3, "--ckpt-every", "0", "--keep", "0", "--resume"))["loss"]
    assert losses == run[1][2:3] and not (out / "ckpt-0000005.tmp").exists()
    assert "ckpt-0000004 is incomplete or damaged: no readable checksums.json" in capsys.readouterr().out


class RunsCode:
    """What a crafted .metadata can hold: an object whose unpickling calls a function (here a harmless one)."""
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_index_that_would_run_code_is_refused(run, tmp_path, capsys):
    """DCP unpickles .metadata without restriction; a folder whose index names anything but DCP's own classes is
    refused before DCP reads it (its checksums rewritten to match: they guard against damage, not intent)."""
    out = tmp_path / "a"
    shutil.copytree(run[0], out)
    folder = out / "ckpt-0000004"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    sums = json.load(open(folder / "checksums.json"))
    sums[".metadata"] = [os.path.getsize(folder / ".metadata"), checkpoint.file_crc(folder / ".metadata")]
    json.dump(sums, open(folder / "checksums.json", "w"))
    with pytest.raises(ValueError, match=r"ckpt-0000004/.metadata is not a checkpoint index \(UnpicklingError: "
                                         r"posix.getcwd is not part of a checkpoint's index\)"):
        checkpoint.load_checkpoint(str(folder))
    assert train_t2i.main(tiny(out, 3, "--ckpt-every", "0", "--keep", "0", "--resume"))["loss"] == run[1][2:3]
    assert "--resume: skipping " in capsys.readouterr().out


def test_single_file_checkpoints_resume_and_without_checksums_still_load_and_nan_weights_are_refused(run, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    single_file(run[0] / "ckpt-0000002", out / "ckpt-0000002.pt")
    assert train_t2i.main(tiny(out, 4, "--ckpt-every", "2", "--resume"))["loss"] == run[1][2:]  # bit for bit
    assert sorted(os.listdir(out))[:2] == ["ckpt-0000002.pt", "ckpt-0000004"]  # continues in folders
    ckpt = single_file(run[0] / "ckpt-0000002", tmp_path / "ckpt-0000002.pt", sums=False)  # as before checksums
    assert checkpoint.load_pt(str(tmp_path / "ckpt-0000002.pt"))["step"] == 2
    ckpt["ema"]["blocks.0.attn.qkv.bias"][0] = float("nan")
    torch.save(ckpt, tmp_path / "ckpt-0000004.pt")
    with pytest.raises(ValueError, match=r"ckpt-0000004.pt is corrupt: ema.blocks.0.attn.qkv.bias holds NaN or inf"):
        checkpoint.load_pt(str(tmp_path / "ckpt-0000004.pt"))
    assert checkpoint.newest_good(checkpoint.checkpoints(tmp_path), say=lambda line: None)[0].endswith("2.pt")
    assert checkpoint.last_good_checkpoint(str(tmp_path)).endswith("ckpt-0000002.pt")


# -----------------------------------------------------------------------------
# junk, unwritable folders, full disks

JUNK = {"hello": b"hello world\n",  # pickle opcode 'h' then 'e': torch raised KeyError: 101
        "random": bytes(range(256)) * 20, "empty": b"", "json": b'{"model": 1}',
        "zip": b"PK\x03\x04" + bytes(100)}


def test_junk_checkpoints_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i, data in enumerate(JUNK.values()):
        (junk / f"ckpt-{i:07d}.pt").write_bytes(data)
        with pytest.raises(ValueError, match="is not a readable GenTron checkpoint") as e:
            checkpoint.load_pt(str(junk / f"ckpt-{i:07d}.pt"))
        assert "\n" not in str(e.value)
    (junk / "ckpt-0000009").mkdir()  # a folder of junk: no checksums.json, or a state.pt that is not one
    with pytest.raises(ValueError, match=r"ckpt-0000009 is incomplete or damaged: no readable checksums.json"):
        checkpoint.load_checkpoint(str(junk / "ckpt-0000009"))
    (junk / "ckpt-0000009" / "state.pt").write_bytes(JUNK["zip"])
    (junk / "ckpt-0000009" / "checksums.json").write_text(json.dumps({"state.pt": [104, checkpoint.file_crc(junk / "ckpt-0000009" / "state.pt")]}))
    with pytest.raises(ValueError, match=r"ckpt-0000009 is not a readable GenTron checkpoint"):
        checkpoint.load_checkpoint(str(junk / "ckpt-0000009"))
    shutil.rmtree(junk / "ckpt-0000009")
    (junk / "notes.txt").write_bytes(JUNK["hello"])
    with pytest.raises(ValueError, match=r"none of the 5 checkpoint\(s\) in .*junk reads and verifies") as e:
        sample.main(["a red circle", "--ckpt", str(junk), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"ckpt-0000000.pt is not a readable GenTron checkpoint \(KeyError: 101\)"):
        evaluate.main(["--oracle", "--ckpt", str(junk / "ckpt-0000000.pt"), "--json", str(tmp_path / "s.json")])


def test_the_command_lines_print_one_line(tmp_path):
    """As a user sees it: a junk folder and an unwritable --out through sample.py's entry point, one line each."""
    (tmp_path / "ckpt-0000001.pt").write_bytes(JUNK["hello"])
    for argv in (["sample.py", "x", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")],
                 ["sample.py", "x", "--out", "/proc/x"]):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), (argv, r.stderr)


def test_an_unwritable_output_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking the output folder")
    monkeypatch.setattr(sample, "load_model", no_loading)
    (tmp_path / "file").write_text("")
    for out, cause in [("/proc/x", r"cannot write there \(No such file or directory: /proc/x\)"),
                       (str(tmp_path / "file" / "x"), "is a file, not a folder")]:
        with pytest.raises(ValueError, match=f"--out {out}: .*{cause}"):
            sample.main(["a red circle", "--out", out, "--device", "cpu"])
    with pytest.raises(ValueError, match="--json /proc/x: cannot write there"):
        evaluate.main(["--oracle", "--json", "/proc/x/scores.json"])
    # a folder that does not exist yet passes the check and is not left behind by it
    checkpoint.check_writable(str(tmp_path / "new" / "deeper"))
    assert sorted(os.listdir(tmp_path)) == ["file"]


SAVE_ARGS = """
import argparse, torch, torch.distributed as dist
from model import make_config
if not dist.is_initialized():  # save_checkpoint is a collective: a 1-process group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cfg = make_config("tiny", in_channels=3, input_size=16, text_dim=128, pooled_dim=64)
w = {"w": torch.randn(256, 640)}  # 640 KiB; model and EMA: 1.25 MiB
save_args = (OUT, 5, {"model": w, "ema": {"w": w["w"].clone()}}, (0, 0), cfg, {}, argparse.Namespace(), 3)
"""


def save_args(out):
    """save_checkpoint's arguments for a checkpoint of 1.25 MiB (SAVE_ARGS, also run in a subprocess)."""
    scope = {"OUT": str(out)}
    exec(SAVE_ARGS, scope)
    return scope["save_args"]


def test_a_file_size_limit_is_one_line_with_what_the_file_needs(tmp_path):
    """A real short write: RLIMIT_FSIZE (ulimit -f) with SIGXFSZ ignored, so the write fails as on a full disk
    (DCP writes each tensor with torch.save: "[enforce fail at inline_container.cc:672] ... unexpected pos")."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        import checkpoint
        OUT = {str(tmp_path)!r}
        exec({SAVE_ARGS!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            checkpoint.save_checkpoint(*save_args)
        except OSError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    msg = r.stdout.strip()
    assert "\n" not in msg and msg.startswith(f"could not write {tmp_path}/ckpt-0000005 ([enforce fail"), msg
    assert "the file needs 1.2 MiB but this process may write files of at most 256.0 KiB (ulimit -f)" in msg, msg
    assert msg.endswith(f"the checkpoints already in {tmp_path} are intact") and os.listdir(tmp_path) == []


def test_a_full_disk_says_how_much_is_needed_and_free(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full_disk)  # every rank's shard files
    usage = types.SimpleNamespace(total=10 * 2**30, used=10 * 2**30 - 300 * 1024, free=300 * 1024)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OSError, match=r"ckpt-0000005 \(\[Errno 28\] No space left on device: the disk is full: the "
                                      r"file needs 1.2 MiB and 300.0 KiB was free there\); the checkpoints already in "
                                      r".* are intact$"):
        checkpoint.save_checkpoint(*save_args(tmp_path))
    assert os.listdir(tmp_path) == []
