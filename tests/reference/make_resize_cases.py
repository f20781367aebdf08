#!/usr/bin/env python3
"""Extra reference cases for runtime/image.rs, beyond the six Qwen2.5-VL fixture images.

Run by hand with the fixtures venv (Pillow 12.3.0, transformers 4.57.6, numpy, safetensors):

    ~/.cache/massv-fixtures-venv/bin/python tests/reference/make_resize_cases.py

Writes (relative to the repository root), about 110 KB in all:
  tests/fixtures/resize_cases/pillow_bicubic.safetensors
      for each case i: `i.input` (u8 [h, w, 3]) and `i.output` (u8 [h', w', 3]), Pillow's
      `Image.resize((w', h'), Resampling.BICUBIC)` of the input: upscales, extreme downscales,
      one axis only, mixed directions, unchanged size; noise (clipping) and smooth gradients.
  tests/fixtures/resize_cases/smart_resize.json
      [height, width, factor, min_pixels, max_pixels, out_h, out_w] from transformers'
      smart_resize (out null when it raises): random sizes, exact .5 ties, both pixel bounds,
      aspect ratios around 200.
  tests/fixtures/resize_cases/{exif_o<N>,mode_<M>}.png + decode.safetensors
      5x3 PNGs carrying EXIF orientation N (2..8), and 4x3 PNGs in other pixel formats (16-bit
      RGB/RGBA/grey/grey+alpha, 8-bit grey, grey+alpha, RGBA, palette); for each file, the tensor
      named after its stem (u8 [h, w, 3]) is what transformers' `load_image(path)`
      (exif_transpose + convert("RGB")) returns for it.

Deterministic: reruns give byte-identical files.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "resize_cases"
SEED = 20250526

# (in_w, in_h, out_w, out_h, content)
RESIZES = [
    (1, 1, 5, 7, "noise"),  # single pixel upscaled
    (2, 3, 40, 25, "noise"),  # strong upscale: overshoot clips at 0 and 255
    (3, 2, 50, 1, "gradient"),  # up in x, down in y
    (180, 6, 2, 3, "noise"),  # 90x horizontal downscale: support 180 px
    (5, 160, 7, 2, "gradient"),  # 80x vertical downscale, slight horizontal upscale
    (75, 50, 70, 56, "noise"),  # mild non-integer scales, down in x and up in y
    (57, 41, 57, 20, "noise"),  # height only: the horizontal pass is skipped
    (61, 43, 29, 43, "gradient"),  # width only: the vertical pass is skipped
    (33, 29, 33, 29, "noise"),  # unchanged size: a copy
    (48, 36, 13, 9, "noise"),  # non-integer downscale in both axes
    (21, 17, 63, 51, "gradient"),  # exact 3x upscale
    (40, 50, 28, 84, "noise"),  # down in x, up in y
    (45, 45, 44, 46, "edges"),  # near-identity scales on hard edges
    (90, 30, 56, 28, "edges"),
]


def content(kind, w, h, rng):
    if kind == "noise":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "gradient":
        u, v = x / max(w - 1, 1), y / max(h - 1, 1)
        rgb = np.stack([255 * u, 255 * (1 - v), 127.5 + 127.5 * np.sin(6 * u + 4 * v)], axis=-1)
        return rgb.round().astype(np.uint8)
    # "edges": black/white checkerboard of random cell sizes per channel, the worst case for ringing.
    cells = rng.integers(2, 7, size=3)
    rgb = [((x // c + y // c) % 2) * 255 for c in cells]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def resize_cases(rng):
    tensors = {}
    for i, (w, h, ow, oh, kind) in enumerate(RESIZES):
        src = content(kind, w, h, rng)
        out = np.asarray(Image.fromarray(src, "RGB").resize((ow, oh), Image.Resampling.BICUBIC))
        assert out.shape == (oh, ow, 3)
        tensors[f"{i:02}.input"] = np.ascontiguousarray(src)
        tensors[f"{i:02}.output"] = np.ascontiguousarray(out)
    save_file(tensors, OUT / "pillow_bicubic.safetensors")


def smart_resize_cases(rng):
    rows = []

    def add(h, w, factor=28, lo=56 * 56, hi=28 * 28 * 1280):
        try:
            oh, ow = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
        except ValueError:
            oh, ow = None, None
        rows.append([h, w, factor, lo, hi, oh, ow])

    for _ in range(200):  # random sizes and bounds, default factor
        h, w = (int(v) for v in rng.integers(1, 5000, size=2))
        lo = int(rng.choice([56 * 56, 3136 * 4, 128 * 28 * 28]))
        hi = int(rng.choice([31360, 28 * 28 * 1280, 16384 * 28 * 28]))
        add(h, w, 28, lo, hi)
    for k in range(1, 40):  # exact ties: (28k + 14) / 28 = k + 0.5 rounds to even
        add(28 * k + 14, 28 * k + 14)
        add(28 * k + 14, 56, hi=10**9)
    for h in [1, 2, 3, 5, 10]:  # aspect ratios around the 200 limit
        for w in [199 * h, 200 * h, 200 * h + 1, 201 * h]:
            add(h, w)
            add(w, h)
    for factor in [14, 32, 56]:  # other grids (patch 16 x merge 2, ...)
        for _ in range(10):
            h, w = (int(v) for v in rng.integers(1, 3000, size=2))
            add(h, w, factor, 4 * factor * factor, 1024 * factor * factor)
    (OUT / "smart_resize.json").write_text(json.dumps(rows, separators=(",", ":")) + "\n")


def png_bytes(w, h, bit_depth, color_type, rows):
    """A minimal PNG written by hand: Pillow cannot save 16-bit colour."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def decode_cases(rng):
    tensors = {}
    base = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)  # 5 wide, 3 high: transposes show
    for n in range(2, 9):
        img = Image.fromarray(base, "RGB")
        exif = Image.Exif()
        exif[0x0112] = n  # Orientation
        img.save(OUT / f"exif_o{n}.png", exif=exif.tobytes())
    # Pixel formats other than RGB8. 16-bit samples span the range, so Pillow's high-byte
    # truncation and its clamp of 16-bit grey ("I;16" -> RGB) both show.
    for name, channels in [("rgb16", 3), ("gray16", 1), ("graya16", 2), ("rgba16", 4)]:
        samples = rng.integers(0, 65536, size=(3, 4, channels)).astype(">u2")
        samples[0, 0] = 200  # a small value: kept by the grey clamp
        color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
        (OUT / f"mode_{name}.png").write_bytes(png_bytes(4, 3, 16, color_type, samples))
    pixels = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    Image.fromarray(pixels[..., 0], "L").save(OUT / "mode_gray8.png")
    Image.fromarray(pixels[..., :2], "LA").save(OUT / "mode_graya8.png")
    Image.fromarray(pixels, "RGBA").save(OUT / "mode_rgba8.png")
    Image.fromarray(pixels[..., :3], "RGB").quantize(colors=5).save(OUT / "mode_palette.png")
    # What transformers' load_image(path) gives: exif_transpose, then convert("RGB").
    for path in sorted(OUT.glob("*.png")):
        tensors[path.stem] = np.ascontiguousarray(np.asarray(load_image(str(path))))
    save_file(tensors, OUT / "decode.safetensors")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    resize_cases(rng)
    smart_resize_cases(rng)
    decode_cases(rng)


if __name__ == "__main__":
    main()
