#!/usr/bin/env python3
"""Golden fixtures for massv-train: one training step computed by PyTorch autograd, which the
Rust backward must reproduce (loss and every gradient to 1e-4 relative), and two AdamW steps.

Run by hand with the fixtures venv (versions pinned in tests/reference/requirements.txt), after
make_qwen2_5_vl_fixtures.py (the second case reads the tiny Qwen2.5-VL target and its images):

    ~/.cache/massv-fixtures-venv/bin/python tests/reference/make_train_fixtures.py

Writes (all paths relative to the repository root):
  tests/fixtures/train/drafter/            a tiny random Qwen2ForCausalLM (HF layout) + massv.json +
                                           projector.safetensors: the MASSV drafter of case 1
  tests/fixtures/train/drafter_step.safetensors
                                           case 1 inputs, loss, gradients, params after 2 AdamW steps
  tests/fixtures/train/vl_step.safetensors case 2: the tiny Qwen2.5-VL target's LM + merger
  tests/fixtures/train/expected.json       scalars, shapes, the settings used, library versions

Case 1 (drafter): inputs_embeds = embed_tokens(ids) with the rows of a torch MASSV projector
(RMSNorm per patch -> concat 2x2 -> fc1 -> GELU(erf) -> fc2 -> un-permute by window_index) put at
the image placeholders; loss = Qwen2ForCausalLM's own loss with labels = -100 outside the response
(the mean CE over the response tokens). Then clip_grad_norm_(0.5) and torch.optim.AdamW (weight
decay on matrices only), two steps at lr 1e-2 and 5e-3 (the cosine schedule of massv-train with
warmup 0 over 2 steps, min ratio 0.5), recomputing the gradients before the second step.

Case 2 (Qwen2.5-VL): Qwen2_5_VLForConditionalGeneration on the tiny hub fixture, one user turn
(image nonsquare_150x100.png, "Describe the image.") + a fixed assistant response, labels on the
response; gradients of the LM (layer 0, final norm, lm_head) and of the merger, under hub names.
The vision blocks receive gradients in torch too, but massv-train keeps them frozen.

float32 on CPU, fixed seeds: reruns give the same numbers.
"""

import json

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from make_qwen2_5_vl_fixtures import FIXTURES, HUB_DIR, IMAGES, load_model, make_processor, render

OUT = FIXTURES / "train"
DRAFTER_DIR = OUT / "drafter"
SEED = 20250610

# Case 1 sizes.
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 96, 32, 48, 2, 4, 2
DV, MERGE, PROJ_HIDDEN = 8, 2, 24
UNITS = 6
IMAGE_TOKEN = 90
EPS = 1e-6
LR, MIN_LR_RATIO, CLIP, WEIGHT_DECAY = 1e-2, 0.5, 0.5, 0.1

# Case 2.
VL_IMAGE = "nonsquare_150x100.png"
VL_PROMPT = "Describe the image."
VL_RESPONSE = [72, 101, 108, 108, 111, 44, 32, 119, 402]  # ends with <|im_end|>
# Gradients stored in full (the rest are covered by case 1 and the Rust gradient checks).
VL_FULL = ("layers.0.", "model.norm.weight", "lm_head.weight", "visual.merger.")


def drafter_config():
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=EPS,
        rope_theta=10000.0,
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        attention_dropout=0.0,
    )


class Projector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.ones(DV))
        self.fc1 = torch.nn.Linear(DV * MERGE * MERGE, PROJ_HIDDEN)
        self.fc2 = torch.nn.Linear(PROJ_HIDDEN, HIDDEN)

    def forward(self, pre_merger, window_index):
        x = pre_merger.float()
        x = self.norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
        x = x.reshape(-1, DV * MERGE * MERGE)
        x = self.fc2(F.gelu(self.fc1(x)))
        return x[torch.argsort(window_index)]  # row j belongs to unit window_index[j]


def randomize(module, gen, scale):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name == "norm":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def drafter_loss(model, projector, ids, pre_merger, window_index, labels):
    embeds = model.model.embed_tokens(ids[None])[0]
    rows = projector(pre_merger, window_index)
    slots = (ids == IMAGE_TOKEN).nonzero()[:, 0]
    embeds = embeds.index_put((slots,), rows)
    return model(inputs_embeds=embeds[None], labels=labels[None]).loss


def case_drafter():
    gen = torch.Generator().manual_seed(SEED)
    model = Qwen2ForCausalLM(drafter_config())
    model.config._attn_implementation = "eager"
    randomize(model, gen, 0.15)
    projector = Projector()
    randomize(projector, gen, 0.2)
    model.train()  # dropout is 0; train() only to be explicit that autograd is on

    prompt = [3, 17, 5] + [IMAGE_TOKEN] * UNITS + [7, 9, 11, 4]
    response = [20, 33, 41, 20, 57, 63, 1]
    ids = torch.tensor(prompt + response)
    labels = torch.tensor([-100] * len(prompt) + response)
    pre_merger = torch.randn(UNITS * MERGE * MERGE, DV, generator=gen)
    window_index = torch.tensor([3, 0, 4, 1, 5, 2])

    params = dict(model.named_parameters())
    params.update({f"projector.{n if n != 'norm' else 'norm.weight'}": p for n, p in projector.named_parameters()})
    initial = {n: p.detach().clone() for n, p in params.items()}

    loss = drafter_loss(model, projector, ids, pre_merger, window_index, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}

    # Two AdamW steps as massv-train's loop takes them: clip, schedule, decay on matrices only.
    matrices = [p for p in params.values() if p.dim() >= 2]
    vectors = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": vectors, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    losses = [loss.item()]
    for step, lr in enumerate([LR, LR * MIN_LR_RATIO]):
        if step > 0:
            opt.zero_grad()
            loss = drafter_loss(model, projector, ids, pre_merger, window_index, labels)
            loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    after = {n: p.detach().clone() for n, p in params.items()}

    # The drafter directory (initial weights) in the layouts massv reads.
    DRAFTER_DIR.mkdir(parents=True, exist_ok=True)
    model_tensors = {n: initial[n].contiguous() for n in dict(model.named_parameters())}
    save_file(model_tensors, DRAFTER_DIR / "model.safetensors", metadata={"format": "pt"})
    config = drafter_config().to_dict()
    for k in ("transformers_version", "_name_or_path"):
        config.pop(k, None)
    config["architectures"] = ["Qwen2ForCausalLM"]
    config["torch_dtype"] = "float32"
    (DRAFTER_DIR / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    proj = {n[len("projector."):]: initial[n].contiguous() for n in initial if n.startswith("projector.")}
    save_file(proj, DRAFTER_DIR / "projector.safetensors", metadata={"format": "pt"})
    massv = {
        "format": "massv-drafter/1",
        "vision_hidden_size": DV,
        "spatial_merge_size": MERGE,
        "projector_hidden_size": PROJ_HIDDEN,
        "draft_hidden_size": HIDDEN,
        "norm_eps": EPS,
        "activation": "gelu",
    }
    (DRAFTER_DIR / "massv.json").write_text(json.dumps(massv, indent=2) + "\n")

    tensors = {
        "input_ids": ids,
        "labels": labels,
        "pre_merger": pre_merger,
        "window_index": window_index,
        "loss": torch.tensor([losses[0]]),
        "loss_step2": torch.tensor([losses[1]]),
    }
    tensors.update({f"grad.{n}": g.contiguous() for n, g in grads.items()})
    tensors.update({f"after2.{n}": p.contiguous() for n, p in after.items()})
    save_file(tensors, OUT / "drafter_step.safetensors")
    print(f"drafter: loss {losses[0]:.6f} -> {losses[1]:.6f} after one step")
    return {"loss": losses[0], "loss_step2": losses[1], "tokens": len(response)}


def hub_name(name):
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    return name


def case_vl():
    model = load_model(HUB_DIR)
    processor = make_processor()
    text = render(processor, [{"type": "image"}, {"type": "text", "text": VL_PROMPT}])
    image = Image.open(IMAGES / VL_IMAGE).convert("RGB")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([VL_RESPONSE])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[0, prompt_len:] = torch.tensor(VL_RESPONSE)
    mask = torch.ones_like(ids)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        labels=labels,
    )
    out.loss.backward()
    tensors = {"input_ids": ids[0], "labels": labels[0], "loss": torch.tensor([out.loss.item()])}
    norms = {}
    for name, p in model.named_parameters():
        h = hub_name(name)
        if h.startswith("visual.") and not h.startswith("visual.merger."):
            continue
        g = p.grad.detach()
        norms[h] = g.norm().item()
        if any(k in h for k in VL_FULL):
            tensors[f"grad.{h}"] = g.contiguous()
    tensors["grad_norm_names"] = torch.tensor([0])  # the names and norms are in expected.json
    save_file(tensors, OUT / "vl_step.safetensors")
    print(f"vl: loss {out.loss.item():.6f}, {len(norms)} gradient norms")
    return {"loss": out.loss.item(), "grad_norms": norms, "prompt_len": prompt_len, "tokens": len(VL_RESPONSE)}


def main():
    torch.manual_seed(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {
        "drafter": case_drafter(),
        "vl": case_vl(),
        "settings": {
            "lr": LR,
            "min_lr_ratio": MIN_LR_RATIO,
            "clip": CLIP,
            "weight_decay": WEIGHT_DECAY,
            "image_token": IMAGE_TOKEN,
            "vl_image": VL_IMAGE,
            "vl_prompt": VL_PROMPT,
            "vl_response": VL_RESPONSE,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
