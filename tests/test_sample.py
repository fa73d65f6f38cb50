"""sample.py end to end on tiny checkpoints written in the common.md format (CPU, offline, ~20 s)."""
import dataclasses
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import fastpath.sampling
import pipeline
import sample
from diffusion import guided_eps_fn
from model import GenTron, make_config

SIZE, FRAMES = 18, 4  # 18 px pixel-space samples (the shapes need >= 17), 4-frame clips: 32 px x 8 paths, faster


def make_checkpoint(path, temporal=False, step=10, seed=0):
    """A tiny GenTron saved exactly as the training scripts save it (common.md), with random weights
    (the zero-inits would make every sample identical) and EMA weights that differ from the raw ones."""
    torch.manual_seed(seed)
    cfg = make_config("tiny", in_channels=3, input_size=SIZE, text_dim=128, pooled_dim=64,  # tiny-clip+t5
                      temporal=temporal, num_frames=FRAMES)
    model = GenTron(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    raw = model.state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in raw.items()}
    meta = {"kind": "t2v" if temporal else "t2i", "text_encoder": "tiny-clip+t5", "latent_space": "pixel",
            "resolution": SIZE, "num_frames": FRAMES if temporal else None, "dataset": "shapes"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": raw, "ema": ema, "optimizer": {}, "step": step, "rng": {}, "data": {"index": 0},
                "config": dataclasses.asdict(cfg), "meta": meta, "args": {"size": "tiny"}}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: one thread avoids OpenMP spin-waits when the 2 CPU cores are shared (10x faster here)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    make_checkpoint(str(d / "t2i" / "ckpt-0000005"), step=5, seed=1)  # older: must not be picked
    make_checkpoint(str(d / "t2i" / "ckpt-0000010"), step=10)
    make_checkpoint(str(d / "t2v" / "ckpt-0000010"), temporal=True)
    return {"t2i": str(d / "t2i"), "t2v": str(d / "t2v")}


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_load_run_dir_picks_newest_and_ema(ckpts):
    model, meta = pipeline.load_model(ckpts["t2i"])
    assert meta["step"] == 10 and meta["ckpt"].endswith("ckpt-0000010") and meta["kind"] == "t2i"
    ckpt = torch.load(meta["ckpt"], weights_only=True)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ckpt["ema"][k]) for k in sd)  # EMA weights by default
    raw, _ = pipeline.load_model(ckpts["t2i"], ema=False)
    assert all(torch.equal(raw.state_dict()[k], ckpt["model"][k]) for k in sd)
    assert not torch.equal(raw.state_dict()["final_layer.linear.weight"], sd["final_layer.linear.weight"])


def test_cli_images_and_exact_reproduction_from_json(tmp_path):
    out, rep, run = str(tmp_path / "out"), str(tmp_path / "rep"), str(tmp_path / "run")
    make_checkpoint(os.path.join(run, "ckpt-0000010"))
    sample.main(["--ckpt", run, "a red circle to the left of a blue square", "a green square",
                 "--n-per-prompt", "3", "--batch-size", "4", "--steps", "8", "--seed", "7", "--out", out])
    rec = json.load(open(os.path.join(out, "samples.json")))
    assert len(rec["samples"]) == rec["num_samples"] == 6
    s = rec["settings"]
    assert (s["seed"], s["steps"], s["sampler"], s["cfg"], s["batch_size"], s["step"]) == (7, 8, "dpm++2m", 7.5, 4, 10)
    imgs = [read(os.path.join(out, r["file"])) for r in rec["samples"]]
    assert all(x.shape == (SIZE, SIZE, 3) for x in imgs)  # per-sample PNGs are native-resolution pixels
    assert [r["prompt"] for r in rec["samples"]][2:4] == ["a red circle to the left of a blue square", "a green square"]
    assert min(np.abs(imgs[i].astype(int) - imgs[j]).mean() for i in range(6) for j in range(i)) > 1  # all differ
    grid = read(os.path.join(out, "grid.png"))
    assert grid.shape[0] >= 2 * 128 and grid.shape[1] >= 3 * 128  # 2 prompts x 3 samples, upscaled to >= 128 px
    # regenerate sample 5 (second batch) and, separately, the whole run: identical pixels, from the recorded
    # checkpoint file even after training has written a newer one into the run dir
    make_checkpoint(os.path.join(run, "ckpt-0000020"), step=20, seed=5)
    sample.main(["--from-json", os.path.join(out, "samples.json"), "--index", "5", "--out", rep])
    rep_rec = json.load(open(os.path.join(rep, "samples.json")))
    assert [r["index"] for r in rep_rec["samples"]] == [5]
    assert np.array_equal(read(os.path.join(rep, rep_rec["samples"][0]["file"])), imgs[5])
    sample.main(["--from-json", os.path.join(out, "samples.json"), "--out", rep + "2"])
    assert all(np.array_equal(read(os.path.join(rep + "2", r["file"])), x) for r, x in zip(rec["samples"], imgs))
    # once the recorded checkpoint is gone (training keeps the newest few), the run dir would give its newest
    # one, another model: refused, not remade silently from it
    os.remove(os.path.join(run, "ckpt-0000010"))
    with pytest.raises(ValueError, match="sampled step 10 .* is step 20: the recorded checkpoint is gone"):
        sample.main(["--from-json", os.path.join(out, "samples.json"), "--out", rep + "3"])


def test_from_json_takes_no_other_settings_and_checks_the_file(ckpts, tmp_path):
    """A replay takes every setting from samples.json: flags that it would ignore are refused, as is --index
    without --from-json; a hand-edited samples.json with values of the wrong type, or sample indices outside
    the run, is named in one line instead of failing deep inside sampling."""
    out = str(tmp_path / "out")
    sample.main(["--ckpt", ckpts["t2i"], "a red circle", "a blue square", "--steps", "2", "--out", out])
    js = os.path.join(out, "samples.json")
    for extra, message in ((["--steps", "3"], "drop --steps"), (["--seed", "9", "--no-ema"], "drop --seed, --no-ema"),
                           (["a green square"], "drop the prompts")):
        with pytest.raises(ValueError, match=message):
            sample.main(["--from-json", js, "--out", str(tmp_path / "r"), *extra])
    with pytest.raises(ValueError, match="--index picks samples of a --from-json replay"):
        sample.main(["--ckpt", ckpts["t2i"], "a red circle", "--index", "0", "--out", str(tmp_path / "r")])
    sample.main(["--from-json", js, "--out", str(tmp_path / "r"), "--device", "cpu"])  # where it runs: allowed
    rec = json.load(open(js))
    for edit, message in (({"steps": "2"}, "steps='2'"), ({"seed": None}, "seed=None"), ({"ema": 1}, "ema=1"),
                          ({"batch_size": True}, "batch_size=True")):
        (tmp_path / "bad.json").write_text(json.dumps({**rec, "settings": {**rec["settings"], **edit}}))
        with pytest.raises(ValueError, match=f"settings of the wrong type: {message}"):
            sample.main(["--from-json", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])
    for samples, message in (([{**rec["samples"][0], "index": -1}], "index -1 outside 0..1"), ([], "no samples")):
        (tmp_path / "bad.json").write_text(json.dumps({**rec, "samples": samples, "num_samples": 2 if samples else 0}))
        with pytest.raises(ValueError, match=message):
            sample.main(["--from-json", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])


def test_sample_noise_does_not_depend_on_batching(ckpts):
    model, meta = pipeline.load_model(ckpts["t2i"])
    prompts = ["a red circle", "a blue square", "a cyan cross"]
    a = pipeline.generate(model, meta, prompts, seed=3, steps=6, batch_size=3, progress=False)
    b = pipeline.generate(model, meta, prompts, seed=3, steps=6, batch_size=1, progress=False)
    c = pipeline.generate(model, meta, prompts[2:], seed=3, steps=6, batch_size=1, first_index=2, progress=False)
    assert a.shape == (3, SIZE, SIZE, 3) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1 and (a == b).float().mean() > 0.99  # up to float rounding
    assert torch.equal(b[2], c[0])  # sample k depends on (seed, k) only
    d = pipeline.generate(model, meta, prompts, seed=4, steps=6, batch_size=3, progress=False)
    assert (a.float() - d.float()).abs().mean() > 5  # another seed, other samples
    for sampler in ("ddim", "ddpm"):
        x = pipeline.generate(model, meta, prompts[:2], sampler=sampler, steps=6, progress=False)
        assert x.shape == (2, SIZE, SIZE, 3)


def test_generate_with_a_training_meta(ckpts):
    # train_t2i.py / experiments call generate on their in-memory model with the checkpoint's plain meta
    ckpt = torch.load(os.path.join(ckpts["t2i"], "ckpt-0000010"), weights_only=True)
    model = GenTron(checkpoint.build_config(ckpt["config"]))
    model.load_state_dict(ckpt["ema"])
    x = pipeline.generate(model.eval(), ckpt["meta"], ["a red circle"], steps=4, progress=False)
    ref, ref_meta = pipeline.load_model(ckpts["t2i"])
    assert torch.equal(x, pipeline.generate(ref, ref_meta, ["a red circle"], steps=4, progress=False))


def test_video_outputs(ckpts, tmp_path):
    out = str(tmp_path / "vid")
    sample.main(["--ckpt", ckpts["t2v"], "--video", "a red circle moving right", "a blue square moving up",
                 "--steps", "6", "--out", out])
    rec = json.load(open(os.path.join(out, "samples.json")))
    assert rec["settings"]["video"] and rec["settings"]["mfg"] == 1.2
    for r in rec["samples"]:
        strip = read(os.path.join(out, r["file"]))
        assert strip.shape == (SIZE, FRAMES * SIZE, 3)  # frames left to right, native pixels
        gif = Image.open(os.path.join(out, r["gif"]))
        side = SIZE * -(-128 // SIZE)  # nearest-neighbour upscale by a whole factor to >= 128 px
        assert gif.size == (side, side) and gif.n_frames >= 1 and gif.info["duration"] == 250  # 4 fps
        try:
            import imageio_ffmpeg
        except ImportError:
            continue
        frames = list(imageio_ffmpeg.read_frames(os.path.join(out, r["mp4"])))
        assert len(frames) - 1 == FRAMES  # read_frames yields a metadata dict first
    assert read(os.path.join(out, "grid.png")).shape[0] >= 2 * 128  # one strip per row


def test_mfg_one_is_plain_cfg_and_mfg_matters(ckpts):
    # generate() skips the third pass of Eq. 6 when lambda_M = 1: check that this shortcut is exact
    model, meta = pipeline.load_model(ckpts["t2v"])
    enc = meta["encoder"]
    tok, mask, pooled = enc(["a red circle moving right", "a cyan cross moving up"])
    ntok, nmask, npooled = enc(["", ""])
    cond, null = dict(text=tok, text_mask=mask, pooled=pooled), dict(text=ntok, text_mask=nmask, pooled=npooled)
    x, t = torch.randn(2, FRAMES, 3, SIZE, SIZE), torch.tensor([500, 900])
    eq6 = guided_eps_fn(model, cond, null, 7.5, 1.0)(x, t)
    cfg = guided_eps_fn(model, cond, null, 7.5, None)(x, t)
    torch.testing.assert_close(eq6, cfg, atol=1e-5, rtol=1e-5)
    a = pipeline.generate(model, meta, ["a red circle moving right"], steps=6, mfg=1.0, progress=False)
    b = pipeline.generate(model, meta, ["a red circle moving right"], steps=6, mfg=1.3, progress=False)
    assert a.shape == (1, FRAMES, SIZE, SIZE, 3) and (a.float() - b.float()).abs().mean() > 0.5
    img = pipeline.generate(model, meta, ["a red circle"], steps=6, video=False, progress=False)
    assert img.shape == (1, SIZE, SIZE, 3)  # images from a T2V model: the one-frame, motion-free path


def test_export_roundtrip(ckpts, tmp_path):
    path = str(tmp_path / "toy.safetensors")
    size = checkpoint.export(ckpts["t2i"], path)
    model, meta = pipeline.load_model(path)
    ref, ref_meta = pipeline.load_model(ckpts["t2i"])
    assert size == os.path.getsize(path) < 1.2 * 4 * sum(p.numel() for p in model.parameters())  # fp32 + header
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert meta["step"] == 10 and meta["config"] == ref_meta["config"] and meta["kind"] == "t2i"
    x = pipeline.generate(model, meta, ["a red circle"], steps=4, progress=False)
    assert torch.equal(x, pipeline.generate(ref, ref_meta, ["a red circle"], steps=4, progress=False))
    half = str(tmp_path / "toy16.safetensors")
    assert checkpoint.export(ckpts["t2i"], half, "fp16") < 0.6 * size
    with pytest.raises(ValueError, match="EMA weights only"):
        pipeline.load_model(path, ema=False)


def test_clear_errors(ckpts, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="text-to-image checkpoint .* T2V checkpoint"):
        pipeline.load_model(ckpts["t2i"], video=True)
    with pytest.raises(FileNotFoundError, match="no ckpt"):
        pipeline.load_model(str(tmp_path))
    monkeypatch.setitem(pipeline.BUNDLED, "t2i", os.path.join("assets", "missing_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="train_t2i.py"):
        sample.main(["a red circle"])
    with pytest.raises(ValueError, match="at least one prompt"):
        sample.main(["--ckpt", ckpts["t2i"]])
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        sample.main(["--ckpt", ckpts["t2i"], "a red circle", "  "])
    for flag in ("--batch-size", "--n-per-prompt"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
            sample.main(["--ckpt", ckpts["t2i"], "a red circle", flag, "0", "--out", str(tmp_path / "x")])
    # settings that would fail late (after sampling) or with a traceback are refused before any work
    (tmp_path / "afile").write_text("")
    no_gpu = "cuda:99"  # more GPUs than any machine has
    for argv, message in ((["--seed", "-1"], "--seed must be >= 0"), (["--cfg", "nan"], "--cfg must be a finite"),
                          (["--cfg", "1e30"], r"--cfg must be in \[-100, 100\], got 1e\+30"),
                          (["--mfg", "-150"], r"--mfg must be in \[-100, 100\], got -150"),
                          (["--steps", "0"], r"--steps must be in \[1, 1000\], got 0"),
                          (["--device", "bogus"], "'bogus' is not a device"), (["--device", no_gpu], "CUDA GPUs"),
                          (["--out", str(tmp_path / "afile")], "afile is a file, not a folder"),
                          (["--out", str(tmp_path / "afile" / "sub")], "sub: .*afile is a file, not a folder")):
        with pytest.raises(ValueError, match=message):
            sample.main(["--ckpt", ckpts["t2i"], "a red circle", "--out", str(tmp_path / "x"), *argv])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a samples.json written by sample.py"):
        sample.main(["--from-json", str(tmp_path / "bad.json")])
    # the command line turns it into one line on stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpts["t2i"], "--video", "x"],
                       capture_output=True, text=True, cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
    assert "text-to-image" in r.stderr


def test_earlier_runs_are_never_overwritten(ckpts, tmp_path, monkeypatch):
    """A second run with the default --out writes out-2/ (the first run's files and samples.json stay); an --out
    that holds an earlier run, or regenerating a samples.json into its own folder, is refused. A prompt file's
    UTF-8 byte-order mark is not part of its first prompt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_bytes("\ufeffa red circle\r\na blue square\r\n".encode("utf-8"))
    base = ["--ckpt", ckpts["t2i"], "--steps", "2"]
    sample.main([*base, "--prompts", "p.txt"])
    first = json.load(open("out/samples.json"))
    assert [r["prompt"] for r in first["samples"]] == ["a red circle", "a blue square"]
    png = open("out/" + first["samples"][0]["file"], "rb").read()
    sample.main([*base, "--seed", "5", "a red circle"])
    assert json.load(open("out/samples.json")) == first and open("out/" + first["samples"][0]["file"], "rb").read() == png
    assert json.load(open("out-2/samples.json"))["settings"]["seed"] == 5
    with pytest.raises(ValueError, match="--out out holds an earlier run"):
        sample.main([*base, "a red circle", "--out", "out"])
    with pytest.raises(ValueError, match="holds an earlier run"):
        sample.main(["--from-json", "out/samples.json", "--index", "0", "--out", "out/"])
    sample.main(["--from-json", "out/samples.json", "--index", "0"])  # default: out/from_json
    assert json.load(open("out/from_json/samples.json"))["samples"][0]["prompt"] == "a red circle"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["t2i", "t2v"])
def test_cuda_graph_sampling_is_bit_identical_to_eager(ckpts, kind):
    # fastpath.sampling.CUDAGraphStep replays the eager step's kernels: the same samples, from 2 + 1 Python calls of the model
    # per batch shape (warm-up, capture) instead of one per step; batches 2, 2, 1: the 2nd batch of 2 reuses the
    # first one's graph with its own captions copied in
    model, meta = pipeline.load_model(ckpts[kind], device="cuda")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    prompts = ["a red circle moving right", "a cyan cross", "a blue square moving up", "a green circle", "a cross"]
    run = lambda graph: pipeline.generate(model, meta, prompts, steps=4, batch_size=2, progress=False, cuda_graph=graph)
    eager = run(False)
    assert len(calls) == 3 * 4
    graphed = run(True)
    assert len(calls) == 3 * 4 + 2 * 3
    assert torch.equal(graphed, eager) and eager.float().std() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_that_syncs_fails_with_a_clear_error():
    from model import TextContext

    def syncs(x, t, context, motion_free=None):  # .item() waits for the GPU: a CUDA graph cannot record that
        return x * context.pooled.sum().item()
    step = fastpath.sampling.CUDAGraphStep(syncs)
    context = TextContext(torch.ones(2, 3, device="cuda"), None, None, None)
    for _ in range(2):  # and again on the next call, not the allocator's complaint about the failed recording
        with pytest.raises(RuntimeError, match="sample.py --eager"):
            step(torch.ones(2, 4, device="cuda"), torch.zeros(2, device="cuda"), context)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_passes_out_of_memory_through():
    # running out of memory while recording stays torch.cuda.OutOfMemoryError (bench.py --max-batch relies on it)
    from model import TextContext

    def grows(x, t, context, motion_free=None):  # fits eagerly; asks for 4 PiB while recording
        return x + torch.zeros(1 << 50 if torch.cuda.is_current_stream_capturing() else 1, device="cuda").sum()
    context = TextContext(torch.ones(2, 3, device="cuda"), None, None, None)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fastpath.sampling.CUDAGraphStep(grows)(torch.ones(2, 4, device="cuda"), torch.zeros(2, device="cuda"), context)


def test_guidance_scales_are_bounded():
    """Beyond |100| (or non-finite) a guidance scale is refused in one line before any work; above 20 it warns
    (samples saturate); the paper's 7.5 and negative scales (guiding away from a prompt) pass silently."""
    import warnings

    from pipeline import check_guidance
    with pytest.raises(ValueError, match=r"^cfg must be in \[-100, 100\], got 1e\+30 \(beyond it"):
        pipeline.generate(None, {}, ["a red circle"], cfg=1e30)  # refused before the model is touched
    with pytest.raises(ValueError, match="mfg must be a finite number, got inf"):
        check_guidance(float("inf"), "mfg")
    for scale in (25.0, -100.0):  # allowed, with a warning
        with pytest.warns(UserWarning, match=f"cfg {scale:g} is far outside the usual 1-15"):
            check_guidance(scale, "cfg", warn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (7.5, 1.2, -3.0, 20.0):
            check_guidance(scale, "cfg", warn=True)
