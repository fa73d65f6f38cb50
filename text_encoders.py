"""
Frozen text encoders for GenTron (paper Sec. 3.2.1, "Text encoder model"; Table 2 compares them): CLIP-L, Flan-T5-XXL and
CLIP+T5, plus tiny randomly initialised stand-ins with real tokenizers for offline tests and the toy run.

    enc = load_text_encoder("clip+t5", device="cuda")
    tokens, mask, pooled = enc(["a red circle", ""])   # "" = null caption for classifier-free guidance

Specs: "clip", "t5", "clip+t5" (hub models) and "tiny-clip", "tiny-t5", "tiny-clip+t5" (bundled in
assets/text_encoders/). A part may name a local folder instead of the hub: "clip=/ckpt/clip-l+t5=/ckpt/flan-t5-xxl".
Shapes: B captions, L tokens (always padded to max_length), C = text_dim channels, P = pooled_dim.
"""
import math
import os
import string
import textwrap
import warnings

import torch
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "text_encoders")
# kind -> (hub name, max tokens). 77 is CLIP's context; the paper gives no T5 length, 120 follows PixArt-alpha.
HUB = {"clip": ("openai/clip-vit-large-patch14", 77), "t5": ("google/flan-t5-xxl", 120)}

# -----------------------------------------------------------------------------
# spec parsing and loading


def parse_spec(spec: str) -> list[tuple[str, str, int | None]]:
    """'tiny-clip+t5' / 'clip=/path+t5' -> [(kind, name_or_path, max_length or None = read from tokenizer)]."""
    tiny = spec.startswith("tiny-")
    parts = {}
    for part in spec.removeprefix("tiny-").split("+"):
        kind, _, path = part.partition("=")
        kind = kind.removeprefix("tiny-")
        if kind not in HUB or kind in parts or (tiny and path):
            raise ValueError(f"unknown text encoder spec {spec!r}: use clip, t5, clip+t5, tiny-clip, tiny-t5, "
                             "tiny-clip+t5, or kind=/local/path parts such as clip=/ckpt/clip+t5=/ckpt/t5")
        if tiny:
            parts[kind] = (kind, os.path.join(ASSETS, f"tiny-{kind}"), None)  # length stored in the tokenizer
        else:
            parts[kind] = (kind, path or HUB[kind][0], HUB[kind][1])
    return [parts[k] for k in ("clip", "t5") if k in parts]  # CLIP's block always comes first


def looks_like_path(name):
    """A local path rather than a hub name ("org/model"): absolute, or starting with ., .. or ~."""
    return os.path.isabs(name) or name.startswith((".", "~"))


def _load_one(kind, name, device):
    """from_pretrained for tokenizer and model; the tiny encoders take exactly this path too."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer
    tok_cls, model_cls = (CLIPTokenizer, CLIPTextModelWithProjection) if kind == "clip" else (T5Tokenizer, T5EncoderModel)
    # T5 runs in bf16 on CUDA and never in fp16: fp16 overflows in T5's feed-forward and gives inf/NaN.
    dtype = torch.bfloat16 if kind == "t5" and torch.device(device).type == "cuda" else torch.float32
    if os.path.isdir(name):  # a local folder: it must hold save_pretrained() files of this kind
        hint = f"expected a {kind} tokenizer and model saved with save_pretrained() in {name}"
    elif looks_like_path(name):  # a folder that is gone: the model folder moved since the run recorded it
        hint = f"no such folder: if it moved, pass its new path, e.g. --text-encoder '{kind}=/new/path'"
    else:
        local = f"/path/to/{name.split('/')[-1]}"
        hint = (f"run once with network access to cache it, or `hf download {name} --local-dir {local}` "
                f"and pass '{kind}={local}'")
    try:
        tok = tok_cls.from_pretrained(name)
        model, info = model_cls.from_pretrained(name, dtype=dtype, output_loading_info=True)
    except Exception as e:  # OSError offline / not cached, ValueError for a wrong folder, ImportError, ...
        # One line that keeps the cause (the original message, shortened), not only its type.
        cause = textwrap.shorten(f"{type(e).__name__}: {e}", 200)
        raise FileNotFoundError(f"could not load text encoder {name!r} ({cause}); {hint}") from None
    # from_pretrained fills weights the folder lacks with random ones and only logs it: a CLIP saved as
    # CLIPTextModel has no text_projection, and the pooled embedding would be noise. Refuse instead.
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"text encoder {name!r} lacks {len(missing)} weight(s) of {model_cls.__name__} (e.g. "
                         f"{missing[0]})" + ("; a CLIP for GenTron needs its projection: save a "
                                             "CLIPTextModelWithProjection" if kind == "clip" else ""))
    # transformers v5 can hand back a tokenizer with only its special tokens when files are missing
    # offline: it would silently map every caption to <unk>. Detect that instead of training on it.
    ids = tok("a red circle", add_special_tokens=False)["input_ids"]
    if len(tok) < 100 or not ids or tok.unk_token_id in ids:
        raise FileNotFoundError(f"text encoder {name!r} loaded an empty tokenizer (vocab {len(tok)}); {hint}")
    return tok, model.to(device)


def load_text_encoder(spec: str, device="cpu") -> "TextEncoder":
    """Build the frozen encoder for a spec string (see module docstring)."""
    parts = []
    for kind, name, length in parse_spec(spec):
        tok, model = _load_one(kind, name, device)
        parts.append((kind, tok, model, length or tok.model_max_length))
    return TextEncoder(spec, parts)


# -----------------------------------------------------------------------------
# the encoder


MEMO_CHUNK = 64  # captions per encoder call when filling the memo (see TextEncoder.memoize)


class TextEncoder(torch.nn.Module):
    """Frozen tokenizer(s) + encoder(s): captions -> (tokens (B,L,C), mask (B,L), pooled (B,P)), float32."""

    def __init__(self, spec, parts):
        super().__init__()
        self.spec = spec
        self.kinds = [p[0] for p in parts]
        self.tokenizers = [p[1] for p in parts]  # plain list: tokenizers are not modules
        self.models = torch.nn.ModuleList([p[2] for p in parts])
        self.lengths = [int(p[3]) for p in parts]
        self.dims = [m.config.hidden_size if k == "clip" else m.config.d_model for k, m in zip(self.kinds, self.models)]
        self.text_dim = sum(self.dims)  # C: one channel block per encoder (see _combine)
        self.max_length = sum(self.lengths)  # L: sequences concatenated, CLIP first
        # Pooled = CLIP's projected EOS embedding when CLIP is present, else T5's masked mean.
        self.pooled_dim = self.models[0].config.projection_dim if self.kinds[0] == "clip" else self.dims[0]
        self.memo, self.memo_size = None, 0  # see memoize()
        self.eval().requires_grad_(False)

    def memoize(self, max_captions=100_000):
        """Keep the features of up to max_captions distinct captions and reuse them. For a small caption
        vocabulary (the built-in synthetic data: a few thousand captions) this removes tokenizing and
        encoding from the training step; real data rarely repeats a caption, so it is off by default."""
        self.memo, self.memo_size = {}, max_captions
        return self

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode (no dropout)

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        for kind, m in zip(self.kinds, self.models):
            if kind == "t5" and m.device.type == "cuda":
                m.to(torch.bfloat16)  # bf16, never fp16 (see _load_one)
        return self

    def _encode(self, kind, tok, model, length, captions):
        """One encoder: (B, l, c) features with padding zeroed, (B, l) mask, (B, p) pooled."""
        batch = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        out = model(input_ids=ids, attention_mask=mask)
        mask = mask.bool()
        x = out.last_hidden_state.float() * mask[..., None]  # (B, l, c); padding rows are exactly 0
        if kind == "clip":
            pooled = out.text_embeds.float()  # projected EOS token, (B, p)
        else:
            pooled = x.sum(1) / mask.sum(1, keepdim=True)  # masked mean over real tokens, (B, c)
        return x, mask, pooled

    @torch.no_grad()
    def forward(self, captions: list[str]):
        if isinstance(captions, str):
            raise ValueError("TextEncoder expects a list of captions, got a single string")
        if self.memo is None:
            return self._forward(captions)
        new = [c for c in dict.fromkeys(captions) if c not in self.memo]
        if new and len(self.memo) + len(new) > self.memo_size:
            return self._forward(captions)  # full: encode as usual
        # New captions are encoded in chunks of a fixed size (padded with ""), so a caption's features never
        # depend on which other captions were new in the same batch: a resumed run stays bit-exact.
        for i in range(0, len(new), MEMO_CHUNK):
            chunk = new[i : i + MEMO_CHUNK]
            feats = [f[: len(chunk)].clone() for f in self._forward(chunk + [""] * (MEMO_CHUNK - len(chunk)))]
            self.memo.update(zip(chunk, zip(*feats)))  # caption -> its (tokens, mask, pooled) rows, padding freed
        return tuple(torch.stack(rows) for rows in zip(*(self.memo[c] for c in captions)))

    def check_prompts(self, prompts):
        """Warn, one line per kind, about prompts this encoder misreads: words it does not know and tokens past its
        limit (cut). Sampling calls it (pipeline.generate); training does not, or a caption set warns every step."""
        unknown = list(dict.fromkeys(w for p in prompts for w in self.unknown_words(p)))
        if unknown:
            hint = (f"; the bundled tiny encoders know only the synthetic captions' words: {' '.join(TINY_VOCAB)}"
                    if self.spec.startswith("tiny-") else " (its tokenizer maps them to <unk>)")
            warnings.warn(f"text encoder {self.spec} does not know the word(s) {', '.join(unknown)}{hint}", stacklevel=2)
        cut = [(p, t) for p in prompts if (t := self.truncated(p))]
        if cut:
            limit = dict(zip(self.kinds, self.lengths))
            said = "; ".join(f"{textwrap.shorten(p, 40, placeholder='...')!r} loses "
                             + " and ".join(f"{n} token(s) past {k}'s {limit[k]}" for k, n in t.items())
                             for p, t in cut[:3])
            warnings.warn(f"{len(cut)} prompt(s) are longer than the text encoder's limit and are cut: {said}"
                          + (" ..." if len(cut) > 3 else ""), stacklevel=2)

    def unknown_words(self, caption):
        """The words of caption this encoder does not know: those its tokenizer maps to <unk>, and for the bundled
        tiny encoders (a vocabulary of the synthetic captions' words) any word it spells in pieces, letter by letter."""
        out = []
        for word in caption.split():
            word = word.strip(string.punctuation)
            for tok in self.tokenizers if word else ():
                ids = tok(word, add_special_tokens=False)["input_ids"]
                if tok.unk_token_id in ids or (self.spec.startswith("tiny-") and len(ids) > 1):
                    out.append(word)
                    break
        return out

    def truncated(self, caption):
        """{kind: how many of caption's tokens (specials included) fall past that encoder's limit}, where any do."""
        counts = {k: len(tok(caption, verbose=False)["input_ids"]) - L
                  for k, tok, L in zip(self.kinds, self.tokenizers, self.lengths)}
        return {k: n for k, n in counts.items() if n > 0}

    def _forward(self, captions):
        feats = [self._encode(*a, list(captions)) for a in zip(self.kinds, self.tokenizers, self.models, self.lengths)]
        masks = [f[1] for f in feats]
        # Even "" keeps BOS/EOS (CLIP) or EOS (T5): the null caption is a real, attendable embedding.
        assert all(m.any(1).all() for m in masks), "a caption tokenized to an all-False mask"
        tokens = _combine([f[0] for f in feats])
        return tokens, torch.cat(masks, 1), feats[0][2]


def _combine(xs):
    """CLIP+T5 (common interface): each encoder gets its own channel block, sequences concatenated, CLIP first.
    A single Linear(C, width) on this is one projection per encoder followed by concatenation along L."""
    C, out, c0 = sum(x.shape[-1] for x in xs), [], 0
    for x in xs:
        out.append(F.pad(x, (c0, C - c0 - x.shape[-1])))  # (B, l, C), zeros outside [c0, c0 + c)
        c0 += x.shape[-1]
    return torch.cat(out, 1)  # (B, L, C)


# -----------------------------------------------------------------------------
# the encoded captions' padding


def real_tokens_first(text_mask):
    """(..., L) bool, True = real token -> the order of the L positions that puts each caption's real tokens
    first, in their order, and its padding after them."""
    return torch.sort((~text_mask).to(torch.uint8), dim=-1, stable=True).indices


def compact_caption(text, text_mask, multiple=64):
    """text (B, L, C), text_mask (B, L) -> each caption's real tokens first, then only as many of the L positions
    as the longest caption in the batch needs, rounded up to `multiple` (at most L). Cross-attention is the tokens'
    only use, and it treats them as a set with the padding masked out: the same attention over fewer keys (the
    softmax sums the same terms, in another order). A sampler's prompts are short next to CLIP + T5's padded 77 +
    120 tokens. Rounding keeps the shapes, and so the recorded CUDA graphs (fastpath.sampling.CUDAGraphStep), to a few.
    On a GPU one host sync, so a sampler runs it once per batch (FusedGenTron.encode_text, fastpath/blocks.py), never
    inside a step. Training runs it on cached features on the CPU, in the data loader's workers (data.collate), and on
    the captions it encodes after the encoder, whose own check of the masks syncs anyway (train_data.text_condition).
    The kept length depends on the batch, so a prompt's sample can differ in its last bits with the prompts it is
    batched with."""
    if text_mask is None or text_mask.shape[1] <= multiple:  # nothing to cut (and no sync)
        return text, text_mask
    keep = min(text_mask.shape[1], -(-int(text_mask.sum(1).max()) // multiple) * multiple)
    if keep == text_mask.shape[1]:
        return text, text_mask
    order = real_tokens_first(text_mask)[:, :keep]
    return text.gather(1, order[..., None].expand(-1, -1, text.shape[-1])), text_mask.gather(1, order)



# -----------------------------------------------------------------------------
# tiny offline encoders (random weights, real tokenizers on the synthetic captions' words)

COLOURS = "red green blue yellow purple orange cyan white black gray pink brown".split()
SHAPES = "circle square triangle star cross heart diamond ring".split()
WORDS = ("a an and the to of left right above below on top moving up down striped dotted plain checkered "
         "with next in front behind big small").split()
TINY_VOCAB = COLOURS + SHAPES + WORDS  # the tiny encoders' whole words (TextEncoder.check_prompts lists them)
CHARS = list(string.ascii_letters + string.digits + string.punctuation)  # unseen words still tokenize, char by char
TINY_LENGTH = 32  # the toy captions are short


def learn_bpe(words):
    """Plain BPE (Sennrich et al.) on CLIP's word symbols; ties broken by the pair itself so it is
    deterministic (tokenizers' BpeTrainer breaks ties by hash order and differs between runs)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        counts = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges  # every word is one symbol
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1


def tiny_tokenizers():
    """CLIP: byte-level BPE with </w>, lowercase, BOS/EOS, pad = EOS (as real CLIP). T5: Unigram with </s>, <pad>."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer, T5Tokenizer

    words = TINY_VOCAB
    merges = learn_bpe(words)
    alphabet = sorted(ByteLevel.alphabet())  # 256 byte symbols, as in CLIP's vocab.json
    symbols = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)  # specials last, as in CLIP
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_LENGTH)
    # Unigram pieces: specials, whole words, single characters; one shared log-probability, so Viterbi
    # picks the fewest pieces (a known word is one token, an unknown one splits into characters).
    pieces = ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in words] + ["\u2581"] + CHARS
    score = -math.log(len(pieces))
    t5 = T5Tokenizer(vocab=[(p, score) for p in pieces], extra_ids=0, model_max_length=TINY_LENGTH)
    return clip, t5


def build_tiny_encoders(out_dir=ASSETS, seed=0):
    """Create, save (safetensors) and reload-check out_dir/tiny-clip and out_dir/tiny-t5. Deterministic."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_tokenizers()
    torch.manual_seed(seed)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_LENGTH, hidden_act="quick_gelu",  # as CLIP-L
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu",  # as Flan-T5
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id))
    parts = [("clip", clip_tok, clip.eval(), TINY_LENGTH), ("t5", t5_tok, t5.eval(), TINY_LENGTH)]
    for kind, tok, model, _ in parts:
        path = os.path.join(out_dir, f"tiny-{kind}")
        tok.save_pretrained(path)
        model.save_pretrained(path)  # model.safetensors + config.json
    # The saved folders must reproduce the in-memory encoders bit for bit through from_pretrained.
    captions = ["a red circle to the left of a blue square", "", "zebra 42"]
    ref = TextEncoder("tiny-clip+t5", parts)(captions)
    loaded = [(k, *_load_one(k, os.path.join(out_dir, f"tiny-{k}"), "cpu"), L) for k, _, _, L in parts]
    got = TextEncoder("tiny-clip+t5", loaded)(captions)
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), "reloaded tiny encoders differ"
    return out_dir


if __name__ == "__main__":
    # python text_encoders.py  -> regenerates assets/text_encoders/tiny-{clip,t5}
    out = build_tiny_encoders()
    enc = load_text_encoder("tiny-clip+t5")
    tokens, mask, pooled = enc(["a red circle to the left of a blue square", ""])
    print(f"wrote {out}: tokens {tuple(tokens.shape)}, mask sums {mask.sum(1).tolist()}, pooled {tuple(pooled.shape)}")
