"""Tests for text_encoders.py on the bundled tiny encoders (CPU, offline, a few seconds)."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

from text_encoders import TINY_LENGTH, build_tiny_encoders, load_text_encoder, parse_spec

CAPTIONS = ["a red circle", "a big striped blue square to the left of a small yellow star", "", "Zebra 42!"]


@pytest.fixture(scope="module")
def enc():
    return {s: load_text_encoder(s) for s in ("tiny-clip", "tiny-t5", "tiny-clip+t5")}


def test_deterministic_across_loads(enc):
    # A second, independent from_pretrained load gives bit-identical features.
    again = load_text_encoder("tiny-clip+t5")
    for a, b in zip(enc["tiny-clip+t5"](CAPTIONS), again(CAPTIONS)):
        assert torch.equal(a, b)


def test_shapes_and_frozen(enc):
    e = enc["tiny-clip+t5"]
    tokens, mask, pooled = e(CAPTIONS)
    assert (e.max_length, e.text_dim, e.pooled_dim) == (2 * TINY_LENGTH, 128, 64)
    assert tokens.shape == (4, 64, 128) and mask.shape == (4, 64) and pooled.shape == (4, 64)
    assert tokens.dtype == pooled.dtype == torch.float32 and mask.dtype == torch.bool
    assert not e.training and not any(p.requires_grad for p in e.parameters())
    e.train()  # stays frozen in eval mode
    assert not e.training and not any(m.training for m in e.modules())


def test_mask_counts_real_tokens(enc):
    for spec in ("tiny-clip", "tiny-t5"):
        e = enc[spec]
        tok = e.tokenizers[0]
        counts = [len(tok(c)["input_ids"]) for c in CAPTIONS]  # with BOS/EOS (CLIP) or EOS (T5)
        words = [len(c.split()) for c in CAPTIONS]
        _, mask, _ = e(CAPTIONS)
        assert mask.sum(1).tolist() == counts
        assert mask[:, 0].all() and not mask[:, -1].any()  # left-aligned, padded to max_length
        # Known words are one token each: CLIP adds BOS+EOS, T5 adds EOS.
        assert counts[:3] == [w + (2 if spec == "tiny-clip" else 1) for w in words[:3]]
    # Unseen words split into characters instead of <unk>.
    t5_tok = enc["tiny-t5"].tokenizers[0]
    assert t5_tok.unk_token_id not in t5_tok("Zebra 42!")["input_ids"]


def test_padding_does_not_leak(enc):
    for spec in ("tiny-clip", "tiny-t5"):
        e = enc[spec]
        tok, model = e.tokenizers[0], e.models[0]
        # Unpadded reference: the model on the caption's real tokens only.
        ids = tok(CAPTIONS[0], return_tensors="pt")["input_ids"]
        ref = model(input_ids=ids).last_hidden_state[0]
        tokens, mask, _ = e([CAPTIONS[0], CAPTIONS[1]])
        n = ids.shape[1]
        assert torch.allclose(tokens[0, :n], ref, atol=1e-5)
        assert tokens[0, n:].abs().max() == 0  # padding rows are zeroed
        # Same caption next to a different companion: identical real-token features.
        tokens2, _, pooled2 = e([CAPTIONS[0], CAPTIONS[3]])
        assert torch.allclose(tokens[0], tokens2[0], atol=1e-6)


def test_clip_t5_layout(enc):
    clip, t5, both = enc["tiny-clip"], enc["tiny-t5"], enc["tiny-clip+t5"]
    tc, mc, pc = clip(CAPTIONS)
    tt, mt, pt = t5(CAPTIONS)
    tokens, mask, pooled = both(CAPTIONS)
    Lc, Cc = clip.max_length, clip.text_dim
    assert both.max_length == Lc + t5.max_length and both.text_dim == Cc + t5.text_dim
    # CLIP block: CLIP positions first, CLIP channels; exactly zero elsewhere (and vice versa).
    assert torch.equal(tokens[:, :Lc, :Cc], tc) and torch.equal(tokens[:, Lc:, Cc:], tt)
    assert tokens[:, :Lc, Cc:].abs().max() == 0 and tokens[:, Lc:, :Cc].abs().max() == 0
    assert torch.equal(mask, torch.cat([mc, mt], 1))
    # Pooled comes from CLIP's projected EOS; T5 alone pools by masked mean.
    assert torch.equal(pooled, pc)
    assert torch.allclose(pt, (tt * mt[..., None]).sum(1) / mt.sum(1, keepdim=True), atol=1e-6)
    assert not torch.allclose(pt[0], pt[1])


def test_null_caption(enc):
    tokens, mask, pooled = enc["tiny-clip+t5"](["", "a red circle", ""])
    # "" keeps CLIP's BOS+EOS and T5's EOS: a real, attendable null embedding, the same every time.
    assert mask[0].sum() == 3 and torch.equal(mask[0], mask[2])
    assert torch.equal(tokens[0], tokens[2]) and torch.equal(pooled[0], pooled[2])
    assert not torch.equal(pooled[0], pooled[1]) and torch.isfinite(tokens).all()


def test_hub_spec_offline_raises(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    # Offline with an empty cache: must fail at once with the model's name, never hit the network.
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    for spec, name in (("clip", "openai/clip-vit-large-patch14"), ("t5", "google/flan-t5-xxl")):
        with pytest.raises(FileNotFoundError, match=name) as err:
            load_text_encoder(spec)
        assert "\n" not in str(err.value) and f"{spec}=/path/to/" in str(err.value)  # how to provide it
        assert f"`hf download {name} --local-dir " in str(err.value)  # huggingface_hub's current CLI
    # A local override that is not a saved encoder names the folder.
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_text_encoder(f"clip={tmp_path}")


def test_broken_folder_error_keeps_cause(tmp_path):
    import shutil

    from transformers import CLIPTextModelWithProjection

    from text_encoders import ASSETS

    # A saved encoder whose weights file is cut short: the one-line error names the folder and keeps the
    # underlying exception's own message (what from_pretrained says), not only its type.
    shutil.copytree(os.path.join(ASSETS, "tiny-clip"), tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Exception) as original:
        CLIPTextModelWithProjection.from_pretrained(tmp_path)
    cause = " ".join(str(original.value).split())[:60]
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoder(f"clip={tmp_path}")
    msg = str(err.value)
    assert cause and cause in msg and str(tmp_path) in msg
    assert "\n" not in msg and len(msg) < 500


def test_empty_tokenizer_detected(tmp_path, enc):
    from transformers import CLIPTokenizer

    # A folder whose tokenizer has only special tokens (what v5 can return offline) is refused.
    enc["tiny-clip"].models[0].save_pretrained(tmp_path)
    CLIPTokenizer().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="empty tokenizer"):
        load_text_encoder(f"clip={tmp_path}")


def test_spec_parsing():
    assert [p[0] for p in parse_spec("t5+clip")] == ["clip", "t5"]  # CLIP's block always first
    assert parse_spec("clip=/ckpt/c+t5") == [("clip", "/ckpt/c", 77), ("t5", "google/flan-t5-xxl", 120)]
    for bad in ("foo", "clip+clip", "CLIP", "tiny-clip=/x", ""):
        with pytest.raises(ValueError, match="unknown text encoder spec"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="'clip-t5'"):
        load_text_encoder("clip-t5")


def test_build_is_reproducible(tmp_path, enc):
    # Regenerating from the same seed reproduces the committed assets: same tensors, same tokenizer,
    # same configs (the transformers_version stamp aside).
    import json

    from safetensors.torch import load_file

    from text_encoders import ASSETS

    build_tiny_encoders(tmp_path, seed=0)
    for kind in ("tiny-clip", "tiny-t5"):
        a, b = os.path.join(ASSETS, kind), tmp_path / kind
        wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            ja, jb = json.load(open(os.path.join(a, f))), json.load(open(b / f))
            ja.pop("transformers_version", None), jb.pop("transformers_version", None)
            assert ja == jb, f"{kind}/{f} differs"
        assert os.path.getsize(os.path.join(a, "model.safetensors")) < 2e6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dtypes(enc):
    # On CUDA, T5 runs in bf16 (never fp16) and CLIP stays fp32; outputs are float32 and match CPU.
    cpu = enc["tiny-clip+t5"](CAPTIONS)
    for e in (load_text_encoder("tiny-clip+t5", device="cuda"), load_text_encoder("tiny-clip+t5").to("cuda")):
        assert e.models[0].dtype == torch.float32 and e.models[1].dtype == torch.bfloat16
        out = e(CAPTIONS)
        assert all(o.device.type == "cuda" for o in out) and out[0].dtype == out[2].dtype == torch.float32
        assert torch.equal(out[1].cpu(), cpu[1])
        assert torch.allclose(out[2].cpu(), cpu[2], atol=1e-4)  # pooled from fp32 CLIP
        Lc, Cc = e.lengths[0], e.dims[0]
        t5_err = (out[0][:, Lc:, Cc:].cpu() - cpu[0][:, Lc:, Cc:]).abs().max() / cpu[0][:, Lc:, Cc:].abs().max()
        assert t5_err < 0.05  # bf16 rounding only


def test_memoized_features_match():
    """memoize(): each distinct caption is encoded once and later batches reuse its rows; the features are
    those of plain encoding, and a full memo falls back to plain encoding."""
    plain = load_text_encoder("tiny-clip+t5")
    memo = load_text_encoder("tiny-clip+t5").memoize(max_captions=3)
    a = ["a red circle", "", "a blue square above a green cross", "a red circle"]
    for caps in (a, a[::-1]):
        for x, y in zip(memo(caps), plain(caps)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert len(memo.memo) == 3  # the three distinct captions
    b = ["a white diamond", "a red circle"]  # a fourth caption does not fit: encoded without the memo
    for x, y in zip(memo(b), plain(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert len(memo.memo) == 3


def test_prompts_it_misreads_are_warned_about(enc):
    """Words outside the tiny encoders' vocabulary (spelled letter by letter) and tokens past the limit (cut) each
    give one warning line, naming the words and the vocabulary, or the prompt and how many tokens it loses."""
    import warnings

    from text_encoders import TINY_VOCAB
    e = enc["tiny-clip+t5"]
    assert e.unknown_words("a red circle, above a big blue star.") == []  # known words; punctuation is not a word
    assert e.unknown_words("a zebra next to 42 circles") == ["zebra", "42", "circles"]  # plural: not a known word
    assert e.unknown_words("Red circle") == ["Red"]  # tiny-t5 is case-sensitive: it spells "Red" R-e-d
    with pytest.warns(UserWarning) as rec:
        e.check_prompts(["a zebra next to a giraffe", "a red circle", "a zebra"])
    (msg,) = [str(r.message) for r in rec]
    assert "\n" not in msg and "zebra, giraffe" in msg and " ".join(TINY_VOCAB) in msg
    long = " ".join(["red circle"] * 20)  # 40 words: 42 CLIP tokens with BOS/EOS, 41 T5 tokens with EOS
    assert e.truncated(long) == {"clip": 42 - TINY_LENGTH, "t5": 41 - TINY_LENGTH} and e.truncated("a red circle") == {}
    with pytest.warns(UserWarning) as rec:
        e.check_prompts([long, "a red circle"])
    (msg,) = [str(r.message) for r in rec]
    assert "\n" not in msg and msg.startswith("1 prompt(s) are longer") and "loses 10 token(s) past clip's 32" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e.check_prompts(["a red circle to the left of a blue square", ""])  # nothing to say
