"""train_t2i.py / train_t2v.py on CPU: world-size invariance under FSDP2, exact resume, activation
checkpointing, NaN stop, T2I -> T2V initialisation (Sec. 3.3.1), checkpoint format, the toy CLI."""

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
import torch.distributed as dist
import torch.multiprocessing as mp

import cache
import checkpoint
import fsdp
import train_data
import train_t2i
import train_t2v
from diffusion import Diffusion
from data import JointImageVideoDataset, collate
from latents import PixelSpace
from model import GenTron, GenTronConfig, make_config
from synthetic import MovingShapesDataset, ShapesDataset
from text_encoders import load_text_encoder, real_tokens_first

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT_KEYS = {"model", "ema", "optimizer", "step", "rng", "data", "config", "meta", "args"}


def tiny(out, steps, *extra):
    """argv of a tiny run: GenTron-tiny on shapes, 4 images per step, no sample grid, no oracle scores."""
    return ["--size", "tiny", "--batch-size", "4", "--max-steps", str(steps), "--log-every", "1",
            "--num-samples", "0", "--eval-n", "0", "--device", "cpu", "--lr", "1e-3", "--out", str(out), *extra]


def load(path):
    """A checkpoint with its full weights, EMA and AdamW state (checkpoint.load_checkpoint)."""
    return checkpoint.load_checkpoint(str(path))


@pytest.fixture
def process_group():
    """The 1-process group that train() makes for itself, for tests that call its parts directly."""
    _, _, device, created = fsdp.setup_distributed("cpu")
    yield device
    if created:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# data order: N ranks x b == 1 rank x N b


def test_batches_partition_the_global_batch():
    one = iter(fsdp.DistributedBatches(n=50, batch=8, accum=1, rank=0, world=1, seed=3, pos=(0, 0)))
    ranks = [iter(fsdp.DistributedBatches(50, 8, 2, r, 2, 3, (0, 0))) for r in range(2)]  # 2 ranks x 2 micro x 2
    for step in range(12):  # 12 steps of 8 > 50 items: epoch 1 starts at step 6, items 48..49 of epoch 0 are dropped
        glob = next(one)
        micro = [[next(it) for _ in range(2)] for it in ranks]  # [rank][micro-step]
        # micro-step j of rank r holds positions (2 j + r) * 2 ... of the global batch
        assert sum((micro[r][j] for j in range(2) for r in range(2)), []) == glob
        epoch, k = divmod(step, 6)
        assert glob == fsdp.permutation(50, 3, epoch)[8 * k : 8 * k + 8].tolist()
    assert fsdp.next_position((0, 48), 8, 50) == (1, 0) and fsdp.next_position((0, 40), 8, 50) == (0, 40)


# -----------------------------------------------------------------------------
# FSDP2: 2 processes == 1 process on the same global batch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, argv, out_json):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    history = train_t2i.main(argv)
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(history, f)


def test_two_processes_match_one(tmp_path):
    # Same global batch of 8: 2 ranks x 4 (gloo, FSDP2 over 2 ranks) vs 1 rank x 8 (the plain model: nothing to
    # shard) vs 1 rank x 2 micro x 4.
    # Tolerance rtol 1e-5 on every loss of 5 steps: only fp32 summation order differs.
    argv = lambda out, *x: tiny(out, 5, "--batch-size", "8", "--caption-dropout", "0.5", *x)
    mp.spawn(_worker, args=(2, _free_port(), argv(tmp_path / "two"), str(tmp_path / "two.json")), nprocs=2)
    two = json.load(open(tmp_path / "two.json"))
    one = train_t2i.main(argv(tmp_path / "one"))
    accum = train_t2i.main(argv(tmp_path / "accum", "--grad-accum", "2"))
    assert len(two["loss"]) == 5
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(accum["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(two["grad_norm"]), torch.tensor(one["grad_norm"]), rtol=1e-4, atol=0)
    assert one["loss"][-1] < one["loss"][0]  # it trains
    # the saved weights agree too (full state dicts gathered from 2 shards)
    a, b = load(tmp_path / "two" / "ckpt-0000005"), load(tmp_path / "one" / "ckpt-0000005")
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=1e-4, atol=1e-6)
    for k, state in a["optimizer"]["state"].items():  # AdamW's moments, gathered from the 2 ranks' shards
        assert state["exp_avg"].shape == b["optimizer"]["state"][k]["exp_avg"].shape == b["model"][k].shape
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[m], b["optimizer"]["state"][k][m], rtol=1e-3, atol=1e-9)


# -----------------------------------------------------------------------------
# exact resume, NaN stop, checkpoint format


def test_resume_is_exact(tmp_path):
    full = train_t2i.main(tiny(tmp_path / "full", 6, "--ckpt-every", "3"))
    first = train_t2i.main(tiny(tmp_path / "split", 3, "--ckpt-every", "3"))
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrite a run
        train_t2i.main(tiny(tmp_path / "split", 6))
    second = train_t2i.main(tiny(tmp_path / "split", 6, "--ckpt-every", "3", "--resume"))
    assert first["loss"] + second["loss"] == full["loss"]  # bit for bit
    a, b = load(tmp_path / "full" / "ckpt-0000006"), load(tmp_path / "split" / "ckpt-0000006")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) and torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == b["data"] == {"epoch": 0, "offset": 24}


def test_resume_across_builds(tmp_path):
    # a checkpoint does not depend on how the model was built: written by FSDP2 (one rank with --ac), resumed by the
    # plain model (one rank without), and the other way round, each continues as the uninterrupted run does
    full = train_t2i.main(tiny(tmp_path / "full", 4, "--ac", "0"))
    for a, b in (("1", "0"), ("0", "1")):
        out = tmp_path / f"ac{a}to{b}"
        first = train_t2i.main(tiny(out, 2, "--ckpt-every", "2", "--ac", a))
        second = train_t2i.main(tiny(out, 4, "--ac", b, "--resume"))
        torch.testing.assert_close(torch.tensor(first["loss"] + second["loss"]), torch.tensor(full["loss"]),
                                   rtol=1e-6, atol=0)


def test_time_limit_stops_with_a_checkpoint_and_resumes_exactly(tmp_path):
    full = train_t2i.main(tiny(tmp_path / "full", 4, "--log-every", "2"))
    # a limit of 0 minutes is past at the first log step (2): a checkpoint is written there, although
    # --ckpt-every would not have saved before step 100, and the resumed run continues bit for bit
    first = train_t2i.main(tiny(tmp_path / "cut", 4, "--log-every", "2", "--ckpt-every", "100", "--time-limit", "0"))
    assert len(first["loss"]) == 2
    assert sorted(os.listdir(tmp_path / "cut")) == ["ckpt-0000002", "log.txt", "metrics.jsonl"]
    second = train_t2i.main(tiny(tmp_path / "cut", 4, "--log-every", "2", "--resume"))
    assert first["loss"] + second["loss"] == full["loss"]


def test_time_limit_without_log_or_checkpoint_steps_and_final_samples_without_checkpoints(tmp_path, monkeypatch):
    """--time-limit is checked every STOP_CHECK_EVERY steps even with --log-every 0 --ckpt-every 0 (it was never
    checked: the run went on to --max-steps); and a run that writes no checkpoint samples its trained weights
    (it sampled none, and after --resume the loaded checkpoint's)."""
    monkeypatch.setattr(train_t2i, "STOP_CHECK_EVERY", 3)
    train_t2i.main(tiny(tmp_path / "a", 7, "--log-every", "0", "--ckpt-every", "0", "--time-limit", "0"))
    assert sorted(os.listdir(tmp_path / "a")) == ["ckpt-0000003"]  # stopped at the first check, with a checkpoint
    sampled = {}
    monkeypatch.setattr(train_t2i, "final_samples", lambda cfg, state, *a: sampled.update(state=state))
    train_t2i.main(tiny(tmp_path / "a", 5, "--ckpt-every", "0", "--resume", "--num-samples", "2", "--ema", "0.5"))
    step3 = load(tmp_path / "a" / "ckpt-0000003")["ema"]  # what was sampled before: the loaded EMA
    assert sorted(os.listdir(tmp_path / "a")) == ["ckpt-0000003", "log.txt", "metrics.jsonl"]
    assert set(sampled["state"]) == set(step3) and any(not torch.equal(sampled["state"][k], step3[k]) for k in step3)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    # losses reach the host only at log / checkpoint steps (3, 4, 6 here): the NaN of step 5 is caught at 6
    with pytest.raises(SystemExit) as e:
        train_t2i.main(tiny(tmp_path, 8, "--ckpt-every", "2", "--log-every", "3", "--debug-nan-at-step", "5"))
    msg = str(e.value)
    assert msg.startswith("step 5: non-finite loss nan") and "stopped at step 6" in msg
    assert "ckpt-0000004" in msg and "\n" not in msg
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000002", "ckpt-0000004", "log.txt", "metrics.jsonl"]  # no temp files
    ckpt = load(tmp_path / "ckpt-0000004")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # with neither logs nor checkpoints (--log-every 0 --ckpt-every 0) the last step still checks every loss
    with pytest.raises(SystemExit, match="^step 2: non-finite loss nan .* stopped at step 3 without saving"):
        train_t2i.main(tiny(tmp_path / "quiet", 3, "--ckpt-every", "0", "--log-every", "0", "--debug-nan-at-step", "2"))
    assert len(train_t2i.main(tiny(tmp_path / "quiet2", 3, "--ckpt-every", "0", "--log-every", "0"))["loss"]) == 3


def test_resume_follows_the_flags_and_bad_parents_are_one_line_errors(tmp_path):
    """A resumed run takes its optimizer settings from its flags (as --lr and --clip); a resume's mismatches,
    a parent of another model size, T2V weights for a T2I run and a T2V --resume with nothing to
    resume are one-line errors (ValueError / SystemExit, which train_t2i.cli prints) before any training."""
    train_t2i.main(tiny(tmp_path / "a", 2, "--ckpt-every", "2"))
    train_t2i.main(tiny(tmp_path / "a", 4, "--ckpt-every", "2", "--resume", "--weight-decay", "0.1", "--betas", "0.8", "0.9"))
    args = load(tmp_path / "a" / "ckpt-0000004")["args"]  # (a checkpoint stores AdamW's moments, not its settings)
    assert args["weight_decay"] == 0.1 and tuple(args["betas"]) == (0.8, 0.9)
    with pytest.raises(ValueError, match="trained with --prediction v; a resumed run keeps it"):
        train_t2i.main(tiny(tmp_path / "a", 6, "--resume", "--prediction", "eps"))  # would train another target
    with pytest.raises(ValueError, match=r"was trained on shapes:train:size=32:seed=0:.*, not shapes:train:size=32:"
                                          r"seed=7:.*: resume with its --data"):  # its data position is another's
        train_t2i.main(tiny(tmp_path / "a", 6, "--resume", "--seed", "7"))
    with open(tmp_path / "a" / "ckpt-0000004" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)  # e.g. a disk that filled up under another program: skipped (tests/test_faults.py)
    with pytest.raises(ValueError, match=r"ckpt-0000002 was trained on shapes:.*seed=7"):  # the one before
        train_t2i.main(tiny(tmp_path / "a", 6, "--resume", "--seed", "7"))
    parent = str(tmp_path / "a" / "ckpt-0000002")
    with pytest.raises(ValueError, match=r"different model: depth 2 \(this run: 8\)"):
        train_t2v.main(tiny(tmp_path / "v", 1, "--size", "toy", "--init-from", parent))
    train_t2v.main(tiny(tmp_path / "v", 1, "--init-from", parent))
    with pytest.raises(ValueError, match="is a T2V model"):
        train_t2i.main(tiny(tmp_path / "i", 1, "--init-from", str(tmp_path / "v")))
    with pytest.raises(SystemExit, match="--resume found no checkpoint"):
        train_t2v.main(tiny(tmp_path / "typo", 1, "--resume"))


def test_captions_are_dropped_one_time_in_ten_by_default():
    """CFG (lambda_T, Sec. 3.2.1 / Eq. 6) needs the unconditional prediction trained: by default 10% of the
    captions become the null caption (Ho & Salimans), drawn per sample and step."""
    p = train_t2i.get_parser().parse_args([]).caption_dropout
    drops = torch.cat([fsdp.step_draws(0, step, 256, (1,), torch.device("cpu"), p)[2] for step in range(40)])
    assert p == 0.1 and abs(drops.float().mean().item() - 0.1) < 3 * (0.1 * 0.9 / len(drops)) ** 0.5


def test_resume_knows_the_same_data_folder_however_spelled(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    assert train_t2i.same_dataset("imgs", str(tmp_path / "imgs") + "/") and train_t2i.same_dataset("imgs+other:p_motion_free=0.5",
                                                                                 "./imgs+other:p_motion_free=0.5")
    assert not train_t2i.same_dataset("imgs", "other") and not train_t2i.same_dataset("imgs+other:p_motion_free=0.5",
                                                                      "imgs+other:p_motion_free=0.9")
    # T2V: the image folder is the part before ":p_motion_free=", spelled any way too
    assert train_t2i.same_dataset("imgs+other:p_motion_free=0.5", f"imgs/+{tmp_path / 'other'}/:p_motion_free=0.5")
    assert not train_t2i.same_dataset("imgs+other:p_motion_free=0.5", "imgs+imgs:p_motion_free=0.5")


def test_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """The new file's bytes are flushed before the rename, and the folder (the rename) before atomic_write returns:
    save_checkpoint deletes the older checkpoints right after it (--keep)."""
    import checkpoint
    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, *a, **k):
        fd = real_open(path, *a, **k)
        opened[fd] = os.path.basename(os.path.normpath(path))
        return fd
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", opened[fd])), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                     real_replace(a, b)))
    checkpoint.atomic_write(str(tmp_path / "f.pt"), lambda tmp: torch.save({"x": 1}, tmp))
    tmp_name = f"f.pt.tmp{os.getpid()}"
    assert events == [("fsync", tmp_name), ("replace", "f.pt"), ("fsync", tmp_path.name)]
    assert torch.load(tmp_path / "f.pt") == {"x": 1} and os.listdir(tmp_path) == ["f.pt"]


def test_checkpoint_format(tmp_path):
    train_t2i.main(tiny(tmp_path, 4, "--ckpt-every", "1", "--keep", "2", "--ema", "0.9"))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt-")) == ["ckpt-0000003", "ckpt-0000004"]
    ckpt, prev = load(tmp_path / "ckpt-0000004"), load(tmp_path / "ckpt-0000003")
    for k, v in ckpt["ema"].items():  # each step: ema <- decay * ema + (1 - decay) * the step's new weights
        torch.testing.assert_close(v, 0.9 * prev["ema"][k] + 0.1 * ckpt["model"][k], rtol=0, atol=1e-6)
    assert set(ckpt) == CKPT_KEYS and ckpt["step"] == 4
    assert sorted(os.listdir(tmp_path / "ckpt-0000004")) == [".metadata", "__0_0.distcp", "checksums.json", "state.pt"]
    assert ckpt["meta"] == {"kind": "t2i", "text_encoder": "tiny-clip+t5", "latent_space": "pixel", "resolution": 32,
                            "num_frames": None, "dataset": "shapes:train:size=32:seed=0:single+color+shape+spatial",
                            "prediction": "v"}  # pixel space: v-prediction by default
    # the config alone rebuilds the model, and both weight sets have GenTron's own key names
    model = GenTron(GenTronConfig(**ckpt["config"]))
    assert list(ckpt["model"]) == list(ckpt["ema"]) == list(model.state_dict())
    model.load_state_dict(ckpt["ema"])
    assert not torch.equal(ckpt["ema"]["final_layer.linear.weight"], ckpt["model"]["final_layer.linear.weight"])
    assert set(ckpt["optimizer"]["state"]) == set(ckpt["model"])  # AdamW state keyed by parameter name
    assert ckpt["args"]["batch_size"] == 4


# -----------------------------------------------------------------------------
# activation checkpointing


def test_activation_checkpointing_and_fsdp_units_give_same_gradients(process_group):
    """Checkpointing (Sec. 4.1) recomputes the checkpointed blocks in backward, and grouping blocks into FSDP2
    units changes only the communication: the gradients are those of the plain model, exactly."""
    device = process_group
    cfg = GenTronConfig(depth=3, width=64, mlp_width=128, heads=4, in_channels=3, input_size=8, text_dim=16, pooled_dim=8)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in fsdp.fresh_state(cfg, 0).items()}  # non-zero gates
    batch = dict(x=torch.randn(3, 3, 8, 8, generator=g), t=torch.tensor([10, 500, 999]),
                 text=torch.randn(3, 5, 16, generator=g), text_mask=torch.ones(3, 5, dtype=torch.bool),
                 pooled=torch.randn(3, 8, generator=g))
    grads, calls, units = {}, {}, {}
    # (ac, unit): none; every block; every 2nd block (blocks 0 and 2); every block in units of 2 (blocks 0-1, 2)
    for run in ((0, 1), (1, 1), (2, 1), (1, 2)):
        model = fsdp.build_model(cfg, device, ac=run[0], init_state=state, unit=run[1])
        calls[run] = [0] * cfg.depth
        for i, block in enumerate(model.blocks):
            # a pre-hook: the recompute stops inside the MLP once it has every saved tensor (checkpoint's early stop)
            block.mlp.register_forward_pre_hook(lambda *_, i=i, run=run: calls[run].__setitem__(i, calls[run][i] + 1))
        units[run] = [id(b._get_fsdp_state()._fsdp_param_group) if isinstance(b, FSDPModule) else None
                      for b in model.blocks] + [isinstance(model, FSDPModule)]
        model(**batch).square().mean().backward()
        grads[run] = {n: fsdp.full_tensor(p.grad) for n, p in model.named_parameters()}
    assert calls == {(0, 1): [1, 1, 1], (1, 1): [2, 2, 2], (2, 1): [2, 1, 2], (1, 2): [2, 2, 2]}  # AC recomputes
    assert units[(0, 1)] == [None] * 3 + [False]  # one rank, no checkpointing: the plain model, nothing sharded
    assert len(set(units[(1, 1)][:3])) == 3 and units[(1, 2)][0] == units[(1, 2)][1] != units[(1, 2)][2]
    assert units[(1, 1)][3] and units[(1, 2)][3]  # the root: embedders, text projection, final layer
    assert grads[(0, 1)]["blocks.0.attn.qkv.weight"].abs().sum() > 0
    for run in grads:
        for n in grads[(0, 1)]:
            torch.testing.assert_close(grads[run][n], grads[(0, 1)][n], rtol=0, atol=0)  # recompute is exact on CPU


def test_compile_with_checkpointing_on_the_cpu_gives_the_exact_gradients(process_group):
    """--compile --ac on the CPU: Inductor's C++ for a separately compiled block gave gradients ~0.2% off (torch
    2.13, a code-generation bug), so fsdp.build_model leaves CPU blocks eager: the gradients are the plain model's."""
    device = process_group
    cfg = GenTronConfig(depth=2, width=64, mlp_width=128, heads=4, in_channels=3, input_size=8, text_dim=16, pooled_dim=8)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in fsdp.fresh_state(cfg, 0).items()}
    batch = dict(x=torch.randn(2, 3, 8, 8, generator=g), t=torch.tensor([10, 900]), text=torch.randn(2, 5, 16, generator=g),
                 text_mask=torch.ones(2, 5, dtype=torch.bool), pooled=torch.randn(2, 8, generator=g))
    grads = []
    for compile in (False, True):
        model = fsdp.build_model(cfg, device, ac=1, compile=compile, init_state=state)
        model(**batch).square().mean().backward()
        grads.append({n: fsdp.full_tensor(p.grad) for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)


@pytest.mark.parametrize("ac", [0, 1])  # one rank: the plain model (ac 0), FSDP2 DTensor shards (ac 1)
def test_sharded_adamw_is_torch_adamw_with_clipping(process_group, ac, tmp_path):
    """fsdp.ShardedAdamW (AdamW on the local shards, one all-reduce for the norm) takes the steps that
    torch.optim.AdamW + clip_grad_norm_ take on the unsharded model, clipping active; its full state dict
    checkpoint loads into a fresh one that then continues identically."""
    device = process_group
    cfg = GenTronConfig(depth=2, width=64, mlp_width=128, heads=4, in_channels=3, input_size=8, text_dim=16, pooled_dim=8)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in fsdp.fresh_state(cfg, 0).items()}
    batches = [dict(x=torch.randn(3, 3, 8, 8, generator=g), t=torch.tensor([10, 500, 999]),
                    text=torch.randn(3, 5, 16, generator=g), text_mask=torch.ones(3, 5, dtype=torch.bool),
                    pooled=torch.randn(3, 8, generator=g)) for _ in range(3)]
    hp = dict(betas=(0.9, 0.99), weight_decay=0.01)
    ref = GenTron(cfg)
    ref.load_state_dict(state)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, **hp)
    model = fsdp.build_model(cfg, device, ac=ac, init_state=state)
    assert isinstance(model, FSDPModule) == bool(ac)
    opt = fsdp.ShardedAdamW(model, lr=1e-3, **hp)
    for k, batch in enumerate(batches[:2]):
        ref(**batch).square().mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        model(**batch).square().mean().backward()
        norm = opt.step(1e-3, 0.05)
        assert ref_norm > 0.1  # the clip scaled these gradients down
        torch.testing.assert_close(norm, ref_norm)
    full = {n: fsdp.full_tensor(p) for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(full[n], p.detach(), rtol=1e-5, atol=1e-6)
        assert p.grad is None and model.get_parameter(n).grad is None  # zeroed
    # resume: a new model + optimizer (another init) loaded from a checkpoint of the shards takes the same third step
    ema = [s.clone() for s in opt.shards]
    checkpoint.save_checkpoint(str(tmp_path), 2, fsdp.sharded_state(model, opt, ema), (0, 0), cfg, {}, argparse.Namespace(), 0)
    saved = checkpoint.load_checkpoint(str(tmp_path / "ckpt-0000002"))["optimizer"]
    assert set(saved["state"]) == set(full) and saved["state"]["final_layer.linear.weight"]["exp_avg"].shape == (12, 64)
    model2 = fsdp.build_model(cfg, device, ac=ac, seed=1)
    opt2 = fsdp.ShardedAdamW(model2, lr=1e-3, **hp)
    ema2 = [torch.zeros_like(s) for s in opt2.shards]
    checkpoint.load_sharded(str(tmp_path / "ckpt-0000002"), fsdp.sharded_state(model2, opt2, ema2))
    assert all(torch.equal(a, b) for a, b in zip(ema, ema2))
    for m, o in ((model, opt), (model2, opt2)):
        m(**batches[2]).square().mean().backward()
        o.step(1e-3, 0.05)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(fsdp.full_tensor(p2), fsdp.full_tensor(p), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# T2V from a T2I checkpoint (Sec. 3.3.1)


def test_t2v_training_passes_the_motion_free_flags_to_the_model(tmp_path, monkeypatch):
    """Sec. 3.3.2: the batch's motion-free flags (the identity temporal mask) reach the model in every
    training step, both values at p_motion_free 0.5 (the flags are what the mask acts on)."""
    seen, forward = [], GenTron.forward

    def spy(self, *args, motion_free=None, **kwargs):
        seen.append(None if motion_free is None else motion_free.tolist())
        return forward(self, *args, motion_free=motion_free, **kwargs)
    monkeypatch.setattr(GenTron, "forward", spy)
    train_t2v.main(tiny(tmp_path / "v", 3, "--from-scratch", "--batch-size", "8", "--num-frames", "2", "--p-motion-free", "0.5"))
    flags = [f for step in seen for f in step]
    assert len(seen) == 3 and None not in seen and 0 < sum(flags) < len(flags)


def test_t2v_starts_at_the_t2i_loss_on_pseudo_videos(tmp_path):
    train_t2i.main(tiny(tmp_path / "t2i", 3))  # a T2I checkpoint whose weights are no longer the init
    t2i = tmp_path / "t2i" / "ckpt-0000003"
    argv = tiny(tmp_path / "t2v", 1, "--init-from", str(t2i), "--batch-size", "2", "--num-frames", "4",
                "--p-motion-free", "1", "--caption-dropout", "0")
    loss_t2v = train_t2v.main(argv)["loss"][0]
    # Reference: the T2I model on the frames of the same pseudo-videos, with the same t and noise per frame.
    ckpt = load(t2i)
    model = GenTron(GenTronConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    ds = JointImageVideoDataset(MovingShapesDataset(num_frames=4), ShapesDataset(categories=("single",)), 1.0, 4)
    batch = collate([ds[i] for i in next(iter(fsdp.DistributedBatches(len(ds), 2, 1, 0, 1, 0, (0, 0))))])
    assert batch["motion_free"].all()
    t, noise, _ = fsdp.step_draws(0, 1, 2, (4, 3, 32, 32), torch.device("cpu"), 0.0)
    text, mask, pooled = load_text_encoder("tiny-clip+t5")(batch["caption"])
    rep = lambda z: z.repeat_interleave(4, dim=0)  # one clip of 4 frames -> 4 images
    with torch.no_grad():
        eps = lambda xt, tt: model(xt, tt, rep(text), rep(mask), rep(pooled))
        loss_t2i = Diffusion(prediction="v").loss(eps, batch["x"].flatten(0, 1), rep(t), noise.flatten(0, 1)).item()
    assert loss_t2v == pytest.approx(loss_t2i, rel=1e-6)
    new = set(load(tmp_path / "t2v" / "ckpt-0000001")["model"]) - set(ckpt["model"])
    assert new and all(".temporal." in k for k in new)
    with pytest.raises(SystemExit, match="--init-from"):
        train_t2v.main(tiny(tmp_path / "none", 1))
    # An export (EMA weights only) is a T2I parent too: both the model and its EMA start from those weights.
    from checkpoint import export, load_init

    export(str(t2i), str(tmp_path / "t2i.safetensors"))
    cfg = GenTronConfig(**{**ckpt["config"], "temporal": True, "num_frames": 4})
    model_sd, ema_sd = load_init(str(tmp_path / "t2i.safetensors"), cfg, 0)
    for k, v in ckpt["ema"].items():
        assert torch.equal(model_sd[k], v) and torch.equal(ema_sd[k], v)
    assert {k for k in model_sd if k not in ckpt["ema"]} == new


def test_cpu_toy_uses_patch_4_and_children_keep_their_parents_settings(tmp_path):
    """The no-argument demo on a CPU trains the toy at patch 4; --resume and a T2V child keep that patch,
    and the parent's prediction and text encoder."""
    run = lambda out, *a: ["--size", "toy", "--batch-size", "2", "--num-samples", "0", "--eval-n", "0",
                           "--device", "cpu", "--out", str(tmp_path / out), *a]
    train_t2i.main(run("t2i", "--max-steps", "1"))
    train_t2i.main(run("t2i", "--max-steps", "2", "--resume"))
    assert load(tmp_path / "t2i" / "ckpt-0000002")["config"]["patch"] == 4
    train_t2v.main(run("t2v", "--max-steps", "1", "--init-from", str(tmp_path / "t2i"), "--num-frames", "2"))
    assert load(tmp_path / "t2v" / "ckpt-0000001")["config"]["patch"] == 4
    # likewise the prediction (an eps run in pixel space, not the default there) and the text encoder: a resumed
    # run and a child run (--init-from) keep the parent's, so the full-scale stage-2 and T2V commands need no flag
    train_t2i.main(run("eps", "--max-steps", "1", "--prediction", "eps", "--text-encoder", "tiny-clip"))
    train_t2i.main(run("eps", "--max-steps", "2", "--resume"))
    meta = load(tmp_path / "eps" / "ckpt-0000002")["meta"]
    assert meta["prediction"] == "eps" and meta["text_encoder"] == "tiny-clip"
    train_t2i.main(run("child", "--max-steps", "1", "--init-from", str(tmp_path / "eps")))
    assert load(tmp_path / "child" / "ckpt-0000001")["meta"]["text_encoder"] == "tiny-clip"


def test_qk_norm_is_inherited_and_older_checkpoints_still_load(tmp_path):
    """--qk-norm is stored in the config; a T2V child of a QK-norm parent gets it (its q/k gains copied);
    a checkpoint written before the field existed resumes as qk_norm=False."""
    train_t2i.main(tiny(tmp_path / "qk", 1, "--qk-norm"))
    parent = load(tmp_path / "qk" / "ckpt-0000001")
    assert parent["config"]["qk_norm"] and "blocks.0.attn.q_norm.weight" in parent["model"]
    train_t2v.main(tiny(tmp_path / "qk_t2v", 1, "--init-from", str(tmp_path / "qk"), "--num-frames", "2"))
    child = load(tmp_path / "qk_t2v" / "ckpt-0000001")
    assert child["config"]["qk_norm"] and "blocks.0.temporal.attn.k_norm.weight" in child["model"]
    train_t2i.main(tiny(tmp_path / "old", 1))
    path = tmp_path / "old" / "ckpt-0000001"
    old = torch.load(path / "state.pt", weights_only=True)
    del old["config"]["qk_norm"]
    torch.save(old, path / "state.pt")
    sums = json.load(open(path / "checksums.json"))
    sums["state.pt"] = [os.path.getsize(path / "state.pt"), checkpoint.file_crc(path / "state.pt")]
    json.dump(sums, open(path / "checksums.json", "w"))
    train_t2i.main(tiny(tmp_path / "old", 2, "--resume"))
    assert load(tmp_path / "old" / "ckpt-0000002")["config"]["qk_norm"] is False


# -----------------------------------------------------------------------------
# precomputed features (cache.build_cache) and the null caption


def test_cached_features_and_null_caption(tmp_path, process_group):
    enc = load_text_encoder("tiny-clip+t5")
    cache.build_cache(ShapesDataset(length=8), tmp_path / "cache", enc, PixelSpace(), progress=False)
    hist = train_t2i.main(tiny(tmp_path / "run", 2, "--data", str(tmp_path / "cache"), "--caption-dropout", "0.5"))
    # flags that disagree with what the cache was made with are refused, not ignored; so is an image cache for T2V
    with pytest.raises(ValueError, match="made with --resolution 32, not 64"):
        train_t2i.main(tiny(tmp_path / "r64", 1, "--data", str(tmp_path / "cache"), "--resolution", "64"))
    with pytest.raises(ValueError, match="is a cache of images; train_t2v.py needs one of videos"):
        train_t2v.main(tiny(tmp_path / "v", 1, "--data", str(tmp_path / "cache"), "--from-scratch"))
    cache.build_cache(MovingShapesDataset(num_frames=2, length=4), tmp_path / "vcache", enc, PixelSpace(),
                      progress=False)
    with pytest.raises(ValueError, match="is a cache of videos; train_t2i.py needs one of images"):
        train_t2i.main(tiny(tmp_path / "i", 1, "--data", str(tmp_path / "vcache")))
    with pytest.raises(ValueError, match="must be a multiple of 4"):  # found before hours of encoding, not after
        train_t2i.main(tiny(tmp_path / "r30", 1, "--cache", str(tmp_path / "c30"), "--resolution", "30", "--patch", "4"))
    assert not (tmp_path / "c30").exists()
    with pytest.raises(ValueError, match="is a cache already"):
        train_t2i.main(tiny(tmp_path / "c2", 1, "--data", str(tmp_path / "cache"), "--cache", str(tmp_path / "cache2")))
    assert len(hist["loss"]) == 2 and all(0 < v < 2 for v in hist["loss"])
    assert load(tmp_path / "run" / "ckpt-0000002")["meta"]["dataset"].startswith("shapes:train")
    # a cache of the built-in data ends like the online run: held-out samples and the oracle's scores
    train_t2i.main(tiny(tmp_path / "end", 1, "--data", str(tmp_path / "cache"), "--num-samples", "2", "--eval-n", "1",
                "--sample-steps", "2"))
    assert (tmp_path / "end" / "samples.png").exists()
    assert json.load(open(tmp_path / "end" / "oracle.json"))["n"]["single"] == 1
    # caption dropout swaps in the features of "" exactly (CFG's unconditional input)
    data = train_data.cached_data(str(tmp_path / "cache"), process_group)
    batch = collate([data.dataset[i] for i in range(3)])
    cond = train_data.text_condition(batch, torch.tensor([True, False, True]), data, process_group)
    null = enc([""])
    first = real_tokens_first(null[1][0])  # its real tokens first, as data.collate cuts a batch's captions
    for k, ref in zip(("text", "text_mask", "pooled"), null):
        ref = ref[0] if k == "pooled" else ref[0][first]
        assert torch.equal(cond[k][0], ref) and torch.equal(cond[k][2], ref)
        assert torch.equal(cond[k][1], batch[k][1])
    # the online path (captions encoded each step) drops the same way: the dropped rows are the features of ""
    online = train_data.online_data(ShapesDataset(length=4), "shapes", train_t2i.get_parser().parse_args(["--text-encoder", "tiny-clip+t5"]), process_group)
    batch = collate([online.dataset[i] for i in range(3)])
    cond = train_data.text_condition(batch, torch.tensor([True, False, True]), online, process_group)
    kept = enc([batch["caption"][1]])
    for k, ref, ref_kept in zip(("text", "text_mask", "pooled"), null, kept):
        same = lambda a, b: torch.allclose(a.float(), b.float(), atol=1e-5)  # encoded in another batch: rounding
        assert same(cond[k][0], ref[0]) and same(cond[k][2], ref[0]) and same(cond[k][1], ref_kept[0])
        assert not same(cond[k][1], ref[0]) or k == "text_mask"  # the kept caption is not the null one


def test_cached_batches_keep_only_the_positions_their_captions_need(process_group):
    # data.collate cuts cached CLIP + T5 features (77 + 120 positions; a caption fills a few of each) to what the
    # batch's longest caption needs, rounded up to 64 (text_encoders.compact_caption), and a dropped caption becomes the
    # null caption cut the same way: the predictions are those of the full features (Fig. 2b, CFG's dropout).
    g = torch.Generator().manual_seed(0)
    L, C, P = 197, 24, 16

    def caption(n_clip, n_t5):
        mask = torch.zeros(L, dtype=torch.bool)
        mask[:n_clip], mask[77 : 77 + n_t5] = True, True
        return torch.randn(L, C, generator=g) * mask[:, None], mask  # padding rows 0, as text_encoders

    items = [dict(zip(("text", "text_mask"), caption(*n)), x=torch.randn(3, 8, 8, generator=g), caption="c",
                  pooled=torch.randn(P, generator=g)) for n in ((12, 20), (30, 25), (5, 3))]
    batch = collate(items)
    assert batch["text"].shape == (3, 64, C) and batch["text_mask"].sum(1).tolist() == [32, 55, 8]
    null_text, null_mask = caption(2, 1)  # "": BOS + EOS, EOS
    first = real_tokens_first(null_mask)
    data = train_data.Data(None, "test", "clip+t5", "pixel", 8, 3, 8, C, P, L,
                  null=(null_text[first], null_mask[first], torch.randn(P, generator=g)))
    cond = train_data.text_condition(batch, torch.tensor([False, True, False]), data, process_group)
    full = {k: torch.stack([it[k] for it in items]) for k in ("text", "text_mask", "pooled")}
    full["text"][1], full["text_mask"][1], full["pooled"][1] = null_text, null_mask, data.null[2]
    torch.manual_seed(0)
    model = GenTron(make_config("tiny", in_channels=3, text_dim=C, pooled_dim=P)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # like a trained model: no zero-initialised branch
        x, t = batch["x"], torch.tensor([5, 500, 900])
        torch.testing.assert_close(model(x, t, **cond), model(x, t, **full), rtol=0, atol=1e-5)
        full["text"][0, 3] += 1.0  # a real token of the first caption does matter
        assert (model(x, t, **full)[0] - model(x, t, **cond)[0]).abs().max() > 1e-3
    # captions encoded during training (the online path) are cut the same way, "" included
    table = {"c": items[0], "": {"text": null_text, "text_mask": null_mask, "pooled": data.null[2]}}
    encoder = lambda caps: [torch.stack([table[c][k] for c in caps]) for k in ("text", "text_mask", "pooled")]
    online = train_data.Data(None, "test", "clip+t5", "pixel", 8, 3, 8, C, P, L, encoder=encoder)
    cond = train_data.text_condition({"caption": ["c", "c"]}, torch.tensor([False, True]), online, process_group)
    assert cond["text"].shape == (2, 64, C) and cond["text_mask"].sum(1).tolist() == [32, 3]
    torch.testing.assert_close(cond["text"][1][cond["text_mask"][1]], null_text[null_mask])  # "" in its order


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """A full disk during a checkpoint write (DCP writes each tensor with torch.save, whose zip writer raises
    RuntimeError) stops the run with one line naming the checkpoint; no temp folder stays, the earlier checkpoint
    is untouched, and a temp folder left by a killed write is removed when the next run starts."""
    run = tmp_path / "a"
    train_t2i.main(tiny(run, 1))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 24472256 vs 24472144")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*ckpt-0000002 \(\[enforce fail.*already in .* are intact"):
        train_t2i.main(tiny(run, 2, "--resume"))
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000001"]
    monkeypatch.setattr(torch, "save", real_save)
    (run / "ckpt-0000002.tmp").mkdir()  # as a kill -9 mid-write leaves it
    (run / "ckpt-0000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    train_t2i.main(tiny(run, 2, "--resume"))
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000001", "ckpt-0000002"]


def test_device_flags(process_group):
    with pytest.raises(ValueError, match="--device 'foo' is not a device"):
        fsdp.setup_distributed("foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="PyTorch sees no CUDA device"):
            fsdp.setup_distributed("cuda")


# -----------------------------------------------------------------------------
# the toy CLI end to end


def test_toy_cli_end_to_end(tmp_path):
    # `python train_t2i.py` with its defaults (toy model, shapes, tiny text encoders), made small
    cmd = [sys.executable, "train_t2i.py", "--max-steps", "2", "--batch-size", "4", "--sample-steps", "2",
           "--num-samples", "4", "--eval-n", "2", "--out", str(tmp_path), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 2 | loss" in r.stdout and "MFU n/a" in r.stdout
    assert open(tmp_path / "log.txt").read().startswith("step 2 | loss")
    from PIL import Image
    assert Image.open(tmp_path / "samples.png").size == (2 * 130 + 2, 2 * 130 + 2)  # 2 x 2 cells of 32 -> 128 px
    assert len(open(tmp_path / "samples.txt").read().splitlines()) == 4
    scores = json.load(open(tmp_path / "oracle.json"))  # evaluate.py's oracle on held-out compositions
    assert scores["n"] == {"single": 2, "color": 2, "shape": 2, "spatial": 2} and 0 <= scores["overall"] <= 1
    assert set(load(tmp_path / "ckpt-0000002")) == CKPT_KEYS


def test_scores_without_a_sample_grid(tmp_path):
    """--num-samples 0 drops the grid, not the oracle's scores (--eval-n)."""
    train_t2i.main(tiny(tmp_path, 1, "--eval-n", "1", "--sample-steps", "2"))
    assert not (tmp_path / "samples.png").exists()
    assert json.load(open(tmp_path / "oracle.json"))["n"] == {"single": 1, "color": 1, "shape": 1, "spatial": 1}


@pytest.mark.parametrize("script, argv, message", [
    ("train_t2i.py", ["--batch-size", "0"], "train_t2i.py: error: argument --batch-size: must be >= 1, got 0"),
    ("train_t2v.py", ["--p-motion-free", "1.5"], "train_t2v.py: error: argument --p-motion-free: must be in [0, 1], got 1.5"),
    ("train_t2i.py", ["--ema", "1"], "train_t2i.py: error: argument --ema: must be in [0, 1), got 1"),  # never moves
    ("train_t2i.py", ["--ema", "nan"], "train_t2i.py: error: argument --ema: must be a finite number, got nan"),
    ("train_t2i.py", ["--seed", "-1"], "train_t2i.py: error: argument --seed: must be >= 0, got -1"),
    ("train_t2i.py", ["--data", "bench", "--cache", "unused"],
     "error: --cache encodes a dataset of files; --data bench is random features"),
    ("train_t2i.py", ["--resolution", "30", "--patch", "4"],
     "error: --resolution 30 must be a multiple of 4 (pixel downsampling 1 x patch 4)"),
    ("train_t2v.py", ["--from-scratch", "--image-data", "imgs"],  # it was ignored: built-in data has its images
     "error: --image-data is for a folder / .jsonl of real videos; --data moving_shapes brings its own images"),
])
def test_bad_input_is_a_one_line_error(tmp_path, script, argv, message):
    """Bad flags stop the scripts with one line of error, no traceback: argparse for a flag alone, the
    script's own check for what depends on the data (the resolution must fit the patch grid)."""
    cmd = [sys.executable, script, *argv, "--device", "cpu", "--max-steps", "1", "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert r.returncode != 0 and "Traceback" not in r.stderr and lines[-1] == message, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "log.txt")  # nothing was trained
