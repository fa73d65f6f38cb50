"""evaluate.py: the oracle is validated on ground-truth renders (>= 99%) and on noise (near chance); the
CompBench / CLIP code paths run with tiny random BLIP, CLIP and OWL-ViT models saved locally (CPU, offline)."""
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
import oracle
from synthetic import CATEGORIES, COLORS, DIRECTIONS, SHAPES, detect, geometry, heldout_prompts, render
from test_sample import FRAMES, make_checkpoint

N = 100  # prompts per category: 1 error in 100 is still >= 99%


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: avoid OpenMP spin-waits on shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scenes():
    items = [it for c in CATEGORIES for it in heldout_prompts(c, N, seed=1)]
    metas = [m for _, m in items]
    return np.stack([render(m["objects"]) for m in metas]), metas


@pytest.fixture(scope="module")
def clips():
    items = heldout_prompts("motion", N, seed=1)
    metas = [m for _, m in items]
    return np.stack([np.stack([render(objs) for objs in m["frames"]]) for m in metas]), metas


# -----------------------------------------------------------------------------
# oracle validation


def test_detector_is_exact_on_renders(scenes):
    imgs, metas = scenes
    for img, m in zip(imgs, metas):
        got = sorted((d["color"], d["shape"], d["x"], d["y"], d["r"]) for d in detect(img))
        assert got == sorted((o["color"], o["shape"], o["x"], o["y"], o["r"]) for o in m["objects"])


def test_oracle_on_ground_truth_renders(scenes, clips):
    s = oracle.score_images(*scenes)
    assert s["n"] == {c: N for c in CATEGORIES}
    for k in ("single", "color", "shape", "spatial", "overall", "object_recall", "colors_placed"):
        assert s[k] >= 0.99, (k, s[k])
    v = oracle.score_videos(*clips)
    assert v["n"] == N and min(v["frame_attribute"], v["direction"], v["consistency"]) >= 0.99, v
    assert "Texture" in oracle.oracle_table(s) and "-" in oracle.oracle_table(s).splitlines()[-1].split()


def test_oracle_robust_to_pixel_noise(scenes):
    imgs, metas = scenes
    rng = np.random.default_rng(0)
    noisy = np.clip(imgs + rng.normal(0, 40, imgs.shape), 0, 255).astype(np.uint8)  # strong per-pixel noise
    salt = imgs.copy()
    hit = rng.random(imgs.shape[:3]) < 0.03  # 3% of pixels replaced by random colours
    salt[hit] = rng.integers(0, 256, (hit.sum(), 3))
    for x in (noisy, salt):
        s = oracle.score_images(x, metas)
        assert min(s[c] for c in CATEGORIES) >= 0.98, s


def test_oracle_catches_binding_and_relation_errors(scenes, clips):
    imgs, metas = scenes
    swapped, moved = [], []
    for m in metas:
        objs = [dict(o) for o in m["objects"]]
        if m["category"] in ("color", "shape"):  # swap colours (shapes): a red circle + a blue square ->
            key, other = m["category"], {"color": "shape", "shape": "color"}[m["category"]]  # blue circle + red square
            if objs[0][other] != objs[1][other]:  # (with equal shapes the swap changes nothing)
                objs[0][key], objs[1][key] = objs[1][key], objs[0][key]
                swapped.append((render(objs), m))
        if m["category"] == "spatial":  # swap the positions: every relation is reversed
            for k in ("x", "y"):
                objs[0][k], objs[1][k] = objs[1][k], objs[0][k]
            moved.append((render(objs), m))
    s = oracle.score_images(np.stack([x for x, _ in swapped]), [m for _, m in swapped])
    assert len(swapped) > N and s["color"] == s["shape"] == 0.0 and s["object_recall"] == 0.0
    assert s["colors_placed"] == 1.0  # the diagnostic ignores shapes: every swapped render still places both colours
    s = oracle.score_images(np.stack([x for x, _ in moved]), [m for _, m in moved])
    assert s["spatial"] == 0.0 and s["object_recall"] == 1.0  # right objects, wrong places
    videos, vmetas = clips
    rev = oracle.score_videos(videos[:, ::-1], vmetas)  # played backwards: the opposite direction
    assert rev["direction"] == 0.0 and rev["frame_attribute"] == rev["consistency"] == 1.0
    still = oracle.score_videos(np.repeat(videos[:, :1], videos.shape[1], axis=1), vmetas)  # no motion at all
    assert still["direction"] == 0.0 and still["consistency"] == 1.0


def random_blobs(rng, n, size=32):
    """Images of 1-3 ellipses / rectangles of palette colours, random sizes and places (not shapes of the data)."""
    pal = np.array(list(COLORS.values()), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.zeros((n, size, size, 3), np.uint8)
    for img in out:
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(4, size - 4, 2)
            a, b = rng.uniform(2, 8, 2)
            blob = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1 if rng.random() < 0.5 else \
                (abs(xx - cx) < a) & (abs(yy - cy) < b)
            img[blob] = pal[rng.integers(len(pal))]
    return out


def random_scenes(rng, n, size=32):
    """Renders of two random objects from the whole 8 x 5 vocabulary: the oracle's chance level by construction."""
    r_min, r_max, _, _ = geometry(size)
    out = []
    for _ in range(n):
        objs = []
        for _ in range(2):
            r = int(rng.integers(r_min, r_max + 1))
            objs.append({"color": list(COLORS)[rng.integers(len(COLORS))], "shape": SHAPES[rng.integers(len(SHAPES))],
                         "x": int(rng.integers(r, size - r + 1)), "y": int(rng.integers(r, size - r + 1)), "r": r})
        out.append(render(objs))
    return np.stack(out)


def test_oracle_near_chance_on_noise(scenes, clips):
    # Chance (module docstring): single 2.5% per object in the scene (~5% with two); two-object categories ~0.1%.
    _, metas = scenes
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, (len(metas) // 4, 32, 32, 3), dtype=np.uint8)  # 25 per category
    s = oracle.score_images(uniform, metas[::4])
    assert all(s[c] == 0.0 for c in CATEGORIES), s  # no object-like blob in uniform noise
    for x in (random_blobs(rng, len(metas)), random_scenes(rng, len(metas))):
        s = oracle.score_images(x, metas)
        assert s["single"] <= 0.10 and max(s["color"], s["shape"], s["spatial"]) <= 0.02, s
        assert s["colors_placed"] <= 0.08, s  # two given colours out of 8 on two random objects: ~3%
    # videos: frames drawn independently (blobs) or uniform noise; direction chance is 25%
    videos, vmetas = clips
    T = videos.shape[1]
    v = oracle.score_videos(random_blobs(rng, len(vmetas) * T).reshape(len(vmetas), T, 32, 32, 3), vmetas)
    assert v["frame_attribute"] <= 0.06 and v["direction"] <= 0.35 and v["consistency"] <= 0.1, v
    v = oracle.score_videos(rng.integers(0, 256, (20, T, 32, 32, 3), dtype=np.uint8), vmetas[:20])
    assert v["frame_attribute"] == v["direction"] == v["consistency"] == 0.0, v


def test_oracle_eval_runs_generation(tmp_path):
    from pipeline import load_model

    model, meta = load_model(make_checkpoint(str(tmp_path / "r" / "ckpt-0000001")))
    s = oracle.oracle_eval(model, meta, n_per_category=2, steps=3, progress=False)
    assert s["n"] == {c: 2 for c in CATEGORIES} and s["settings"]["kind"] == "t2i" and s["settings"]["steps"] == 3
    # each prompt is scored against its own scene: a "model" that draws exactly the scene its prompt describes
    # scores 100% in every category (a prompt paired with another prompt's scene would fail the oracle)
    import pipeline
    scenes = {p: m for c in CATEGORIES for p, m in heldout_prompts(c, 4, seed=1)}
    exact = lambda model, meta, prompts, **kw: torch.from_numpy(np.stack([render(scenes[p]["objects"])
                                                                          for p in prompts]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "generate", exact)
        perfect = oracle.oracle_eval(model, meta, n_per_category=4, seed=1, progress=False)
    assert all(perfect[c] == 1.0 for c in CATEGORIES) and perfect["n"] == {c: 4 for c in CATEGORIES}, perfect
    # and what else the scores depend on: which weights (EMA or raw), and the batch (DDPM's noise is per batch)
    assert s["settings"]["ema"] is True and s["settings"]["batch_size"] == 64
    vmodel, vmeta = load_model(make_checkpoint(str(tmp_path / "v" / "ckpt-0000001"), temporal=True))
    out = str(tmp_path / "oracle.json")
    evaluate.main(["--oracle", "--video", "--ckpt", str(tmp_path / "v"), "--n", "2", "--steps", "3", "--json", out])
    v = json.load(open(out))
    assert v["n"] == 2 and set(v) >= {"frame_attribute", "direction", "consistency"}
    assert v["settings"]["mfg"] == 1.2 and v["settings"]["frames"] == 4


def test_attention_logits_cli(tmp_path):
    # The attention-logit table of docs/bundled-models.md ("Why QK-norm") comes from this command: one value per
    # block and attention kind, and the T2V model's temporal layers too (the properties of the measure itself:
    # test_model.py)
    make_checkpoint(str(tmp_path / "v" / "ckpt-0000001"), temporal=True)
    out = str(tmp_path / "logits.json")
    evaluate.main(["--attention-logits", "--video", "--ckpt", str(tmp_path / "v"), "--n", "3", "--json", out])
    v = json.load(open(out))
    depth = torch.load(str(tmp_path / "v" / "ckpt-0000001"), weights_only=True)["config"]["depth"]
    assert {k: len(x) for k, x in v.items()} == {"self": depth, "cross": depth, "temporal": depth}
    assert all(0 < x < 1e6 for xs in v.values() for x in xs)


def test_counts_below_one_are_usage_errors(capsys):
    for argv in (["--oracle", "--n", "0"], ["--attention-logits", "--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2 and f"error: {argv[1]} must be >= 1, got 0" in capsys.readouterr().err
    # the settings sample.py checks, before any model loads
    for argv, message in ((["--cfg", "nan"], "--cfg must be a finite number"), (["--device", "foo"], "is not a device"),
                          (["--device", "cuda:99"], "CUDA GPUs"), (["--steps", "0"], "--steps must be in [1, 1000]"),
                          (["--json", __file__], "exists: choose another path"),  # never replaced
                          (["--json", f"{__file__}/s.json"], f"--json {__file__}: {__file__} is a file")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--oracle", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# T2I-CompBench protocol pieces


def test_noun_phrases_and_spatial_parsing():
    assert metrics.noun_phrases("A green bench and a red car.") == ["a green bench", "a red car"]
    assert metrics.noun_phrases("a bathroom with green tile and a red shower curtain") == \
        ["a bathroom", "green tile", "a red shower curtain"]
    assert metrics.noun_phrases("a bird on the left of a dog") == ["a bird", "a dog"]
    assert metrics.spatial_objects("a bird on the left of a dog") == ("on the left of", "bird", "dog")
    assert metrics.spatial_objects("a wooden chair near a sofa and a lamp") == ("near", "chair", "sofa")
    assert metrics.spatial_objects("a red car") == (None, None, None)
    # CompBench's complex category puts verbs before the spatial words: the noun is the hat, not "was"
    assert metrics.spatial_objects("The red hat was on top of the brown coat rack.") == ("on top of", "hat", "rack")
    assert metrics.spatial_objects("a book is sitting next to the lamp") == ("next to", "book", "lamp")


def test_determine_position_matches_compbench_rule():
    a, b = (0, 0, 10, 10), (20, 2, 30, 12)  # b right of a, no overlap
    assert metrics.determine_position("on the left of", a, b) == 1.0
    assert metrics.determine_position("on the right of", a, b) == 0.0
    assert metrics.determine_position("on the right of", b, a) == 1.0
    assert metrics.determine_position("on the top of", a, (2, 20, 12, 30)) == 1.0  # y grows downwards
    assert metrics.determine_position("on the bottom of", (2, 20, 12, 30), a) == 1.0
    c = (5, 0, 15, 10)  # overlapping, IoU = 50 / 150 = 1/3 >= 0.1 -> 0.1 / IoU
    assert metrics.determine_position("on the left of", a, c) == pytest.approx(0.3)
    assert metrics.determine_position("near", a, (400, 400, 410, 410)) == pytest.approx(150 / 400)
    assert metrics.determine_position("near", a, b) == 1.0


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Tiny random BLIP-VQA, CLIP and OWL-ViT with real tokenizers/processors, saved like hub models."""
    from transformers import (BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor,
                              BlipProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor)
    from text_encoders import tiny_tokenizers

    d = tmp_path_factory.mktemp("hf")
    words = "a an and the of on left right top bottom next to near red green blue bench car dog bird".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "?", "."] + words
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")  # BLIP's answer decoder starts at [DEC]
    clip_tok = tiny_tokenizers()[0]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32)
    clip_text = dict(text, vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                     eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    torch.manual_seed(0)
    models = {
        "blip": (BlipForQuestionAnswering(BlipConfig(vision_config=vision, text_config=dict(
            text, vocab_size=len(vocab), encoder_hidden_size=32, bos_token_id=bert.bos_token_id, pad_token_id=0,
            sep_token_id=bert.sep_token_id))),
            BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=bert)),
        "clip": (CLIPModel(CLIPConfig(text_config=clip_text, vision_config=vision, projection_dim=16)),
                 CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=clip_tok)),
        "owl": (OwlViTForObjectDetection(OwlViTConfig(text_config=clip_text, vision_config=vision, projection_dim=32)),
                OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": 32, "width": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                                tokenizer=clip_tok)),
    }
    for name, (model, processor) in models.items():
        model.save_pretrained(str(d / name))
        processor.save_pretrained(str(d / name))
    return {k: str(d / k) for k in models}


def pil_images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_blip_vqa_is_product_over_noun_phrases(hf_models):
    model, proc = metrics.load_hf("BlipForQuestionAnswering", hf_models["blip"])
    imgs = pil_images(2)
    prompts = ["a red bench and a green car", "a blue dog"]
    s = metrics.blip_vqa_scores(imgs, prompts, model, proc)
    p = metrics.blip_yes_prob(model, proc, [imgs[0], imgs[0], imgs[1]], ["a red bench?", "a green car?", "a blue dog?"])
    assert all(0 <= v <= 1 for v in s)
    assert s == pytest.approx([float(p[0] * p[1]), float(p[2])], rel=1e-4)


def clip_reference(model, proc, images, texts):
    """(cosine of image i with text i, normalised image embeddings) from CLIPModel's own forward pass, whose logits
    are logit_scale * cosine: a path independent of metrics.clip_embed."""
    with torch.no_grad():
        out = model(**proc(text=texts, images=images, return_tensors="pt", padding=True, truncation=True))
    return out.logits_per_image.diagonal() / model.logit_scale.exp(), out.image_embeds


def test_clip_scores_and_frame_consistency(hf_models, monkeypatch):
    model, proc = metrics.load_hf("CLIPModel", hf_models["clip"])
    imgs, texts = pil_images(4), ["a red car", "a dog", "a bird", "a bench"]
    s = metrics.clip_score(imgs, texts, model, proc)
    cos, emb = clip_reference(model, proc, imgs, texts)
    assert s == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-3) and len(set(s)) == 4
    static, changing = [imgs[0]] * 4, imgs
    c = metrics.frame_consistency([static, changing], model, proc)
    assert c[0] == pytest.approx(100, abs=1e-3)
    assert c[1] == pytest.approx(100 * float((emb[1:] * emb[:-1]).sum(-1).mean()), abs=1e-3) and c[1] < 99
    monkeypatch.setattr(metrics, "clip_cosine", lambda *args: torch.tensor([-0.25, 0.5]))  # Hessel et al.: max(cos, 0)
    assert metrics.clip_score(None, None, model, proc) == [0.0, 50.0]


def test_compbench_end_to_end(hf_models, tmp_path, monkeypatch):
    from pipeline import load_model

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    files = {"color": ["a red bench and a green car"], "shape": ["a round bird and a square car"],
             "spatial": ["a bird on the left of a dog", "a car on the top of a bench"],
             "non_spatial": ["a dog chasing a bird"], "complex": ["the red car is near a green bench"]}
    for cat, lines in files.items():
        (prompts / metrics.COMPBENCH[cat]).write_text("\n".join(lines) + "\n")
    model, meta = load_model(make_checkpoint(str(tmp_path / "r" / "ckpt-0000001")))
    images = str(tmp_path / "images")
    metrics.compbench_generate(model, meta, str(prompts), images, list(files), n_per_prompt=2, steps=2, progress=False)
    names = sorted(os.listdir(os.path.join(images, "spatial", "samples")))  # CompBench's {prompt}_{index:06d}.png
    assert len(names) == 4 and names[-1] == "a car on the top of a bench_000003.png"
    s = metrics.compbench(str(prompts), images, list(files), blip=hf_models["blip"], clip=hf_models["clip"],
                     detector=hf_models["owl"])
    assert set(s) == set(files) | {"mean"}
    assert all(np.isfinite(s[c]) for c in files), s  # every category scored (an empty one would be nan)
    assert s["mean"] == pytest.approx(np.mean([s[c] for c in files]))
    table = evaluate.compbench_table(s)
    assert "Non-spatial" in table and table.splitlines()[-1].split()[2] == "-"  # no texture prompts given
    # the command line scores the same folder to the same numbers
    evaluate.main(["--compbench", str(prompts), "--images", images, "--categories", "color,spatial",
             "--blip", hf_models["blip"], "--detector", hf_models["owl"]])
    cli = json.load(open(os.path.join(images, "compbench.json")))
    assert cli["color"] == pytest.approx(s["color"]) and cli["spatial"] == pytest.approx(s["spatial"])
    # a missing prompt file is found before any image is made
    with pytest.raises(FileNotFoundError, match="texture_val.txt does not exist"):
        metrics.compbench_generate(model, meta, str(prompts), str(tmp_path / "new"), ["color", "texture"], steps=2)
    assert not os.path.exists(tmp_path / "new")
    # a killed run, run again with its settings, makes only what is missing, and the same images
    spatial = os.path.join(images, "spatial", "samples")
    before = {n: np.asarray(Image.open(os.path.join(spatial, n))) for n in names}
    os.remove(os.path.join(spatial, names[-1]))
    import pipeline
    made, generate = [], pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda model, meta, prompts, **kw: made.append(prompts) or
                        generate(model, meta, prompts, **kw))
    metrics.compbench_generate(model, meta, str(prompts), images, list(files), n_per_prompt=2, steps=2,
                               progress=False)
    assert made == [[p for p in files["spatial"] for _ in range(2)]]  # the one batch with the missing image
    assert sorted(os.listdir(spatial)) == names
    for n in names:
        assert np.array_equal(np.asarray(Image.open(os.path.join(spatial, n))), before[n])
    # other settings, or images of another run, are refused before any work (they would be scored together)
    with pytest.raises(ValueError, match=r"other settings: steps 2 \(now 3\)"):
        metrics.compbench_generate(model, meta, str(prompts), images, list(files), n_per_prompt=2, steps=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(spatial, "a dog_000009.png"))
    with pytest.raises(FileExistsError, match=r"already holds images of another run \(a dog_000009.png\)"):
        metrics.compbench_generate(model, meta, str(prompts), images, list(files), n_per_prompt=2, steps=2)
    os.remove(os.path.join(spatial, "a dog_000009.png"))
    # a missing or empty category folder is found before the first model loads, not after the others are scored
    os.makedirs(os.path.join(images, "texture", "samples"))
    for cats, error, message in ((["color", "shape2"], FileNotFoundError, "no images folder"),
                                 (["color", "texture"], ValueError, "no .png / .jpg images")):
        with pytest.raises(error, match=message):
            metrics.compbench(str(prompts), images, cats, blip="/nonexistent", clip="/nonexistent", detector="/nonexistent")


def test_fid_needs_torch_fidelity(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install 'torch-fidelity"):
        metrics.fid(str(tmp_path), str(tmp_path))


def test_fid_brings_folders_of_mixed_sizes_to_one(tmp_path, monkeypatch):
    """Reference folders (COCO) mix image sizes, which torch-fidelity cannot stack unless asked to resize:
    fid() asks for the shorter side at Inception's 299 and a centre crop (torch-fidelity >= 0.4)."""
    import types
    seen = {}
    fake = types.SimpleNamespace(calculate_metrics=lambda **kw: seen.update(kw) or {"frechet_inception_distance": 1.5})
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    assert metrics.fid(str(tmp_path), str(tmp_path)) == {"fid": 1.5}
    assert seen["samples_resize_and_crop"] == 299 and seen["fid"]
    # a sample.py video folder is scored frame by frame: its strips are split, not resized whole
    strip = np.concatenate([np.full((8, 8, 3), 30 * k, np.uint8) for k in range(4)], axis=1)  # 4 frames of 8x8
    Image.fromarray(strip).save(tmp_path / "0000_clip.png")
    rec = {"settings": {"video": True}, "samples": [{"file": "0000_clip.png"}]}
    (tmp_path / "samples.json").write_text(json.dumps(rec))
    frames = {}
    fake.calculate_metrics = lambda **kw: frames.update({f: np.asarray(Image.open(os.path.join(kw["input1"], f)))
                                                         for f in os.listdir(kw["input1"])}) or {"frechet_inception_distance": 2.0}
    assert metrics.fid(str(tmp_path), str(tmp_path)) == {"fid": 2.0}
    assert sorted(frames) == [f"0000_clip_{k:02d}.png" for k in range(4)]
    assert all(a.shape == (8, 8, 3) and (a == 30 * k).all() for k, a in enumerate(frames[f] for f in sorted(frames)))


def test_fid_inception_weights_from_a_local_file(tmp_path, monkeypatch, capsys):
    """Offline machines point FID at a local copy of torch-fidelity's Inception weights (--inception-weights):
    the path reaches calculate_metrics; a missing file is a one-line error before anything loads; a failed
    download names the flag."""
    import types
    import urllib.error
    seen = {}
    fake = types.SimpleNamespace(calculate_metrics=lambda **kw: seen.update(kw) or {"frechet_inception_distance": 3.0})
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not read by the fake")
    evaluate.main(["--fid", str(tmp_path), "--ref", str(tmp_path), "--inception-weights", str(weights),
                   "--device", "cpu", "--json", str(tmp_path / "scores" / "fid.json")])
    assert seen["feature_extractor_weights_path"] == str(weights)
    assert seen["feature_extractor"] == "inception-v3-compat"  # the network those weights belong to
    assert json.loads((tmp_path / "scores" / "fid.json").read_text()) == {"fid": 3.0}
    capsys.readouterr()
    # no flag: torch-fidelity fetches its own weights (None)
    assert metrics.fid(str(tmp_path), str(tmp_path)) == {"fid": 3.0} and seen["feature_extractor_weights_path"] is None
    # a missing file: one line (FileNotFoundError, which `python evaluate.py` prints as `error: ...`), checked
    # before torch-fidelity is even imported; the flag without --fid is a usage error
    missing = str(tmp_path / "nope.pth")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(FileNotFoundError, match=f"^--inception-weights {missing} is not a file") as e:
        evaluate.main(["--fid", str(tmp_path), "--ref", str(tmp_path), "--inception-weights", missing])
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--oracle", "--inception-weights", str(weights)])
    assert e.value.code == 2 and capsys.readouterr().err.endswith("error: --inception-weights is for --fid\n")

    # offline without the flag: torch.hub's download error becomes one line naming the flag
    def offline(**kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    fake.calculate_metrics = offline
    with pytest.raises(OSError, match="could not download the Inception weights.*--inception-weights PATH") as e:
        metrics.fid(str(tmp_path), str(tmp_path))
    assert "\n" not in str(e.value) and metrics.INCEPTION_URL in str(e.value)


def test_experiments_score_only_runs_of_the_requested_length(tmp_path):
    """An arm whose folder holds a finished run is scored, not retrained; a shorter run there with no record of
    the flags it was started with (a --smoke run in the same --out) is refused, not resumed or scored as this
    call's arm."""
    import experiments
    out = tmp_path / "t2i-cross-attn-s0"
    assert not experiments.finished(str(out), 2500)
    out.mkdir()
    (out / "ckpt-0000020").write_bytes(b"")
    assert experiments.finished(str(out), 20)
    with pytest.raises(SystemExit, match="holds a run of 20 steps but this call trains 2500"):
        experiments.finished(str(out), 2500)


def test_experiments_refuse_bad_settings_before_training(tmp_path, capsys):
    """Settings that would fail or score nothing after hours of training are usage errors before the first arm."""
    import experiments
    experiments.check_args(experiments.p.parse_args(["--out", str(tmp_path)]))  # the defaults pass
    for argv, message in ((["--n-eval", "0"], "--n-eval must be >= 1, got 0"),
                          (["--device", "foo"], "'foo' is not a device"),
                          (["--mfg", "1", "nan"], "--mfg must be a finite number, got nan"),
                          (["--t2v-cfg", "inf"], "--t2v-cfg must be a finite number, got inf"),
                          (["--t2v-lr", "nan"], "--t2v-lr must be > 0, got nan")):
        with pytest.raises(SystemExit) as e:
            experiments.check_args(experiments.p.parse_args(["--out", str(tmp_path / "x"), *argv]))
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_experiments_keep_every_calls_settings(tmp_path, monkeypatch):
    """A second call into the same --out (e.g. docs/experiments.md's second seed) adds its flags; the first
    call's, which made the rows already there, stay."""
    import experiments
    monkeypatch.setattr(experiments, "phase_t2i", lambda args, results, t0: experiments.write(results, args, t0))
    for seed in ("0", "1"):
        experiments.main(experiments.p.parse_args(["--out", str(tmp_path), "--phase", "t2i", "--seeds", seed,
                                                   "--device", "cpu"]))
    r = json.load(open(tmp_path / "results.json"))
    assert r["settings"]["t2i"]["seeds"] == [0] and [c["seeds"] for c in r["calls"]] == [[0], [1]]


def test_experiments_score_the_no_motion_free_arm_with_plain_cfg(tmp_path, monkeypatch):
    """Eq. 6 above lambda_M = 1 needs the motion-free prediction e(0, 0), which a p_mf = 0 model never trained on: that
    arm is scored at lambda_M = 1 (plain CFG) alone, the p_mf = 0.5 arm at every --mfg (finished runs: no training)."""
    import experiments
    scored = []
    monkeypatch.setattr(experiments, "finished", lambda out, steps: True)
    monkeypatch.setattr(experiments, "load_model", lambda out, **kw: (out, {}))
    monkeypatch.setattr(experiments, "oracle_eval", lambda model, meta, mfg, **kw: scored.append((model, mfg)) or {})
    monkeypatch.setattr(experiments, "write", lambda *a: None)
    args = experiments.p.parse_args(["--out", str(tmp_path), "--phase", "t2v", "--mfg", "1.0", "1.2"])
    results = {}
    experiments.phase_t2v(args, results, time.time(), "parent.safetensors")
    arms = [(r["arm"], r["mfg"]) for r in results["t2v"]]
    assert arms == [("MFG (p_mf=0.5)", 1.0), ("MFG (p_mf=0.5)", 1.2), ("no motion-free (p_mf=0)", 1.0)]
    assert [m for _, m in scored] == [1.0, 1.2, 1.0] and scored[2][0].endswith("t2v-no-motion-free-p-mf-0")


def test_clip_score_of_sample_folders(hf_models, tmp_path):
    import sample

    runs = {k: make_checkpoint(str(tmp_path / k / "ckpt-0000001"), temporal=k == "t2v") for k in ("t2i", "t2v")}
    sample.main(["--ckpt", runs["t2i"], "a red circle", "a blue square", "--steps", "2", "--out", str(tmp_path / "i")])
    sample.main(["--ckpt", runs["t2v"], "--video", "a red circle moving up", "--steps", "2",
                 "--out", str(tmp_path / "v")])
    model, proc = metrics.load_hf("CLIPModel", hf_models["clip"])

    def listed(folder):  # the samples.json records: (prompt, the PNG as an array)
        recs = json.load(open(folder / "samples.json"))["samples"]
        return [(r["prompt"], np.asarray(Image.open(folder / r["file"]).convert("RGB"))) for r in recs]

    evaluate.main(["--clip-score", str(tmp_path / "i"), "--clip", hf_models["clip"]])
    s = json.load(open(tmp_path / "i" / "clip_score.json"))
    (p0, a0), (p1, a1) = listed(tmp_path / "i")
    cos, _ = clip_reference(model, proc, [Image.fromarray(a0), Image.fromarray(a1)], [p0, p1])
    assert s["n"] == 2 and s["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-3)
    evaluate.main(["--clip-score", str(tmp_path / "v"), "--clip", hf_models["clip"]])
    v = json.load(open(tmp_path / "v" / "clip_score.json"))
    [(prompt, strip)] = listed(tmp_path / "v")  # the clip's frames side by side
    frames = [Image.fromarray(f) for f in np.split(strip, strip.shape[1] // strip.shape[0], axis=1)]
    cos, emb = clip_reference(model, proc, frames, [prompt] * len(frames))
    assert v["n"] == 1 and len(frames) == FRAMES > 1
    assert v["clip_score_per_frame"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-3)
    assert v["frame_consistency"] == pytest.approx(100 * float((emb[1:] * emb[:-1]).sum(-1).mean()), abs=1e-3)
    evaluate.main(["--clip-score", str(tmp_path / "v"), "--clip", hf_models["clip"]])  # again: the first file stays
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "samples.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a samples.json written by sample.py"):
        evaluate.main(["--clip-score", str(tmp_path / "bad"), "--clip", hf_models["clip"]])
    assert json.load(open(tmp_path / "v" / "clip_score-2.json")) == v == json.load(open(tmp_path / "v" / "clip_score.json"))
