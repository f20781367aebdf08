#!/usr/bin/env python3
"""Golden fixtures for the MASSV drafter: two tiny Qwen2 drafters for the tiny Qwen2.5-VL target
(one with a MASSV vision projector, one text-only), the projector's expected output, and the
tokens, passes and mean accepted length of plain greedy speculative decoding (T = 0) with them.

Run by hand with the fixtures venv (versions pinned in tests/reference/requirements.txt), after
make_qwen2_5_vl_fixtures.py (it reads the target and the images that script writes):

    ~/.cache/massv-fixtures-venv/bin/python tests/reference/make_drafter_fixtures.py

Writes (all paths relative to the repository root):
  tests/fixtures/drafter-tiny-massv/   Qwen2 drafter + massv.json + projector.safetensors
                                       + expected_projector_nonsquare_150x100.safetensors
  tests/fixtures/drafter-tiny-text/    the same Qwen2 drafter, nothing else (text-only drafter)
  tests/fixtures/spec_expected.json    speculative-decoding reference runs

Everything is float32 on CPU with fixed seeds, so reruns reproduce the same bytes. The
speculative loop is written out plainly, without a KV cache: every step recomputes full forwards.
"""

import json
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

# Shared conventions (processor without a video processor, chat rendering, model loading, paths,
# special ids, JSON writing) come from the target's generator; importing it must not leave a
# __pycache__ in the repository.
sys.dont_write_bytecode = True
from make_qwen2_5_vl_fixtures import (  # noqa: E402
    ENDOFTEXT,
    FIXTURES,
    HUB_DIR,
    IM_END,
    IMAGE_PAD,
    IMAGES,
    TEXT,
    VISION,
    VISION_END,
    VISION_START,
    load_model,
    make_processor,
    render,
    write_json,
)

MASSV_DIR = FIXTURES / "drafter-tiny-massv"
TEXT_DIR = FIXTURES / "drafter-tiny-text"
SPEC_JSON = FIXTURES / "spec_expected.json"

SEED = 20250601
DRAFT_VOCAB = 432  # < the target's 448, > the tokenizer's 422 ids (like 151936 vs 152064 for real Qwen)
# Seeded Gaussian noise added to every drafter LM tensor after distillation, relative to that
# tensor's own std. Level and seed were picked by scanning (levels 0..0.4, finely 0.03..0.07; noise
# seeds 1..4 and SEED) for a MASSV-mode mean accepted length at gamma 5 of ~1.6..3.5 on every image
# case, a clearly lower one in text mode, and no near-tie among the drafter's choices (MIN_MARGIN).
# Acceptance is very sensitive to it: a few hundredths change it visibly, and by 0.3 nearly every
# draft is rejected.
LM_NOISE = 0.04
NOISE_SEED = 2
PROJECTOR_NOISE = 0.02  # the same, for the projector: it sees nearly what the target's merger sees
NORM_EPS = 1e-6
MERGE = VISION["spatial_merge_size"]
DV = VISION["hidden_size"]
DH = DV * MERGE**2
D = TEXT["hidden_size"]

STOP = (IM_END, ENDOFTEXT)
# The random target does pick ids >= DRAFT_VOCAB (its padding rows 432..447), and the drafter has no
# embedding for them. Where such an id is part of the drafter's input it gets an all-zero embedding
# row, as in massv's runtime (spec/draft.rs). The drafter can never propose those ids, so such a
# target token is always a rejection (or the bonus token); verification keeps decoding lossless
# whatever the drafter sees.

GAMMAS = (1, 3, 5, 8)
MAX_NEW = 24
# name -> (image file or None, user text)
CASES = {
    "ongrid_56x84": ("ongrid_56x84.png", "What is in the picture?"),
    "nonsquare_150x100": ("nonsquare_150x100.png", "Describe the image."),
    "big_300x200": ("big_300x200.png", "What colour is it?"),
    "textonly": (None, "Hello, what can you see?"),
}
PROJECTOR_CASE = "nonsquare_150x100"
# Near-ties between the best two logits would let a correct f32 implementation pick another token.
MIN_MARGIN = 1e-3

# Distillation (see distill()): every image with every image question, plus text-only prompts.
DISTILL_IMAGES = (
    "ongrid_56x84.png",
    "nonsquare_150x100.png",
    "big_300x200.png",
    "small_20x30.png",
    "photo_90x70.jpg",
    "photo_64x64.webp",
)
DISTILL_IMAGE_TEXTS = ("What is in the picture?", "Describe the image.", "What colour is it?", "Look at this.")
DISTILL_TEXTS = ("Hello, what can you see?", "Tell me a story.", "What is the capital of France?", "Count to five.")
DISTILL_STEPS = 150
DISTILL_LR = 2e-3


# --------------------------------------------------------------------------------------------
# Drafter: LM (target's LM, distilled, + noise) and projector (target's merger + noise)
# --------------------------------------------------------------------------------------------


def drafter_config():
    return Qwen2Config(
        vocab_size=DRAFT_VOCAB,
        hidden_size=TEXT["hidden_size"],
        intermediate_size=TEXT["intermediate_size"],
        num_hidden_layers=TEXT["num_hidden_layers"],
        num_attention_heads=TEXT["num_attention_heads"],
        num_key_value_heads=TEXT["num_key_value_heads"],
        hidden_act=TEXT["hidden_act"],
        max_position_embeddings=TEXT["max_position_embeddings"],
        rms_norm_eps=TEXT["rms_norm_eps"],
        rope_theta=TEXT["rope_theta"],
        use_sliding_window=False,
        max_window_layers=TEXT["max_window_layers"],
        tie_word_embeddings=False,
        bos_token_id=ENDOFTEXT,
        eos_token_id=IM_END,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )


def noisy(tensor, level, gen):
    return tensor + level * tensor.std() * torch.randn(tensor.shape, generator=gen)


@torch.no_grad()
def init_drafter(target):
    """The target's LM (embedding and lm_head rows cut to DRAFT_VOCAB) as a Qwen2ForCausalLM."""
    source = target.state_dict()
    drafter = Qwen2ForCausalLM(drafter_config())
    drafter.config._attn_implementation = "eager"
    for name, p in drafter.named_parameters():
        src_name = name if name == "lm_head.weight" else "model.language_model." + name[len("model."):]
        src = source[src_name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            src = src[:DRAFT_VOCAB]
        assert src.shape == p.shape, (name, src.shape, p.shape)
        p.copy_(src)
    return drafter.eval()


@torch.no_grad()
def add_noise(drafter, level=LM_NOISE, seed=NOISE_SEED):
    gen = torch.Generator().manual_seed(seed)
    for _, p in drafter.named_parameters():
        p.copy_(noisy(p, level, gen))


@torch.no_grad()
def build_projector(target):
    """The target's merger (ln_q, mlp.0, mlp.2) plus PROJECTOR_NOISE."""
    source = target.state_dict()
    merger = {
        "norm.weight": "model.visual.merger.ln_q.weight",
        "fc1.weight": "model.visual.merger.mlp.0.weight",
        "fc1.bias": "model.visual.merger.mlp.0.bias",
        "fc2.weight": "model.visual.merger.mlp.2.weight",
        "fc2.bias": "model.visual.merger.mlp.2.bias",
    }
    gen = torch.Generator().manual_seed(SEED + 1)
    projector = {k: noisy(source[v], PROJECTOR_NOISE, gen).contiguous() for k, v in merger.items()}
    shapes = {k: tuple(v.shape) for k, v in projector.items()}
    assert shapes == {
        "norm.weight": (DV,),
        "fc1.weight": (DH, DV * MERGE**2),
        "fc1.bias": (DH,),
        "fc2.weight": (D, DH),
        "fc2.bias": (D,),
    }, shapes
    return projector


def distill(drafter, target, processor, projector):
    """A short, deterministic self-distillation of the drafter LM towards the target, in MASSV mode.

    Why: the target's LM copied as is agrees with the target on only ~25-45% of the next tokens
    of the image cases (MAL at gamma 5: 1.92 / 1.35 / 1.28 in massv mode, 1.64 / 1.64 / 1.28 in
    text mode, before any noise), so the image does not help it. The drafter runs plain 1-D
    positions, while the target's M-RoPE gives the image tokens 2-D positions and resumes the text
    after the image N/4 - max(h, w)/2 positions earlier (h, w: the patch grid); this random
    target's peaked attention is very sensitive to that. So the drafter is trained (full batch,
    Adam) to match the target's next-token distribution (its first DRAFT_VOCAB logits) along the
    target's greedy continuations of the DISTILL_* prompts, which include the test cases, fed as
    in massv mode (image rows from the projector). The image prompts never take part in text
    mode, so text mode stays worse on them. The noise added afterwards brings acceptance back
    down into a useful range."""
    sequences = []
    prompts = [(image, text) for image in DISTILL_IMAGES for text in DISTILL_IMAGE_TEXTS]
    prompts += [(None, text) for text in DISTILL_TEXTS]
    for image, text in prompts:
        data = prepare(target, processor, image, text)
        t = Target(target, data)
        out = []  # greedy, no stopping: the continuation is only a training sequence
        for _ in range(MAX_NEW):
            out.append(int(t.logits(out)[-1].argmax()))
        with torch.no_grad():
            probs = t.logits(out[:-1])[len(data["ids"]) - 1 :, :DRAFT_VOCAB].softmax(-1)
        sequences.append((Drafter(drafter, projector, data, "massv"), out[:-1], probs))

    drafter.train()
    optimizer = torch.optim.Adam(drafter.parameters(), lr=DISTILL_LR)
    for step in range(DISTILL_STEPS + 1):
        optimizer.zero_grad()
        loss = 0.0
        for d, extra, probs in sequences:
            logits = d.forward(extra)[len(d.prompt) - 1 :]
            loss = loss + F.kl_div(logits.log_softmax(-1), probs, reduction="batchmean")
        loss = loss / len(sequences)
        if step == 0 or step == DISTILL_STEPS:
            print(f"distillation step {step}: KL {loss.item():.4f}")
        if step < DISTILL_STEPS:
            loss.backward()
            optimizer.step()
    drafter.eval()
    for p in drafter.parameters():
        p.requires_grad_(False)


def build_drafter(target, processor):
    """Returns (drafter LM, projector tensors)."""
    drafter = init_drafter(target)
    projector = build_projector(target)
    distill(drafter, target, processor, projector)
    add_noise(drafter)
    return drafter, projector


def project(projector, pre_merger, window_index):
    """The MASSV projector: RMSNorm per patch (as Qwen2RMSNorm), groups of MERGE**2 consecutive
    patches concatenated, fc1 -> exact GELU -> fc2, then un-permuted like the merger's output."""
    x = pre_merger.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    x = projector["norm.weight"] * x
    x = x.reshape(-1, DV * MERGE**2)
    x = F.gelu(F.linear(x, projector["fc1.weight"], projector["fc1.bias"]), approximate="none")
    x = F.linear(x, projector["fc2.weight"], projector["fc2.bias"])
    return x[torch.argsort(window_index)]


def write_drafter_dirs(drafter, projector):
    generation = {
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": [IM_END, ENDOFTEXT],
        "pad_token_id": ENDOFTEXT,
        "transformers_version": transformers.__version__,
    }
    for out in (MASSV_DIR, TEXT_DIR):
        if out.exists():
            shutil.rmtree(out)
        drafter.save_pretrained(out, safe_serialization=True)
        write_json(out / "generation_config.json", generation)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(HUB_DIR / file, out / file)
    massv = {
        "format": "massv-drafter/1",
        "vision_hidden_size": DV,
        "spatial_merge_size": MERGE,
        "projector_hidden_size": DH,
        "draft_hidden_size": D,
        "norm_eps": NORM_EPS,
        "activation": "gelu",
    }
    write_json(MASSV_DIR / "massv.json", massv)
    save_file(projector, MASSV_DIR / "projector.safetensors", metadata={"format": "pt"})

    # What was written must be what is used below.
    for out in (MASSV_DIR, TEXT_DIR):
        loaded = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
        state, reference = loaded.state_dict(), drafter.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    loaded = load_file(MASSV_DIR / "projector.safetensors")
    assert loaded.keys() == projector.keys()
    assert all(torch.equal(loaded[k], projector[k]) for k in projector)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prepare(target, processor, file, text):
    """Target inputs (ids with expanded <|image_pad|>s, pixel values, grid), the vision tower's
    pre-merger tensor, window index and output, and the rendered prompt."""
    if file is None:
        prompt = render(processor, [{"type": "text", "text": text}])
        inputs = processor(text=[prompt], return_tensors="pt")
        return {"prompt": prompt, "text": text, "image": None, "ids": inputs["input_ids"][0]}

    prompt = render(processor, [{"type": "image"}, {"type": "text", "text": text}])
    inputs = processor(text=[prompt], images=[Image.open(IMAGES / file)], return_tensors="pt")
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    visual = target.model.visual
    captured = {}
    hook = visual.merger.register_forward_pre_hook(lambda _, args: captured.setdefault("pre", args[0].clone()))
    vision_embeds = visual(pixel_values, grid_thw=grid)
    hook.remove()
    window_index, _ = visual.get_window_index(grid)
    ids = inputs["input_ids"][0]
    n = pixel_values.shape[0]
    assert (ids == IMAGE_PAD).sum().item() == n // MERGE**2 == vision_embeds.shape[0]
    return {
        "prompt": prompt,
        "text": text,
        "image": f"images/{file}",
        "ids": ids,
        "pixel_values": pixel_values,
        "grid": grid,
        "pre_merger": captured["pre"],
        "window_index": window_index,
        "vision_embeds": vision_embeds,
    }


def text_mode_ids(ids):
    """The prompt with every <|vision_start|> ... <|vision_end|> segment (inclusive) removed."""
    keep, inside = [], False
    for t in ids.tolist():
        if t == VISION_START:
            assert not inside
            inside = True
        elif t == VISION_END:
            assert inside
            inside = False
        elif not inside:
            keep.append(t)
    assert not inside
    return keep


# --------------------------------------------------------------------------------------------
# Forwards
# --------------------------------------------------------------------------------------------


class Target:
    """Full (uncached) forwards of the target over its prompt + extra tokens. The vision features go
    into the prompt's <|image_pad|> positions only and the extra tokens get the M-RoPE text positions
    that follow the prompt (S + i + rope_deltas on all three axes), so an <|image_pad|> or
    <|vision_start|> among the extra tokens (drafted or generated) is an ordinary token. transformers'
    own image path would count every <|image_pad|> in the sequence as an image placeholder."""

    def __init__(self, model, data):
        self.model, self.data = model, data
        ids = data["ids"][None]
        self.prompt_positions, deltas = model.model.get_rope_index(
            ids, image_grid_thw=data.get("grid"), attention_mask=torch.ones_like(ids)
        )
        self.next_position = self.prompt_positions.max().item() + 1
        assert self.next_position == ids.shape[1] + deltas.item()

    @torch.no_grad()
    def logits(self, extra):
        prompt = self.data["ids"]
        ids = torch.cat([prompt, torch.tensor(extra, dtype=torch.long)])[None]
        embeds = self.model.model.get_input_embeddings()(ids)
        if "vision_embeds" in self.data:
            embeds = embeds.clone()
            embeds[0, : len(prompt)][prompt == IMAGE_PAD] = self.data["vision_embeds"]
        tail = torch.arange(self.next_position, self.next_position + len(extra))
        position_ids = torch.cat([self.prompt_positions, tail.view(1, 1, -1).expand(3, 1, -1)], dim=2)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits[0]

    @torch.no_grad()
    def check(self, extra):
        """Against transformers' own path (input ids + pixel values), where that path applies."""
        assert IMAGE_PAD not in extra and VISION_START not in extra
        ids = torch.cat([self.data["ids"], torch.tensor(extra, dtype=torch.long)])[None]
        kwargs = {}
        if "grid" in self.data:
            kwargs = {"pixel_values": self.data["pixel_values"], "image_grid_thw": self.data["grid"]}
        own = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
        torch.testing.assert_close(self.logits(extra), own.logits[0], rtol=0, atol=1e-5)


class Drafter:
    """Full (uncached) forwards of the drafter over its prompt + extra tokens, with plain 1-D
    positions. massv mode: the target's prompt ids, with the projector output in place of the
    embeddings of the prompt's <|image_pad|> tokens. text mode: the prompt without the vision
    segment."""

    def __init__(self, model, projector, data, mode):
        self.model, self.mode = model, mode
        if mode == "massv":
            self.prompt = data["ids"].tolist()
            self.image_rows = None
            if "pre_merger" in data:
                self.image_rows = project(projector, data["pre_merger"], data["window_index"])
        else:
            assert mode == "text"
            self.prompt = text_mode_ids(data["ids"])
            self.image_rows = None

    def input_ids(self, extra):
        return torch.tensor(self.prompt + list(extra), dtype=torch.long)

    def forward(self, extra):
        ids = self.input_ids(extra)
        known = ids < DRAFT_VOCAB
        embeds = self.model.model.embed_tokens(torch.where(known, ids, 0))
        embeds = embeds * known[:, None].to(embeds.dtype)  # zero rows for ids it has no row for
        if self.image_rows is not None:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[: len(self.prompt)] = torch.tensor(self.prompt) == IMAGE_PAD
            assert mask.sum().item() == self.image_rows.shape[0]
            embeds = embeds.clone()
            embeds[mask] = self.image_rows
        logits = self.model(inputs_embeds=embeds[None], use_cache=False).logits[0]
        assert logits.shape == (len(ids), DRAFT_VOCAB)
        return logits

    @torch.no_grad()
    def logits(self, extra):
        return self.forward(extra)


def margin(row):
    top2 = row.topk(2).values
    return (top2[0] - top2[1]).item()


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def target_greedy(target):
    """Plain greedy decoding with full forwards: the reference every speculative run must equal."""
    out, margins = [], []
    while len(out) < MAX_NEW:
        row = target.logits(out)[-1]
        out.append(int(row.argmax()))
        margins.append(margin(row))
        if out[-1] in STOP:
            break
    return out, min(margins)


@torch.no_grad()
def target_generate(model, data):
    """transformers' generate (KV cache, EOS stopping) as a second, independent reference."""
    ids = data["ids"][None]
    kwargs = {}
    if "grid" in data:
        kwargs = {"pixel_values": data["pixel_values"], "image_grid_thw": data["grid"]}
    seq = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=list(STOP),
        pad_token_id=ENDOFTEXT,
        **kwargs,
    )
    return seq[0, ids.shape[1] :].tolist()


def speculative(target, drafter, gamma):
    """Greedy speculative decoding as in the brief; returns (tokens, passes, stats)."""
    margins = {"target": [], "draft": []}
    row = target.logits([])[-1]
    out = [int(row.argmax())]
    margins["target"].append(margin(row))
    passes = accepted = drafted = 0
    done = out[0] in STOP
    while not done and len(out) < MAX_NEW:
        g = min(gamma, MAX_NEW - len(out) - 1)
        drafts = []
        for _ in range(g):
            row = drafter.logits(out + drafts)[-1]
            drafts.append(int(row.argmax()))
            margins["draft"].append(margin(row))
        rows = target.logits(out + drafts)[-(g + 1) :]
        a = rows.argmax(-1).tolist()
        k = 0
        while k < g and drafts[k] == a[k]:
            k += 1
        # Only the rows whose argmax is used decide the output.
        margins["target"].extend(margin(r) for r in rows[: k + 1])
        passes += 1
        drafted += g
        accepted += k
        for t in drafts[:k] + [a[k]]:
            out.append(t)
            if t in STOP:
                done = True
                break
    assert passes > 0
    stats = {
        "accepted": accepted,
        "drafted": drafted,
        "min_target_margin": min(margins["target"]),
        "min_draft_margin": min(margins["draft"]) if margins["draft"] else float("inf"),
    }
    return out, passes, stats


def run_all(target, processor, drafter, projector, verbose=True):
    """All cases x modes x gammas. Returns (entries for spec_expected.json, per-case data, mins)."""
    entries, datas = [], {}
    mins = {"target": float("inf"), "draft": float("inf")}
    for case, (file, _) in CASES.items():
        data = prepare(target, processor, *CASES[case])
        datas[case] = data
        t = Target(target, data)
        reference, ref_margin = target_greedy(t)
        t.check(reference)
        mins["target"] = min(mins["target"], ref_margin)
        generated = target_generate(target, data)
        assert generated == reference, (case, generated, reference)
        # "prompt": the rendered chat prompt (one user turn [image, text], or [text], with the
        # generation prompt and the template's default system turn; one <|image_pad|>, which the
        # processor expands). "user_text": the text of that user turn.
        base = {"case": case, "image": data["image"], "prompt": data["prompt"], "user_text": data["text"]}
        # Target-only decoding is the gamma = 0 case of the loop: one token per pass after prefill.
        entries.append(
            dict(base, mode="target", gamma=0, max_new_tokens=MAX_NEW, passes=len(reference) - 1,
                 tokens=reference, mal=1.0)
        )
        per_mode = {}
        for mode in ("massv", "text"):
            d = Drafter(drafter, projector, data, mode)
            for gamma in GAMMAS:
                out, passes, stats = speculative(t, d, gamma)
                assert out == reference, (case, mode, gamma, out, reference)
                mal = (len(out) - 1) / passes
                mins["target"] = min(mins["target"], stats["min_target_margin"])
                mins["draft"] = min(mins["draft"], stats["min_draft_margin"])
                per_mode[(mode, gamma)] = (passes, mal, stats)
                entries.append(
                    dict(base, mode=mode, gamma=gamma, max_new_tokens=MAX_NEW, passes=passes,
                         tokens=out, mal=mal)
                )
        if file is None:
            # No image: the two modes see identical inputs.
            for gamma in GAMMAS:
                assert per_mode[("massv", gamma)][:2] == per_mode[("text", gamma)][:2]
        if verbose:
            print(f"{case:18s} target S={len(data['ids'])} tokens={len(reference)} {reference}")
            for mode in ("massv", "text"):
                cells = "  ".join(
                    f"g{g}: {per_mode[(mode, g)][0]:2d}p mal={per_mode[(mode, g)][1]:.3f}" for g in GAMMAS
                )
                print(f"  {mode:5s} {cells}")
    return entries, datas, mins


# --------------------------------------------------------------------------------------------
# Projector fixture
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def write_projector_expected(target, drafter, projector, data):
    pre, window_index = data["pre_merger"], data["window_index"]
    # Same tensors as the target's own fixture for this image (the prompt does not matter).
    vl = load_file(HUB_DIR / f"expected_{PROJECTOR_CASE}.safetensors")
    assert torch.equal(vl["vision_pre_merger"], pre) and torch.equal(vl["window_index"], window_index)

    # Without noise the projector is exactly the target's merger, un-permuted.
    exact = {
        "norm.weight": target.model.visual.merger.ln_q.weight,
        "fc1.weight": target.model.visual.merger.mlp[0].weight,
        "fc1.bias": target.model.visual.merger.mlp[0].bias,
        "fc2.weight": target.model.visual.merger.mlp[2].weight,
        "fc2.bias": target.model.visual.merger.mlp[2].bias,
    }
    torch.testing.assert_close(project(exact, pre, window_index), data["vision_embeds"], rtol=0, atol=1e-6)

    projector_out = project(projector, pre, window_index)
    n_tokens = pre.shape[0] // MERGE**2
    assert projector_out.shape == (n_tokens, D)
    d = Drafter(drafter, projector, data, "massv")
    logits = d.logits([])
    ids = d.input_ids([])
    tensors = {
        "vision_pre_merger": pre,
        "window_index": window_index,
        "projector_out": projector_out,
        "draft_input_ids": ids,
        "draft_prefill_logits": logits,
    }
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, MASSV_DIR / f"expected_projector_{PROJECTOR_CASE}.safetensors")
    rel = ((projector_out - data["vision_embeds"]).norm() / data["vision_embeds"].norm()).item()
    print(
        f"projector: out {tuple(projector_out.shape)} std={projector_out.std().item():.3f}, "
        f"relative distance to the merger output {rel:.4f}; draft prefill logits {tuple(logits.shape)} "
        f"std={logits.std().item():.2f}"
    )


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    processor = make_processor()
    target = load_model(HUB_DIR)
    drafter, projector = build_drafter(target, processor)
    write_drafter_dirs(drafter, projector)

    entries, datas, mins = run_all(target, processor, drafter, projector)
    print(f"smallest top-2 logit gap: target {mins['target']:.4f}, drafter {mins['draft']:.4f}")
    assert mins["target"] > MIN_MARGIN and mins["draft"] > MIN_MARGIN, mins
    SPEC_JSON.write_text(json.dumps(entries, indent=1) + "\n")
    write_projector_expected(target, drafter, projector, datas[PROJECTOR_CASE])


if __name__ == "__main__":
    main()
