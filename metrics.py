"""
The paper's real-model metrics (evaluate.py is their command line): T2I-CompBench (Huang et al. 2023; Sec. 4.2,
Tables 2-3) through transformers - BLIP-VQA attribute binding, the detector's spatial rule, CLIP for non-spatial
and the 3-in-1 complex score; see `compbench` for where it deviates from the original code (UniDet, spaCy) -
and CLIP score, frame consistency and FID (Table 4).
"""

import json
import os
import re
import textwrap

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


BLIP_VQA = "Salesforce/blip-vqa-base"  # CompBench's attribute-binding model (BLIP VQA, ViT-B)
CLIP_B32 = "openai/clip-vit-base-patch32"  # CompBench's non-spatial CLIPScore model
CLIP_L14 = "openai/clip-vit-large-patch14"  # the usual CLIP score model (torchmetrics' default)
DETECTOR = "google/owlvit-base-patch32"  # open-vocabulary stand-in for UniDet
# torch-fidelity's FID network (inception-v3-compat: TF-FID's Inception); fetched once unless --inception-weights
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
COMPBENCH = {"color": "color_val.txt", "shape": "shape_val.txt", "texture": "texture_val.txt",
             "spatial": "spatial_val.txt", "non_spatial": "non_spatial_val.txt", "complex": "complex_val.txt"}
# CompBench's spatial vocabulary, searched in this order (UniDet_eval/determine_position_for_eval.py)
SPATIAL_WORDS = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of",
                 "on the top of", "on top of")
SEPARATORS = r"\s*(?:,|;|\band\b|\bwith\b|\bis\b|\bare\b|\bon\b|\bin\b|\bof\b|\bnext to\b|\bnear\b)\s*"


def load_hf(cls_name, name, device="cpu"):
    """transformers model class `cls_name` + AutoProcessor from a hub name or a local save_pretrained folder."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(name)
        model = getattr(transformers, cls_name).from_pretrained(name)
    except Exception as e:  # offline / not cached / wrong folder: keep the cause, on one line
        cause = textwrap.shorten(f"{type(e).__name__}: {e}", 200)
        raise FileNotFoundError(f"could not load {name!r} as {cls_name} ({cause}); download it once with "
                                f"`hf download {name} --local-dir DIR` and pass DIR") from None
    return model.to(device).eval().requires_grad_(False), processor


def noun_phrases(prompt):
    """Noun phrases to ask BLIP about. CompBench uses spaCy noun_chunks; this rule splits on "and", "with",
    commas, copulas, prepositions and the spatial words instead ("a green bench and a red car" -> ["a green
    bench", "a red car"]); it keeps a verb phrase whole ("a man riding a horse") where spaCy would split it."""
    text = prompt.lower().strip().rstrip(".")
    for w in sorted(SPATIAL_WORDS, key=len, reverse=True):
        text = text.replace(f" {w} ", " , ")
    parts = [p.strip(" .") for p in re.split(SEPARATORS, text)]
    return [p for p in parts if p and p not in ("top", "the side", "the left", "the right", "the top", "the bottom")]


@torch.no_grad()
def blip_yes_prob(model, processor, images, questions):
    """BLIP-VQA P(yes) / (P(yes) + P(no)) of the first answer token, as CompBench's vqa_prob."""
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    device = next(model.parameters()).device
    inputs = processor(images=images, text=questions, return_tensors="pt", padding=True).to(device)
    image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state  # (B, N, D)
    q = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           encoder_hidden_states=image_embeds).last_hidden_state  # (B, L, D)
    bos = torch.full((len(images), 1), model.decoder_start_token_id, device=device)
    logits = model.text_decoder(input_ids=bos, encoder_hidden_states=q,
                                encoder_attention_mask=inputs["attention_mask"]).logits[:, 0]  # (B, vocab)
    p = logits.float().softmax(-1)
    return (p[:, yes] / (p[:, yes] + p[:, no])).cpu()


def blip_vqa_scores(images, prompts, model, processor, batch_size=32):
    """Attribute binding (CompBench BLIP-VQA): per image, the product over the prompt's noun phrases of the
    yes-probability of the question "{noun phrase}?"."""
    questions = [(i, f"{np_}?") for i, p in enumerate(prompts) for np_ in noun_phrases(p)]
    scores = torch.ones(len(images))
    for b in tqdm(range(0, len(questions), batch_size), desc="blip-vqa", leave=False):
        chunk = questions[b : b + batch_size]
        p = blip_yes_prob(model, processor, [images[i] for i, _ in chunk], [q for _, q in chunk])
        for (i, _), v in zip(chunk, p):
            scores[i] *= v
    return scores.tolist()


@torch.no_grad()
def clip_embed(model, processor, images=None, texts=None, batch_size=64):
    """L2-normalised CLIP embeddings of PIL images or of texts -> (N, D)."""
    device = next(model.parameters()).device
    out = []
    items = images if images is not None else texts
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        if images is not None:
            x = processor(images=chunk, return_tensors="pt").to(device)
            e = model.get_image_features(pixel_values=x["pixel_values"])
        else:
            x = processor(text=chunk, return_tensors="pt", padding=True, truncation=True).to(device)
            e = model.get_text_features(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        e = e if torch.is_tensor(e) else e.pooler_output  # transformers v5 returns an output object
        out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu())
    return torch.cat(out)


def clip_cosine(images, texts, model, processor):
    """Cosine similarity of CLIP image and text embeddings, one pair per image (CompBench's CLIPScore)."""
    return (clip_embed(model, processor, images=images) * clip_embed(model, processor, texts=texts)).sum(-1)


def clip_score(images, texts, model, processor):
    """CLIP score = 100 * max(cos, 0) per image (Hessel et al. with w = 100, as in Table 4's CLIP-Score)."""
    return (100 * clip_cosine(images, texts, model, processor).clamp(min=0)).tolist()


def frame_consistency(videos, model, processor):
    """Per video: mean cosine (x100) between CLIP image embeddings of consecutive frames."""
    out = []
    for frames in videos:
        e = clip_embed(model, processor, images=list(frames))  # (T, D)
        out.append(float(100 * (e[1:] * e[:-1]).sum(-1).mean()))
    return out


def determine_position(locality, box1, box2, iou_threshold=0.1, distance_threshold=150.0):
    """CompBench's soft spatial score of two (x0, y0, x1, y1) boxes, box1 = the first object of the prompt."""
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    inter = (max(0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
             * max(0, min(box1[3], box2[3]) - max(box1[1], box2[1])))
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
    union = area(box1) + area(box2) - inter
    iou = inter / union if union > 0 else 0.0  # degenerate (zero-area) boxes do not overlap
    if locality in ("next to", "on side of", "near"):
        return 1.0 if abs(dx) < distance_threshold or abs(dy) < distance_threshold else \
            distance_threshold / max(abs(dx), abs(dy))
    # (sign of the main axis, main axis is x?) per relation; "on top of" scored as "on the top of" (see compbench)
    rule = {"on the left of": (1, True), "on the right of": (-1, True), "on the top of": (1, False),
            "on top of": (1, False), "on the bottom of": (-1, False)}.get(locality)
    if rule is None:
        return 0.0
    main, other = (dx, dy) if rule[1] else (dy, dx)
    if main * rule[0] <= 0 or abs(main) <= abs(other):
        return 0.0
    return 1.0 if iou < iou_threshold else iou_threshold / iou


# words that end the phrase before a spatial word without being its noun ("the hat was on top of the rack")
NOT_NOUNS = {"is", "are", "was", "were", "be", "been", "being", "sits", "sit", "sitting", "stands", "standing",
             "lies", "lying", "rests", "resting", "hangs", "hanging", "placed", "located", "positioned", "situated",
             "seated", "perched", "parked", "kept", "put", "set"}


def spatial_objects(prompt):
    """(locality, noun 1, noun 2) of a spatial prompt: CompBench takes the nearest spaCy NOUNs around the spatial
    words; this takes the last word before them that is not a verb of NOT_NOUNS, and the last word of the phrase
    after them."""
    text = prompt.lower().strip().rstrip(".")
    for w in SPATIAL_WORDS:
        if f" {w} " in text:
            left, right = text.split(f" {w} ", 1)
            right = re.split(r"\s*(?:,|\band\b|\bwhile\b|\bwith\b)\s*", right)[0]
            words = [x for x in left.split() if x not in NOT_NOUNS] or left.split()
            return w, words[-1], right.split()[-1]
    return None, None, None


@torch.no_grad()
def spatial_scores(images, prompts, model, processor, threshold=0.1):
    """CompBench's UniDet spatial score with an open-vocabulary detector (OWL-ViT): per noun the highest-scoring
    box; both found -> 0.25 s1 + 0.25 s2 + position / 2; one found -> 0.25 s; then scores < 0.5 -> 0."""
    device = next(model.parameters()).device
    out = []
    for img, prompt in tqdm(list(zip(images, prompts)), desc="spatial", leave=False):
        locality, n1, n2 = spatial_objects(prompt)
        if locality is None:
            out.append(0.0)
            continue
        queries = [[f"a photo of a {n1}", f"a photo of a {n2}"]]  # OWL-ViT's query template
        inputs = processor(text=queries, images=img, return_tensors="pt").to(device)
        res = model(**inputs)
        probs = res.logits[0].float().sigmoid()  # (queries, 2)
        boxes = res.pred_boxes[0].float()  # (queries, 4): normalised (cx, cy, w, h)
        w, h = img.size
        found = []
        for k in range(2):
            i = int(probs[:, k].argmax())
            cx, cy, bw, bh = boxes[i].tolist()
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)  # (x0, y0, x1, y1) px
            found.append((float(probs[i, k]), box))
        (s1, b1), (s2, b2) = found
        if s1 >= threshold and s2 >= threshold:  # distance threshold: CompBench's 150 px at 512 px, scaled
            position = determine_position(locality, b1, b2, distance_threshold=150 * w / 512)
            score = 0.25 * s1 + 0.25 * s2 + position / 2
        else:
            score = 0.25 * s1 if s1 >= threshold else 0.25 * s2 if s2 >= threshold else 0.0
        out.append(score if score >= 0.5 else 0.0)
    return out


def read_prompt_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CompBench prompt file {path} does not exist")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first prompt
        return [line.strip() for line in f if line.strip()]


def compbench_generate(model, meta, prompt_dir, image_dir, categories, n_per_prompt=10, max_prompts=None, **kw):
    """Write image_dir/{category}/samples/{prompt}_{k:06d}.png - the layout CompBench's own scripts read. Every
    prompt file is read first; each batch is written as it is made, so a killed run, run again with the same
    settings (image_dir/generation.json), makes only the images still missing: the same images (sample i's noise
    seed depends on i alone). Other settings, or images of another run in a folder, are refused before any work."""
    from checkpoint import atomic_write, write_json
    from pipeline import generate

    prompts = {cat: read_prompt_file(os.path.join(prompt_dir, COMPBENCH[cat]))[:max_prompts] for cat in categories}
    flat = {cat: [p for p in prompts[cat] for _ in range(n_per_prompt)] for cat in categories}
    names = {cat: [f"{p.replace('/', ' ')}_{k:06d}.png" for k, p in enumerate(flat[cat])] for cat in categories}
    settings = {"ckpt": meta.get("ckpt"), "step": meta.get("step"), "n_per_prompt": n_per_prompt,
                "max_prompts": max_prompts, **{k: v for k, v in kw.items() if k not in ("progress", "cuda_graph")}}
    record = os.path.join(image_dir, "generation.json")
    if os.path.exists(record):
        with open(record) as f:
            had = json.load(f)
        diff = [f"{k} {had.get(k)} (now {v})" for k, v in settings.items() if had.get(k) != v]
        if diff:
            raise ValueError(f"{image_dir} holds a generation with other settings: {', '.join(diff)}; finish it "
                             "with its settings, or generate into an empty --images folder")
    for cat in categories:  # images that this generation would not write: another run's, scored together otherwise
        d = os.path.join(image_dir, cat, "samples")
        other = sorted(set(images_in(d)) - set(names[cat] if os.path.exists(record) else []))
        if other:
            raise FileExistsError(f"{d} already holds images of another run ({other[0]}); generate into an empty "
                                  "--images folder")
    os.makedirs(image_dir, exist_ok=True)
    write_json(record, settings)
    bs = kw.get("batch_size", 16)
    for cat in categories:
        d = os.path.join(image_dir, cat, "samples")
        os.makedirs(d, exist_ok=True)
        for b0 in range(0, len(flat[cat]), bs):
            batch = names[cat][b0 : b0 + bs]
            if all(os.path.exists(os.path.join(d, n)) for n in batch):  # made by the run that was killed
                continue
            x = generate(model, meta, flat[cat][b0 : b0 + bs], video=False, first_index=b0, **kw).numpy()
            for name, img in zip(batch, x):  # atomic: a kill never leaves a truncated image to be scored
                atomic_write(os.path.join(d, name), lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def images_in(d):
    """Names of the .png / .jpg files in folder d ([] if there is no such folder)."""
    return [f for f in os.listdir(d) if f.lower().endswith((".png", ".jpg"))] if os.path.isdir(d) else []


def sample_files(d):
    """The images of a CompBench samples folder, in index order; a missing or empty folder is an error."""
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no images folder {d}; generate it with --ckpt (see --help)")
    files = sorted(images_in(d), key=lambda f: int(os.path.splitext(f)[0].rsplit("_", 1)[-1]))
    if not files:
        raise ValueError(f"no .png / .jpg images in {d}")
    return files


def read_samples(d):
    """Images of a CompBench samples folder, in index order -> (PIL images, prompts from the file names)."""
    files = sample_files(d)
    return [Image.open(os.path.join(d, f)).convert("RGB") for f in files], [f.rsplit("_", 1)[0] for f in files]


def compbench(prompt_dir, image_dir, categories=tuple(COMPBENCH), device="cpu", blip=BLIP_VQA, clip=CLIP_B32,
              detector=DETECTOR):
    """T2I-CompBench scores (fractions) of image_dir/{category}/samples for each category.

    color / shape / texture: BLIP-VQA; spatial: detector + CompBench's position rule; non_spatial: CLIP
    cosine (ViT-B/32); complex: CompBench's 3-in-1, the mean of BLIP-VQA, spatial and CLIP (over the two that
    apply when complex_val_spatial.txt / complex_val_action.txt are in prompt_dir). Deviations from the
    original: BLIP and CLIP through transformers (BLIP at its processor's 384 px, not 480 px); OWL-ViT instead
    of UniDet for spatial (per-noun best box, threshold 0.1; 150 px distance rule scaled to the image size);
    rule-based noun phrases instead of spaCy (noun_phrases, spatial_objects); "on top of" scored like "on the
    top of" (CompBench returns 0 for it); complex keeps adjectives in the CLIP text (CompBench drops them)."""
    for cat in categories:  # every folder before the first model loads: a missing one fails now, not after hours
        sample_files(os.path.join(image_dir, cat, "samples"))
    need = set(categories)
    models = {}
    if need & {"color", "shape", "texture", "complex"}:
        models["blip"] = load_hf("BlipForQuestionAnswering", blip, device)
    if need & {"non_spatial", "complex"}:
        models["clip"] = load_hf("CLIPModel", clip, device)
    if need & {"spatial", "complex"}:
        models["det"] = load_hf("OwlViTForObjectDetection", detector, device)
    out = {}
    for cat in categories:
        images, prompts = read_samples(os.path.join(image_dir, cat, "samples"))
        if cat in ("color", "shape", "texture"):
            s = blip_vqa_scores(images, prompts, *models["blip"])
        elif cat == "spatial":
            s = spatial_scores(images, prompts, *models["det"])
        elif cat == "non_spatial":
            s = clip_cosine(images, prompts, *models["clip"]).tolist()
        else:  # complex: 3-in-1
            parts = np.array([blip_vqa_scores(images, prompts, *models["blip"]),
                              spatial_scores(images, prompts, *models["det"]),
                              clip_cosine(images, prompts, *models["clip"]).tolist()])  # (3, N)
            s = parts.mean(0)
            sp, ac = (os.path.join(prompt_dir, f"complex_val_{k}.txt") for k in ("spatial", "action"))
            if os.path.isfile(sp) and os.path.isfile(ac):
                norm = lambda p: p.lower().split(".")[0]
                spatial, action = {norm(p) for p in read_prompt_file(sp)}, {norm(p) for p in read_prompt_file(ac)}
                for i, p in enumerate(prompts):
                    if norm(p) in spatial:
                        s[i] = parts[[0, 1], i].mean()
                    elif norm(p) in action:
                        s[i] = parts[[0, 2], i].mean()
            s = s.tolist()
        out[cat] = float(np.mean(s))
    cols = [c for c in ("color", "shape", "texture", "spatial", "non_spatial", "complex") if c in out]
    out["mean"] = float(np.mean([out[c] for c in cols]))
    return out


def read_samples_json(sample_dir, keys=("file", "prompt")):
    """(records, video) of a sample.py output folder's samples.json, each record with `keys` and its file there."""
    path = os.path.join(sample_dir, "samples.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a sample.py output folder holds one")
    try:
        with open(path) as f:
            rec = json.load(f)
        recs, video = rec["samples"], bool(rec["settings"].get("video"))
        for r in recs:
            if not all(isinstance(r[k], str) for k in keys):
                raise TypeError(f"a record without text for {' / '.join(keys)}")
            if not os.path.isfile(os.path.join(sample_dir, r["file"])):
                raise ValueError(f"no file {r['file']}")
        if not recs:
            raise ValueError("no samples")
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # ValueError: not JSON
        raise ValueError(f"{path} is not a samples.json written by sample.py ({type(e).__name__}: {e})") from None
    return recs, video


def clip_eval(sample_dir, model_name=CLIP_L14, device="cpu"):
    """CLIP score of a sample.py output folder (its samples.json); for videos also per-frame CLIP score over all
    frames and the frame-to-frame consistency of CLIP image embeddings."""
    recs, _ = read_samples_json(sample_dir)
    model, processor = load_hf("CLIPModel", model_name, device)
    prompts = [r["prompt"] for r in recs]
    arrays = [np.asarray(Image.open(os.path.join(sample_dir, r["file"])).convert("RGB")) for r in recs]
    if "gif" not in recs[0]:
        images = [Image.fromarray(a) for a in arrays]
        return {"clip_score": float(np.mean(clip_score(images, prompts, model, processor))), "n": len(recs)}
    videos = [[Image.fromarray(f) for f in np.split(a, a.shape[1] // a.shape[0], axis=1)] for a in arrays]  # strips
    frames = [f for v in videos for f in v]
    texts = [p for p, v in zip(prompts, videos) for _ in v]
    multi = [v for v in videos if len(v) > 1]  # one-frame clips have no consecutive frames to compare
    return {"clip_score_per_frame": float(np.mean(clip_score(frames, texts, model, processor))),
            "frame_consistency": float(np.mean(frame_consistency(multi, model, processor))) if multi else None,
            "n": len(recs)}


def fid(gen_dir, ref_dir, device="cpu", inception_weights=None):
    """FID between two image folders with torch-fidelity (optional). A sample.py folder contributes only the
    samples its samples.json lists (not grid.png); of a video run, every frame of every clip (frame FID).
    `inception_weights`: a local copy of INCEPTION_URL, for machines without internet access."""
    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise FileNotFoundError(f"--inception-weights {inception_weights} is not a file "
                                f"(a copy of {INCEPTION_URL})")
    try:
        import torch_fidelity
    except ImportError:
        raise ImportError("FID needs `pip install 'torch-fidelity>=0.4'` (it fetches Inception weights once, "
                          "or give a local copy with --inception-weights PATH)") from None
    import tempfile
    import urllib.error

    for d in (gen_dir, ref_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"image folder {d} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(os.path.join(gen_dir, "samples.json")):
            recs, video = read_samples_json(gen_dir, keys=("file",))
            for r in recs:
                src = os.path.join(gen_dir, r["file"])
                if not video:
                    os.symlink(os.path.abspath(src), os.path.join(tmp, r["file"]))
                    continue
                strip = np.asarray(Image.open(src).convert("RGB"))  # frames side by side: split them
                for k, frame in enumerate(np.split(strip, strip.shape[1] // strip.shape[0], axis=1)):
                    Image.fromarray(frame).save(os.path.join(tmp, f"{r['file'][:-4]}_{k:02d}.png"))
            gen_dir = tmp
        # reference folders (COCO) mix image sizes: resize the shorter side to Inception's 299 and crop the centre
        try:  # the extractor named explicitly: it is the network the weights file belongs to
            m = torch_fidelity.calculate_metrics(input1=gen_dir, input2=ref_dir, cuda=str(device).startswith("cuda"),
                                                 fid=True, verbose=False, samples_resize_and_crop=299,
                                                 feature_extractor="inception-v3-compat",
                                                 feature_extractor_weights_path=inception_weights)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # offline: torch.hub could not fetch
            if inception_weights is not None:
                raise
            cause = textwrap.shorten(f"{type(e).__name__}: {e}", 200)
            raise OSError(f"FID could not download the Inception weights ({cause}); download {INCEPTION_URL} "
                          f"once and pass --inception-weights PATH") from None
    return {"fid": float(m["frechet_inception_distance"])}
