"""Running at scale: sharded checkpoints that resume on another number of ranks, the metrics a run writes
(metrics.jsonl, TensorBoard) and multi-node launches on one machine."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import torch.multiprocessing as mp

import checkpoint
import train_t2i

from test_train import REPO, _free_port, _worker, tiny

KEYS = {"step", "loss", "grad_norm", "lr", "samples_per_s", "mfu_percent", "mem_gib"}


def log_lines(run):
    """log.txt's numbers: [(step, loss, grad norm, samples/s, mem GiB, lr)] per line."""
    pattern = (r"step (\d+) \| loss (\S+) \| grad norm (\S+) \| (\S+) samples/s \| MFU n/a \| mem (\S+) GiB \| "
               r"lr (\S+)\n")
    return [(int(m[0]), *map(float, m[1:])) for m in re.findall(pattern, open(os.path.join(run, "log.txt")).read())]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint): each rank writes its shards, any number of ranks resumes


def train_on(world, argv, tmp_path):
    """train_t2i.main(argv) on `world` processes (gloo) -> rank 0's history."""
    if world == 1:
        return train_t2i.main(argv)
    out_json = str(tmp_path / f"history{_free_port()}.json")
    mp.spawn(_worker, args=(world, _free_port(), argv, out_json), nprocs=world)
    return json.load(open(out_json))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_ranks(tmp_path, before, after):
    # 2 ranks: FSDP2 DTensor shards; 1 rank: the plain model. Global batch 8 either way, so the resumed run must
    # continue the uninterrupted one; only fp32 summation order differs between 1 and 2 ranks (rtol 1e-5).
    argv = lambda out, steps, *x: tiny(out, steps, "--batch-size", "8", "--caption-dropout", "0.5", *x)
    full = train_t2i.main(argv(tmp_path / "full", 4))
    first = train_on(before, argv(tmp_path / "run", 2, "--ckpt-every", "2"), tmp_path)
    folder = tmp_path / "run" / "ckpt-0000002"
    assert sorted(f for f in os.listdir(folder) if f.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(before)]
    second = train_on(after, argv(tmp_path / "run", 4, "--resume"), tmp_path)
    assert len(first["loss"]) == len(second["loss"]) == 2
    torch.testing.assert_close(torch.tensor(first["loss"] + second["loss"]), torch.tensor(full["loss"]),
                               rtol=1e-5, atol=0)
    a, b = checkpoint.load_checkpoint(str(tmp_path / "run" / "ckpt-0000004")), \
        checkpoint.load_checkpoint(str(tmp_path / "full" / "ckpt-0000004"))
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-4, atol=1e-6)
    assert a["data"] == b["data"] and a["step"] == 4


def test_init_from_on_two_ranks_matches_one(tmp_path):
    # --init-from: rank 0 reads the parent's weights and EMA, and every rank takes its shards of them
    argv = lambda out, *x: tiny(out, 2, "--batch-size", "8", "--caption-dropout", "0.5", *x)
    train_t2i.main(argv(tmp_path / "parent"))
    one = train_t2i.main(argv(tmp_path / "one", "--init-from", str(tmp_path / "parent")))
    two = train_on(2, argv(tmp_path / "two", "--init-from", str(tmp_path / "parent")), tmp_path)
    fresh = train_t2i.main(argv(tmp_path / "fresh"))
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)
    assert abs(one["loss"][0] - fresh["loss"][0]) > 1e-3  # the parent's weights, not a fresh init


def test_two_ranks_build_a_cache_then_train_on_it(tmp_path):
    # --cache on 2 ranks: both call build_cache (each encodes its shards; here one shard, rank 1 waits for it),
    # then train on the cache; one process training on that cache afterwards gives the same losses
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, caption in enumerate(["a red circle", "a blue square", "a green triangle", "a white cross"] * 2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(caption)
    argv = lambda out, data, *x: tiny(out, 2, "--batch-size", "4", "--data", str(data), "--latent-space", "pixel",
                                      "--resolution", "32", *x)
    two = train_on(2, argv(tmp_path / "two", folder, "--cache", str(tmp_path / "cache"), "--cache-dtype", "bf16"),
                   tmp_path)
    meta = json.load(open(tmp_path / "cache" / "meta.json"))
    assert meta["complete"] and meta["dtype"] == "bf16" and meta["num_items"] == 8
    one = train_on(1, argv(tmp_path / "one", tmp_path / "cache"), tmp_path)
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)


# -----------------------------------------------------------------------------
# metrics.jsonl: one JSON object per log line, the same numbers; a resumed run logs each step once


def test_metrics_jsonl_has_log_txts_numbers_and_a_resume_logs_each_step_once(tmp_path):
    full = train_t2i.main(tiny(tmp_path / "full", 5))
    records = metrics(tmp_path / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and all(set(r) == KEYS for r in records)
    assert [r["loss"] for r in records] == full["loss"]  # --log-every 1: each step's loss, at full precision
    for r, (step, loss, norm, rate, mem, lr) in zip(records, log_lines(tmp_path / "full"), strict=True):
        # log.txt prints these numbers rounded
        assert (r["step"], f"{r['loss']:.4f}", f"{r['grad_norm']:.3f}", f"{r['samples_per_s']:.1f}",
                f"{r['mem_gib']:.2f}", f"{r['lr']:.1e}") == (step, f"{loss:.4f}", f"{norm:.3f}", f"{rate:.1f}",
                                                             f"{mem:.2f}", f"{lr:.1e}")
        assert r["mfu_percent"] is None  # no measured peak on the CPU ("MFU n/a")

    # Killed after logging step 3 but before its checkpoint: --resume trains steps 3.. again from ckpt 2
    split = tmp_path / "split"
    train_t2i.main(tiny(split, 3, "--ckpt-every", "2"))
    shutil.rmtree(split / "ckpt-0000003")
    assert [r["step"] for r in metrics(split)] == [1, 2, 3]
    train_t2i.main(tiny(split, 5, "--ckpt-every", "2", "--resume"))
    assert [r["step"] for r in metrics(split)] == [s for s, *_ in log_lines(split)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in metrics(split)] == full["loss"]  # the resumed run repeats the uninterrupted one


def test_truncate_log_keeps_json_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9, "loss": 1}\n{"step": 10, "loss": 2}\n{"step": 11, "loss": 3}\n{"step": 12, "lo')
    assert checkpoint.truncate_log(str(path), 10) == 2  # step 11 and the line a kill cut short
    assert path.read_text() == '{"step": 9, "loss": 1}\n{"step": 10, "loss": 2}\n'


# -----------------------------------------------------------------------------
# TensorBoard: opt-in, the same scalars, a one-line error without the package


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter's calls that train() makes, recorded."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_metric_and_is_a_one_line_error_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setattr(FakeWriter, "made", [])
    train_t2i.main(tiny(tmp_path / "off", 2))
    assert FakeWriter.made == []  # off by default
    train_t2i.main(tiny(tmp_path / "run", 3, "--ckpt-every", "2", "--tensorboard"))
    train_t2i.main(tiny(tmp_path / "run", 4, "--ckpt-every", "2", "--tensorboard", "--resume"))
    first, resumed = FakeWriter.made
    assert (first.purge_step, resumed.purge_step) == (None, 3) and first.closed and resumed.closed
    want = [(f"train/{k}", r[k], r["step"]) for r in metrics(tmp_path / "run") for k in sorted(KEYS - {"step"})
            if r[k] is not None]
    assert sorted(first.scalars + resumed.scalars) == sorted(want)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: importing it fails
    with pytest.raises(ImportError, match="^--tensorboard needs the tensorboard package: pip install tensorboard$"):
        train_t2i.main(tiny(tmp_path / "missing", 2, "--tensorboard"))


# -----------------------------------------------------------------------------
# multi-node: torchrun --nnodes 2 on one machine (gloo, a localhost rendezvous) trains like one process


@pytest.mark.parametrize("launch", ["rendezvous", "static"])
def test_two_nodes_match_one_process(tmp_path, launch):
    # Two torchrun agents, one rank each, meet at localhost: through a c10d rendezvous (the launch of README's
    # multi-node section) or at a fixed master address with --node-rank. Global batch 8 = 2 nodes x 4 vs
    # 1 process x 8; only fp32 summation order differs.
    argv = lambda out: tiny(out, 4, "--batch-size", "8", "--caption-dropout", "0.5")
    port = _free_port()
    where = lambda node: (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "test"]
                          if launch == "rendezvous" else
                          ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"node{node}.txt", "w+") for node in range(2)]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", *where(node), "train_t2i.py", *argv(tmp_path / "nodes")],
                              cwd=REPO, env=env, stdout=logs[node], stderr=subprocess.STDOUT)
             for node in range(2)]
    outputs = []
    for node, log in zip(nodes, logs):
        node.wait(timeout=600)
        log.seek(0)
        outputs.append(log.read())
        log.close()
        assert node.returncode == 0, outputs[-1][-3000:]
    assert sum("2 rank(s) on cpu" in output for output in outputs) == 1  # rank 0's banner: one world of 2
    train_t2i.main(argv(tmp_path / "one"))
    two, one = log_lines(tmp_path / "nodes"), log_lines(tmp_path / "one")
    assert [s for s, *_ in two] == [s for s, *_ in one] == [1, 2, 3, 4]
    # log.txt: 4 decimals (a last digit may round the other way); metrics.jsonl: full precision
    torch.testing.assert_close(torch.tensor([l[1] for l in two]), torch.tensor([l[1] for l in one]),
                               rtol=0, atol=1.01e-4)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in metrics(tmp_path / "nodes")]),
                               torch.tensor([r["loss"] for r in metrics(tmp_path / "one")]), rtol=1e-5, atol=0)
