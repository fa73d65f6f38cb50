"""A run after its model folders moved: --text-encoder / --latent-space on sample.py, evaluate.py and --resume,
checked against the recorded shapes; encoders with missing weights refused; the VAE's scaling, channels and
downsampling read from its config (CPU, offline, ~30 s)."""
import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest
import torch

import cache
import checkpoint
import latents
import pipeline
import sample
import train_t2i
from latents import PixelSpace
from synthetic import ShapesDataset
from text_encoders import load_text_encoder, tiny_tokenizers

PROMPTS = ["a red circle", "a blue square"]


class FakeVAE(torch.nn.Module):
    """AutoencoderKL-shaped stand-in with a diffusers-style config: 'latent' = every 2**k-th pixel, C channels."""

    def __init__(self, **config):
        super().__init__()
        self.config = {"scaling_factor": 0.18215, "latent_channels": 4, "block_out_channels": [8, 8, 8, 8], **config}
        self.k = 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x):
        c = self.config["latent_channels"]
        mean = x[:, :, :: self.k, :: self.k].repeat(1, -(-c // 3), 1, 1)[:, :c]  # (B, C, H/k, W/k): RGBRGB..
        return type("O", (), {"latent_dist": type("D", (), {"mean": mean})()})()

    def decode(self, z):
        return type("O", (), {"sample": z[:, :3].repeat_interleave(self.k, 2).repeat_interleave(self.k, 3)})()


def save_tiny_clip(path, projection=True, seed=0):
    """A tiny random CLIP text model with the tiny encoders' real tokenizer, saved as a local folder; 77
    positions, as the CLIP a 'clip=PATH' spec reads (77 tokens, text_encoders.HUB)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizers()[0]
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, projection_dim=16,
                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id))
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A tiny run (and its export) trained with the CLIP in models/clip, then models/ moved to moved/."""
    d = tmp_path_factory.mktemp("portable")
    old = "clip=" + save_tiny_clip(d / "models" / "clip")
    ref = load_text_encoder(old)(PROMPTS)
    run = d / "run"
    train_t2i.main(["--size", "tiny", "--batch-size", "4", "--max-steps", "2", "--ckpt-every", "2", "--log-every", "1",
                    "--num-samples", "0", "--eval-n", "0", "--device", "cpu", "--out", str(run), "--text-encoder", old])
    export = d / "model.safetensors"
    sample.main(["--ckpt", str(run), "--export", str(export)])
    shutil.move(d / "models", d / "moved")
    return {"dir": d, "run": str(run), "export": str(export), "new": f"clip={d / 'moved' / 'clip'}", "ref": ref}


def test_moved_encoder_needs_the_override_and_samples_with_it(moved):
    # the recorded path is gone: one line that says which flag takes the new one
    with pytest.raises(FileNotFoundError, match="if it moved, pass its new path, e.g. --text-encoder") as e:
        pipeline.load_model(moved["run"])
    assert "\n" not in str(e.value)
    # the override: the same features as the recorded encoder (the same files), and meta records what was used
    model, meta = pipeline.load_model(moved["run"], text_encoder=moved["new"])
    assert meta["text_encoder"] == moved["new"]
    assert all(torch.equal(a, b) for a, b in zip(meta["encoder"](PROMPTS), moved["ref"]))
    # sample.py on the export, and a --from-json replay that takes the recorded (moved) encoder
    out = moved["dir"] / "samples"
    sample.main(["--ckpt", moved["export"], "--text-encoder", moved["new"], "--steps", "2", "--out", str(out),
                 "--device", "cpu", *PROMPTS])
    rec = json.load(open(out / "samples.json"))
    assert rec["settings"]["text_encoder"] == moved["new"] and rec["settings"]["latent_space"] == "pixel"
    sample.main(["--from-json", str(out / "samples.json"), "--out", str(moved["dir"] / "again")])
    rec2 = json.load(open(moved["dir"] / "again" / "samples.json"))
    assert rec2["settings"]["text_encoder"] == moved["new"]


def test_override_of_other_shapes_is_one_line(moved):
    # the bundled tiny-clip: 64 channels where the model reads the run's CLIP's 32
    with pytest.raises(ValueError, match="text_dim=64, pooled_dim=64; the model was trained with text_dim=32, "
                                         "pooled_dim=16") as e:
        pipeline.load_model(moved["run"], text_encoder="tiny-clip")
    assert "\n" not in str(e.value)
    # a VAE's 4 channels at 1/8 where the model was trained on 3 pixel channels at 1/1
    with pytest.raises(ValueError, match="gives 4 channels at 1/8 size; the model was trained on 3 at 1/1"):
        pipeline.check_parts({"text_dim": 64, "pooled_dim": 64, "in_channels": 3, "input_size": 32}, 32,
                             load_text_encoder("tiny-clip"), latents.SDVAE("my/vae", vae=FakeVAE()))


def test_resume_takes_a_moved_encoder(moved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(moved["run"], run)
    argv = ["--size", "tiny", "--batch-size", "4", "--log-every", "1", "--num-samples", "0", "--eval-n", "0",
            "--device", "cpu", "--out", str(run), "--resume"]
    with pytest.raises(ValueError, match="text_dim=64"):  # the shapes are checked
        train_t2i.main([*argv, "--max-steps", "3", "--text-encoder", "tiny-clip"])
    # (tiny-clip's 64 channels against the run's 32)
    train_t2i.main([*argv, "--max-steps", "3", "--ckpt-every", "3", "--text-encoder", moved["new"]])
    ckpt = checkpoint.load_checkpoint(str(run / "ckpt-0000003"), weights=False)
    assert ckpt["step"] == 3 and ckpt["meta"]["text_encoder"] == moved["new"]  # the run now records the new path


def test_a_run_on_a_cache_resumes_with_its_encoder_moved(tmp_path):
    # the cache and the run record /old/clip; after a move, --text-encoder /new/clip is the same encoder: the run
    # resumes (the null caption of caption dropout is encoded from there) and records the new path
    old = save_tiny_clip(tmp_path / "old" / "clip")
    cache.build_cache(ShapesDataset(length=8), tmp_path / "cache", load_text_encoder(f"clip={old}"), PixelSpace(),
                      progress=False)
    run = tmp_path / "run"
    argv = ["--size", "tiny", "--batch-size", "4", "--log-every", "1", "--num-samples", "0", "--eval-n", "0",
            "--device", "cpu", "--data", str(tmp_path / "cache"), "--out", str(run), "--ckpt-every", "2"]
    full = train_t2i.main([*argv[:-2], "--out", str(tmp_path / "full"), "--max-steps", "4"])["loss"]
    first = train_t2i.main([*argv, "--max-steps", "2"])["loss"]
    new = str(tmp_path / "new" / "clip")
    shutil.move(tmp_path / "old", tmp_path / "new")
    with pytest.raises(OSError, match="old/clip"):  # the recorded folder is gone: said, with its path
        train_t2i.main([*argv, "--max-steps", "4", "--resume"])
    with pytest.raises(ValueError, match="made with --text-encoder clip="):  # another encoder is not this one
        train_t2i.main([*argv, "--max-steps", "4", "--resume", "--text-encoder", "tiny-clip+t5"])
    second = train_t2i.main([*argv, "--max-steps", "4", "--resume", "--text-encoder", f"clip={new}"])["loss"]
    assert first + second == full  # bit for bit: the same features and the same null caption
    state = checkpoint.load_checkpoint(str(run / "ckpt-0000004"), weights=False)
    assert state["meta"]["text_encoder"] == f"clip={new}"


def test_clip_without_projection_is_refused(tmp_path):
    # a CLIP saved as CLIPTextModel has no text_projection; from_pretrained would fill it with random weights
    save_tiny_clip(tmp_path, projection=False)
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) of CLIPTextModelWithProjection \(e.g. "
                                         r"text_projection.weight\); .* save a CLIPTextModelWithProjection") as e:
        load_text_encoder(f"clip={tmp_path}")
    assert "\n" not in str(e.value)


def test_vae_layout_comes_from_its_config():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    sdxl = latents.SDVAE("sdxl", vae=FakeVAE(scaling_factor=0.13025))  # SDXL's VAE: 4 channels, /8, 0.13025
    assert (sdxl.channels, sdxl.downsample) == (4, 8)
    assert torch.equal(sdxl.encode(x), x[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4] * 0.13025)
    # a 16-channel VAE with a shift (SD3's config); 3 down blocks: /4. z = (mean - shift) * scale
    sd3 = latents.SDVAE("sd3", vae=FakeVAE(scaling_factor=1.5305, shift_factor=0.0609, latent_channels=16,
                                        block_out_channels=[8, 8, 8]))
    z = sd3.encode(x)
    assert (sd3.channels, sd3.downsample) == (16, 4) and z.shape == (2, 16, 4, 4)
    torch.testing.assert_close(z, (x[:, :, ::4, ::4].repeat(1, 6, 1, 1)[:, :16] - 0.0609) * 1.5305)
    torch.testing.assert_close(sd3.decode(z), x[:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3))
    # what does not fit is refused in one line
    no_scale = FakeVAE()
    del no_scale.config["scaling_factor"]
    with pytest.raises(ValueError, match="no scaling_factor, latent_channels and block_out_channels"):
        latents.SDVAE("odd", vae=no_scale)
    with pytest.raises(ValueError, match="per channel"):
        latents.SDVAE("playground", vae=FakeVAE(latents_mean=[0.0] * 4, latents_std=[1.0] * 4))


def test_help_names_the_path_flags(capsys):
    for main in (sample.main, train_t2i.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--latent-space" in text and "local folder" in text
