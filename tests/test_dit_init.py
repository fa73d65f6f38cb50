"""--init-from an official DiT checkpoint (dit_weights.py): a state dict in facebookresearch/DiT's key layout, built
by hand at tiny size, lands where it should, and the converted model computes DiT's forward (written out here from
DiT's models.py) exactly."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import train_t2i
from dit_weights import check_dit, convert_dit
from model import GenTron, make_config, sincos_2d
from test_train import load, tiny

D, DEPTH, MLP, HEADS, P, CIN = 64, 2, 256, 4, 2, 4  # GenTron-tiny's widths; DiT's 8 = 2 x 4 output channels


def dit_pos_embed(embed_dim, grid_size):
    """DiT's get_2d_sincos_pos_embed (models.py, from MAE), numpy as there: its own layout, not ours."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(embed_dim // 2, grid[0]), one(embed_dim // 2, grid[1])], axis=1)  # grid[0]: columns
    return torch.from_numpy(emb).float()[None]  # (1, N, D), as DiT saves it


def dit_state_dict(input_size=8, seed=0):
    """A random DiT-shaped state dict in DiT's key layout (learn_sigma: 8 output channels; 1000 classes + null)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)
    sd = {"x_embedder.proj.weight": r(D, CIN, P, P), "x_embedder.proj.bias": r(D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(1001, D), "pos_embed": dit_pos_embed(D, input_size // P)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
               b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "mlp.fc1.weight": r(MLP, D), b + "mlp.fc1.bias": r(MLP),
               b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D),
               b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)}
    sd |= {"final_layer.linear.weight": r(P * P * 2 * CIN, D), "final_layer.linear.bias": r(P * P * 2 * CIN),
           "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    return sd


def dit_forward(sd, x, t):
    """DiT.forward (models.py) in float64 from its state dict, with the class embedding left out (c = t_emb)."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)
    modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"]  # (B, N, D)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    c = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1).double(), "t_embedder.mlp.0")),
            "t_embedder.mlp.2")
    B, N, _ = x.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        q, k, v = lin(modulate(ln(x), shift1, scale1), b + "attn.qkv").reshape(B, N, 3, HEADS, D // HEADS).permute(
            2, 0, 3, 1, 4)  # timm's Attention: (3, B, h, N, Dh)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + gate1[:, None] * lin(a, b + "attn.proj")
        h = lin(modulate(ln(x), shift2, scale2), b + "mlp.fc1")
        x = x + gate2[:, None] * lin(F.gelu(h, approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    x = lin(modulate(ln(x), shift, scale), "final_layer.linear")  # (B, N, p*p*8)
    hw = math.isqrt(N)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(B, hw, hw, P, P, 2 * CIN))
    return x.reshape(B, 2 * CIN, hw * P, hw * P)  # DiT's unpatchify


def tiny_config(**kw):
    return make_config("tiny", in_channels=CIN, input_size=8, text_dim=32, pooled_dim=16, **kw)


def test_dit_weights_land_where_they_should():
    sd, cfg = dit_state_dict(), tiny_config()
    ours, copied = convert_dit(sd, cfg, seed=0)
    # the channel order, found independently: the DiT position channel nearest each of ours, on a 64x64 grid (on a
    # small one the lowest frequencies' channels are nearly constant and alike)
    pos, dits = sincos_2d(64, 64, D, "cpu"), dit_pos_embed(D, 64)[0]
    o = (dits[:, None, :] - pos[:, :, None]).abs().amax(0).argmin(1)  # (D,): ours k -> DiT's o[k]
    assert sorted(o.tolist()) == list(range(D)) and not torch.equal(o, torch.arange(D))  # a true reordering
    expect = {"patch_embed.weight": sd["x_embedder.proj.weight"][o], "patch_embed.bias": sd["x_embedder.proj.bias"][o]}
    expect |= {f"t_embedder.mlp.{k}": sd[f"t_embedder.mlp.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        expect |= {b + "attn.qkv.weight": sd[b + "attn.qkv.weight"][:, o], b + "attn.qkv.bias": sd[b + "attn.qkv.bias"],
                   b + "attn.proj.weight": sd[b + "attn.proj.weight"][o], b + "attn.proj.bias": sd[b + "attn.proj.bias"][o],
                   b + "mlp.fc1.weight": sd[b + "mlp.fc1.weight"][:, o], b + "mlp.fc1.bias": sd[b + "mlp.fc1.bias"],
                   b + "mlp.fc2.weight": sd[b + "mlp.fc2.weight"][o], b + "mlp.fc2.bias": sd[b + "mlp.fc2.bias"][o]}
        for k in ("weight", "bias"):  # shift, scale, gate (x2): each a D-chunk in the residual order
            w = sd[f"{b}adaLN_modulation.1.{k}"]
            expect[f"{b}adaLN_modulation.1.{k}"] = torch.cat([w[j * D:(j + 1) * D][o] for j in range(6)])
    for k in ("weight", "bias"):
        w = sd[f"final_layer.adaLN_modulation.1.{k}"]
        expect[f"final_layer.adaLN_modulation.1.{k}"] = torch.cat([w[:D][o], w[D:][o]])
    # the final layer keeps eps, the first 4 of the 8 channels at each of the p*p positions: rows (p q c), c < 4
    keep = [pq * 2 * CIN + c for pq in range(P * P) for c in range(CIN)]
    expect["final_layer.linear.weight"] = sd["final_layer.linear.weight"][keep][:, o]
    expect["final_layer.linear.bias"] = sd["final_layer.linear.bias"][keep]
    assert sorted(copied) == sorted(expect)
    for k, v in expect.items():
        assert torch.equal(ours[k], v), k
    # everything else is new, and as init_weights leaves it: the cross-attention's output projection zero
    new = set(ours) - set(copied)
    assert new == {k for k in GenTron(cfg).state_dict() if k.startswith(("text_proj", "pooled_embedder"))
                   or ".cross_attn." in k or ".norm2." in k}
    for i in range(DEPTH):
        assert not ours[f"blocks.{i}.cross_attn.proj.weight"].any() and not ours[f"blocks.{i}.cross_attn.proj.bias"].any()


def test_converted_model_computes_dits_forward():
    # The reordering is exact: with the cross-attention branch at 0 (zero output projection) and zero pooled text,
    # GenTron's eps is DiT's first 4 output channels for any caption, on our own position table
    sd, cfg = dit_state_dict(), tiny_config()
    model = GenTron(cfg).double().eval()
    model.load_state_dict(convert_dit(sd, cfg, seed=0)[0])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, CIN, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 250, 999])
    text = torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    out = model(x, t, text, torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 16, dtype=torch.float64))
    ref = dit_forward(sd, x, t)
    assert ref[:, :CIN].abs().mean() > 0.1  # a forward that does something
    # equal up to the position tables' float32 rounding (~1e-6: DiT's saved one, ours computed in forward)
    torch.testing.assert_close(out, ref[:, :CIN], rtol=0, atol=1e-5)
    wrong = {**convert_dit(sd, cfg, seed=0)[0], "patch_embed.weight": sd["x_embedder.proj.weight"].double(),
             "patch_embed.bias": sd["x_embedder.proj.bias"].double()}  # DiT's channel order where ours is expected
    model.load_state_dict(wrong)
    off = model(x, t, text, torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 16, dtype=torch.float64))
    assert (off - ref[:, :CIN]).abs().max() > 1e-2
    model.load_state_dict(convert_dit(sd, cfg, seed=0)[0])
    # the same at another resolution (positions are computed in forward): 16x16 latents vs DiT's table for 8x8
    sd16 = {**sd, "pos_embed": dit_pos_embed(D, 8)}
    x16 = torch.randn(2, CIN, 16, 16, generator=g, dtype=torch.float64)
    out16 = model(x16, t[:2], text[:2], torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.float64))
    torch.testing.assert_close(out16, dit_forward(sd16, x16, t[:2])[:, :CIN], rtol=0, atol=1e-5)


def test_dit_of_another_size_is_refused_in_one_line():
    sd = dit_state_dict()
    with pytest.raises(ValueError, match=r"is a DiT of another size: depth 2 \(this run: 8\), width 64 \(this run: "
                                         r"128\), mlp_width 256 \(this run: 512\)$"):
        check_dit(sd, make_config("toy", in_channels=CIN), "dit.pt")
    with pytest.raises(ValueError, match=r"in_channels 4 \(this run: 3\)"):  # pixel space: DiT works in latents
        check_dit(sd, make_config("tiny", in_channels=3), "dit.pt")
    with pytest.raises(ValueError, match="not DiT's fixed sin-cos table"):
        check_dit({**sd, "pos_embed": sd["pos_embed"].flip(-1)}, tiny_config(), "dit.pt")


def test_train_t2i_starts_from_a_dit_checkpoint(tmp_path, capsys):
    # --data bench: SD-VAE-shaped 4-channel latents (32 px -> 4x4) and CLIP+T5-shaped text, nothing downloaded
    sd = dit_state_dict()
    torch.save(sd, tmp_path / "DiT-tiny.pt")  # a plain state dict, as the official release
    path = str(tmp_path / "DiT-tiny.pt")
    assert checkpoint.stored_settings(path) == (
        {"depth": 2, "width": 64, "mlp_width": 256, "patch": 2, "in_channels": 4, "input_size": 8},
        {"latent_space": "sd-vae", "prediction": "eps"})
    train_t2i.main(tiny(tmp_path / "run", 1, "--data", "bench", "--resolution", "32", "--init-from", path))
    out = capsys.readouterr().out
    assert f"init from DiT {path}: " in out and "class table and sigma channels dropped" in out
    ckpt = load(tmp_path / "run" / "ckpt-0000001")
    assert ckpt["meta"]["latent_space"] == "sd-vae" and ckpt["meta"]["prediction"] == "eps"
    assert ckpt["config"]["patch"] == 2
    o = torch.cat([torch.arange(i * 16, (i + 1) * 16) for i in (3, 2, 1, 0)])
    # one step of EMA 0.9999 away from the converted weights
    torch.testing.assert_close(ckpt["ema"]["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"][o],
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="is a DiT of another size: depth 2 \\(this run: 8\\)"):
        train_t2i.main(tiny(tmp_path / "toy", 1, "--size", "toy", "--data", "bench", "--resolution", "32",
                            "--init-from", path))
