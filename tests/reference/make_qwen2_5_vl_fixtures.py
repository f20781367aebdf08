#!/usr/bin/env python3
"""Golden fixtures for the Qwen2.5-VL target: test images, a tiny random Qwen2.5-VL model
written in two on-disk layouts, and HF transformers' outputs for it.

Run by hand with the fixtures venv (versions pinned in tests/reference/requirements.txt):

    ~/.cache/massv-fixtures-venv/bin/python tests/reference/make_qwen2_5_vl_fixtures.py

Writes (all paths relative to the repository root):
  tests/fixtures/images/*                      deterministic test images (PNG, JPEG, WebP)
  tests/fixtures/qwen2_5_vl-tiny-hub/          hub layout (flat config, `model.*` / `visual.*` tensors)
                                               + expected_<case>.{safetensors,json}
  tests/fixtures/qwen2_5_vl-tiny-t5/           transformers-5 layout (nested config with
                                               `rope_parameters`, `model.language_model.*` /
                                               `model.visual.*` tensors); same weights

Everything is float32 on CPU with fixed seeds, so reruns reproduce the same numbers.
"""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import PIL
import safetensors
import tokenizers
import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
TOKENIZER = FIXTURES / "tokenizer"
HUB_DIR = FIXTURES / "qwen2_5_vl-tiny-hub"
T5_DIR = FIXTURES / "qwen2_5_vl-tiny-t5"

SEED = 20250525

# Special ids of the tiny tokenizer (tests/fixtures/tokenizer): Qwen2's added tokens at 400..421.
ENDOFTEXT, IM_END = 400, 402
VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD = 409, 410, 411, 412, 413

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json except max_pixels: 28*28*40 keeps every image
# at <= 40 merged tokens, so fixtures stay small, and forces the 300x200 image through the
# max_pixels branch of smart_resize.
MAX_PIXELS = 28 * 28 * 40
PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": MAX_PIXELS,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

TEXT = dict(
    vocab_size=448,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 2:1, head_dim 16 -> 8 rotary pairs
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    # Unequal sections (t=2, h=3, w=3 rotary pairs) so a swapped or mis-split section shows up.
    mrope_section=[2, 3, 3],
    attention_dropout=0.0,
    initializer_range=0.02,
    use_cache=True,
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=2,
    bos_token_id=ENDOFTEXT,
    eos_token_id=IM_END,
)
VISION = dict(
    depth=4,
    hidden_size=32,
    num_heads=2,  # head_dim 16
    intermediate_size=64,
    out_hidden_size=64,
    hidden_act="silu",
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    # 56 px = 2x2 merged units per window, so every test image spans several windows
    # (including partial ones at the right/bottom edges).
    window_size=56,
    fullatt_block_indexes=[1, 3],
    tokens_per_second=2,
)

# name -> (file, (width, height), encoder options). Sizes are chosen to hit every smart_resize branch.
IMAGE_CASES = {
    "ongrid_56x84": ("ongrid_56x84.png", (84, 56), {}),  # already on the 28-grid: identity size
    "nonsquare_150x100": ("nonsquare_150x100.png", (150, 100), {}),  # rounded to the grid
    "small_20x30": ("small_20x30.png", (20, 30), {}),  # below min_pixels: upscaled
    "big_300x200": ("big_300x200.png", (300, 200), {}),  # above max_pixels: downscaled
    "photo_90x70": ("photo_90x70.jpg", (90, 70), {"quality": 90}),  # 70/28 = 2.5: round-half-even
    "photo_64x64": ("photo_64x64.webp", (64, 64), {"lossless": True}),
}
# Files whose decode is not trivially the pixels we drew (lossy JPEG): their expected file also
# carries the decoded RGB, so a decoder mismatch can be told apart from a resize mismatch.
LOSSY = {"photo_90x70"}

IMAGE_PROMPT = [
    {"type": "text", "text": "Look:"},
    {"type": "image"},
    {"type": "text", "text": "What is in the picture?"},
]
TEXT_PROMPT = [{"type": "text", "text": "Hello, what can you see?"}]
NEW_TOKENS = 8


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def draw_image(width, height, seed):
    """Smooth gradients + hard-edged shapes + noise: bicubic resampling of each of these behaves
    differently (flat regions, ringing at edges, high-frequency detail), so resize bugs show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    fu, fv = rng.uniform(0.5, 3.0, size=2)
    rgb = np.stack(
        [255 * u, 255 * (1 - v), 127.5 + 127.5 * np.sin(2 * np.pi * (fu * u + fv * v))], axis=-1
    )
    img = Image.fromarray(rgb.round().astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(img)

    def point():
        return (int(rng.integers(0, width)), int(rng.integers(0, height)))

    def color():
        return tuple(int(c) for c in rng.integers(0, 256, size=3))

    for _ in range(2):
        (x0, y0), (x1, y1) = point(), point()
        box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
        draw.rectangle(box, fill=color())
        (x0, y0), (x1, y1) = point(), point()
        box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
        draw.ellipse(box, fill=color(), outline=color())
    draw.polygon([point(), point(), point()], fill=color())
    draw.line([point(), point()], fill=color(), width=1)

    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_images():
    IMAGES.mkdir(parents=True, exist_ok=True)
    for i, (file, (width, height), options) in enumerate(IMAGE_CASES.values()):
        draw_image(width, height, SEED + i).save(IMAGES / file, **options)


# --------------------------------------------------------------------------------------------
# Model: config, weights, the two layouts
# --------------------------------------------------------------------------------------------


def build_config():
    text = {k: v for k, v in TEXT.items() if k != "mrope_section"}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": TEXT["mrope_section"]}
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=VISION,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


@torch.no_grad()
def randomize_weights(model):
    """Replace the 0.02-std init, under which every layer is nearly the identity and logits are flat,
    with weights that keep activations O(1): a kernel that drops a norm weight, a bias or a rotary
    section, or attends over the wrong window, then changes the outputs visibly."""
    gen = torch.Generator().manual_seed(SEED)

    def randn(shape):
        return torch.randn(shape, generator=gen)

    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or ".ln_q." in name:
            p.copy_(1.0 + 0.2 * randn(p.shape))  # RMSNorm gains: not all ones
        elif name.endswith(".bias"):
            p.copy_(0.2 * randn(p.shape))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(randn(p.shape))
        else:
            # 1/sqrt(fan_in) keeps each projection's output at the scale of its input. q/k get more,
            # so attention is peaked enough for positions (RoPE) to matter; lm_head more still, so
            # logits spread well beyond std 1.
            gain = 1.0
            if ".q_proj." in name or ".k_proj." in name:
                gain = 1.5
            elif name == "lm_head.weight":
                gain = 3.0
            p.copy_(gain * randn(p.shape) / p[0].numel() ** 0.5)


def hub_config_json():
    """Flat layout of the published Qwen2.5-VL checkpoints (cf. the real 7B config.json): text
    fields at top level, `rope_scaling: {type: mrope}`, hub-style vision_config."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": TEXT["attention_dropout"],
        "bos_token_id": TEXT["bos_token_id"],
        "eos_token_id": TEXT["eos_token_id"],
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "vision_token_id": VISION_PAD,
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "hidden_act": TEXT["hidden_act"],
        "hidden_size": TEXT["hidden_size"],
        "initializer_range": TEXT["initializer_range"],
        "intermediate_size": TEXT["intermediate_size"],
        "max_position_embeddings": TEXT["max_position_embeddings"],
        "max_window_layers": TEXT["max_window_layers"],
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "num_key_value_heads": TEXT["num_key_value_heads"],
        "rms_norm_eps": TEXT["rms_norm_eps"],
        "rope_theta": TEXT["rope_theta"],
        "sliding_window": TEXT["sliding_window"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
        "use_cache": TEXT["use_cache"],
        "use_sliding_window": TEXT["use_sliding_window"],
        "vision_config": {
            "depth": VISION["depth"],
            "hidden_act": VISION["hidden_act"],
            "hidden_size": VISION["hidden_size"],
            "intermediate_size": VISION["intermediate_size"],
            "num_heads": VISION["num_heads"],
            "in_chans": VISION["in_channels"],
            "out_hidden_size": VISION["out_hidden_size"],
            "patch_size": VISION["patch_size"],
            "spatial_merge_size": VISION["spatial_merge_size"],
            "spatial_patch_size": VISION["patch_size"],
            "window_size": VISION["window_size"],
            "fullatt_block_indexes": VISION["fullatt_block_indexes"],
            "tokens_per_second": VISION["tokens_per_second"],
            "temporal_patch_size": VISION["temporal_patch_size"],
        },
        "rope_scaling": {"type": "mrope", "mrope_section": TEXT["mrope_section"]},
        "vocab_size": TEXT["vocab_size"],
    }


def t5_config_json():
    """Nested layout that transformers 5 writes for Qwen2.5-VL (checked against 5.24's
    save_pretrained): text fields under text_config, RoPE under `rope_parameters` with `mrope`
    rewritten to rope_type "default", and an explicit axial `rope_parameters` for the vision tower.
    The pinned transformers 4.x cannot write (or read) this, so it is assembled here."""
    text = {k: v for k, v in TEXT.items() if k not in ("mrope_section", "rope_theta", "sliding_window")}
    text.update(
        model_type="qwen2_5_vl_text",
        pad_token_id=None,
        sliding_window=None,  # transformers 5 nulls it when use_sliding_window is false
        layer_types=["full_attention"] * TEXT["num_hidden_layers"],
        rope_parameters={
            "mrope_section": TEXT["mrope_section"],
            "rope_theta": TEXT["rope_theta"],
            "rope_type": "default",
        },
        dtype="float32",
    )
    vision = dict(VISION, model_type="qwen2_5_vl_vision", initializer_range=0.02, dtype="float32")
    vision["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "axial"}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "dtype": "float32",
        "image_token_id": IMAGE_PAD,
        "model_type": "qwen2_5_vl",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": False,
        "transformers_version": "5.24.0",
        "video_token_id": VIDEO_PAD,
        "vision_config": dict(sorted(vision.items())),
        "vision_end_token_id": VISION_END,
        "vision_start_token_id": VISION_START,
    }


def hub_to_t5_name(name):
    """`model.*` (text) -> `model.language_model.*`, `visual.*` -> `model.visual.*`; lm_head stays."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    assert name == "lm_head.weight", name
    return name


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_model_dirs(model):
    """save_pretrained writes hub tensor names but a nested (4.x-style) config, so both layouts
    need post-processing: the hub dir gets the flat config, the t5 dir renamed tensors."""
    generation = {
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": [IM_END, ENDOFTEXT],
        "pad_token_id": ENDOFTEXT,
        "transformers_version": transformers.__version__,
    }
    for out, config in ((HUB_DIR, hub_config_json()), (T5_DIR, t5_config_json())):
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, safe_serialization=True)
        write_json(out / "config.json", config)
        write_json(out / "generation_config.json", generation)
        write_json(out / "preprocessor_config.json", PREPROCESSOR)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(TOKENIZER / file, out / file)

    hub_tensors = load_file(HUB_DIR / "model.safetensors")
    assert any(k.startswith("visual.") for k in hub_tensors)
    assert any(k.startswith("model.layers.") for k in hub_tensors)
    t5_tensors = {hub_to_t5_name(k): v for k, v in hub_tensors.items()}
    save_file(t5_tensors, T5_DIR / "model.safetensors", metadata={"format": "pt"})


def load_model(directory, config=None):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        directory, config=config, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def check_layouts(model, processor):
    """Both directories must hold exactly the in-memory weights and give identical logits. The
    pinned 4.x reads the hub config but not the transformers-5 one (it ignores `rope_parameters`),
    so the t5 dir's tensors are loaded under the hub dir's config."""
    reference = model.state_dict()
    hub = load_model(HUB_DIR)
    hub_text = hub.config.text_config
    assert hub_text.rope_scaling["mrope_section"] == TEXT["mrope_section"]
    assert hub_text.rope_theta == TEXT["rope_theta"]
    t5 = load_model(T5_DIR, config=copy.deepcopy(hub.config))
    for loaded in (hub, t5):
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)

    image = Image.open(IMAGES / IMAGE_CASES["nonsquare_150x100"][0])
    inputs = processor(text=[render(processor, IMAGE_PROMPT)], images=[image], return_tensors="pt")
    with torch.no_grad():
        a, b = hub(**inputs).logits, t5(**inputs).logits
    assert torch.equal(a, b)
    return hub


# --------------------------------------------------------------------------------------------
# Expected outputs
# --------------------------------------------------------------------------------------------


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor unchanged except that it does not demand a video processor: the only
    one transformers has needs torchvision, which the fixtures venv does not install. Text and
    image handling (template, <|image_pad|> expansion, image processor call) is the parent's."""

    attributes = ["image_processor", "tokenizer"]


def make_processor():
    """The slow, PIL-based image processor (the torchvision one resizes differently), loaded from the
    preprocessor_config.json we ship, and the template from the shipped tokenizer_config.json."""
    image_processor = Qwen2VLImageProcessor.from_pretrained(HUB_DIR)
    assert image_processor.max_pixels == MAX_PIXELS and image_processor.min_pixels == 3136
    tokenizer = AutoTokenizer.from_pretrained(HUB_DIR)
    return ImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def render(processor, content):
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_decode(model, inputs, prefill_logits):
    """NEW_TOKENS greedy tokens through generate()'s KV-cache path, with the raw logits of every
    step. Stopping is turned off with eos_token_id=None rather than min_new_tokens, whose eos
    masking would make a token differ from the argmax of the stored logits (this random model
    does rank <|im_end|> first at some steps). Same convention as make_qwen2_fixtures.py."""
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, prompt_len:]
    logits = torch.cat(out.logits, dim=0)
    assert tokens.shape == (NEW_TOKENS,) and logits.shape == (NEW_TOKENS, TEXT["vocab_size"])
    assert torch.equal(logits.argmax(-1), tokens)
    torch.testing.assert_close(logits[0], prefill_logits[-1], rtol=0, atol=1e-5)

    # Cross-check the cached decode against one uncached forward over prompt + generated tokens,
    # whose M-RoPE positions get_rope_index derives from scratch.
    full = dict(inputs)
    full["input_ids"] = out.sequences[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    uncached = model(**full).logits[0, prompt_len - 1 :]
    torch.testing.assert_close(uncached, logits, rtol=0, atol=1e-4)

    # A near-tie between the best two logits would let a correct f32 implementation that sums in
    # another order pick a different token; 1e-3 is far above the error these tiny models give.
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > 1e-3, margin
    return tokens, logits, margin


@torch.no_grad()
def expected_for_image(model, processor, case):
    file, (width, height), _ = IMAGE_CASES[case]
    image = Image.open(IMAGES / file)
    assert image.size == (width, height)

    prompt = render(processor, IMAGE_PROMPT)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    pixel_values = inputs["pixel_values"]
    n = pixel_values.shape[0]

    # What the processor resized to: the same smart_resize + Pillow BICUBIC on the uint8 image.
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    rh, rw = smart_resize(height, width, factor=factor, min_pixels=ip.min_pixels, max_pixels=ip.max_pixels)
    resized = np.asarray(image.convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC))
    assert grid.tolist() == [[1, rh // ip.patch_size, rw // ip.patch_size]]
    check_pixel_values(resized, pixel_values, ip)

    # Vision tower: capture the merger's input (window-permuted order) and its final output.
    visual = model.model.visual
    captured = {}
    hook = visual.merger.register_forward_pre_hook(
        lambda _, args: captured.setdefault("pre", args[0].clone())
    )
    vision_embeds = visual(pixel_values, grid_thw=grid)
    hook.remove()
    pre_merger = captured["pre"]
    window_index, cu_window_seqlens = visual.get_window_index(grid)
    cu_window_seqlens = torch.unique_consecutive(torch.tensor(cu_window_seqlens, dtype=torch.int32))
    # The features scattered into the prompt are the merger output un-permuted by argsort(window_index).
    assert torch.equal(visual.merger(pre_merger)[torch.argsort(window_index)], vision_embeds)
    assert vision_embeds.shape == (n // 4, VISION["out_hidden_size"])
    assert vision_embeds.std(dim=0).mean() > 0.1, "image tokens barely differ from each other"

    input_ids = inputs["input_ids"]
    assert (input_ids == IMAGE_PAD).sum().item() == n // 4
    position_ids, rope_deltas = model.model.get_rope_index(input_ids, image_grid_thw=grid)
    logits = model(**inputs).logits[0]
    tokens, decode_logits, margin = greedy_decode(model, inputs, logits)

    tensors = {
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        "resized_rgb": torch.from_numpy(resized.copy()),
        "vision_pre_merger": pre_merger,
        "window_index": window_index,
        "cu_window_seqlens": cu_window_seqlens,
        "vision_embeds": vision_embeds,
        "input_ids": input_ids[0],
        "position_ids": position_ids[:, 0],
        "rope_deltas": rope_deltas[0],
        "logits": logits,
        "decode.tokens": tokens,
        "decode.logits": decode_logits,
    }
    if case in LOSSY:
        tensors["decoded_rgb"] = torch.from_numpy(np.array(image.convert("RGB")))
    meta = {
        "image": f"images/{file}",
        "original_hw": [height, width],
        "smart_resize_hw": [rh, rw],
        "min_greedy_margin": margin,
    }
    return tensors, prompt, meta


def check_pixel_values(resized, pixel_values, ip):
    """pixel_values must be a pure, bit-exact function of resized_rgb, so the Rust side can test
    resize and rescale/normalize/patchify separately. The arithmetic mirrors transformers':
    rescale multiplies by 1/255 in float64 and casts to f32; normalize is in f32."""
    x = (resized.astype(np.float64) * ip.rescale_factor).astype(np.float32)
    x = (x - np.array(ip.image_mean, np.float32)) / np.array(ip.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # C, H, W
    c, h, w = x.shape
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    # Rows: merged units in raster order, then the 2x2 patches inside a unit in raster order;
    # columns: channel, temporal frame, patch row, patch column.
    x = x.reshape(c, h // p // m, m, p, w // p // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))  # a still image fills both frames
    x = x.reshape(-1, c * t * p * p)
    assert np.array_equal(x, pixel_values.numpy())


@torch.no_grad()
def expected_for_text(model, processor):
    prompt = render(processor, TEXT_PROMPT)
    inputs = processor(text=[prompt], return_tensors="pt")
    input_ids = inputs["input_ids"]
    position_ids, rope_deltas = model.model.get_rope_index(input_ids)
    logits = model(**inputs).logits[0]
    tokens, decode_logits, margin = greedy_decode(model, inputs, logits)
    tensors = {
        "input_ids": input_ids[0],
        "position_ids": position_ids[:, 0],
        "rope_deltas": rope_deltas[0],
        "logits": logits,
        "decode.tokens": tokens,
        "decode.logits": decode_logits,
    }
    return tensors, prompt, {"min_greedy_margin": margin}


def write_expected(model, processor):
    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }
    cases = [(case, lambda c=case: expected_for_image(model, processor, c)) for case in IMAGE_CASES]
    cases.append(("textonly", lambda: expected_for_text(model, processor)))
    for case, compute in cases:
        tensors, prompt, meta = compute()
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, HUB_DIR / f"expected_{case}.safetensors")
        logits_std = tensors["logits"].std().item()
        assert logits_std > 1.0, logits_std
        summary = {
            "case": case,
            "prompt_text": prompt,
            **meta,
            "seq_len": int(tensors["input_ids"].shape[0]),
            "logits_std": logits_std,
            "decode_tokens": tensors["decode.tokens"].tolist(),
            "versions": versions,
        }
        if "pixel_values" in tensors:
            summary["num_patches"] = int(tensors["pixel_values"].shape[0])
            summary["image_grid_thw"] = tensors["image_grid_thw"][0].tolist()
        write_json(HUB_DIR / f"expected_{case}.json", summary)
        line = f"{case:18s} S={summary['seq_len']:3d} logits std={logits_std:.2f}"
        if "vision_embeds" in tensors:
            line += (
                f" N={summary['num_patches']:3d} grid={summary['image_grid_thw']}"
                f" resize={meta['original_hw']}->{meta['smart_resize_hw']}"
                f" vision_embeds std={tensors['vision_embeds'].std().item():.2f}"
            )
        print(line)


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    write_images()

    model = Qwen2_5_VLForConditionalGeneration(build_config()).eval()
    randomize_weights(model)
    write_model_dirs(model)

    processor = make_processor()
    reference = check_layouts(model, processor)
    write_expected(reference, processor)


if __name__ == "__main__":
    main()
