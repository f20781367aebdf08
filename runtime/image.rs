//! Image preprocessing for the Qwen2.5-VL vision tower.
//!
//! Reproduces transformers' slow, PIL-based `Qwen2VLImageProcessor` (4.57) bit for bit:
//! decode to RGB8, `smart_resize` to a multiple of patch·merge pixels, Pillow (≤ 12) BICUBIC
//! resampling, rescale by 1/255, CLIP normalisation, and the processor's patch order. The
//! goldens in `tests/fixtures/qwen2_5_vl-tiny-hub/` check every step.

use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use serde_json::Value;

use crate::config::{read_json_object, Fields};
use crate::error::{Error, Result};

/// `source_name` of images that did not come from a file.
const MEMORY: &str = "<memory>";

fn image_err(source_name: &str, reason: impl Into<String>) -> Error {
    Error::Image {
        source_name: source_name.to_string(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

/// A decoded image: RGB8, row-major, 3 bytes per pixel, never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInput {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
    source_name: String,
}

impl ImageInput {
    /// Decodes a PNG, JPEG or WebP file (the format is sniffed from the content, as Pillow does).
    pub fn from_path(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode(&bytes, &path.display().to_string())
    }

    /// Decodes a PNG, JPEG or WebP image held in memory.
    pub fn from_encoded(bytes: &[u8]) -> Result<Self> {
        decode(bytes, MEMORY)
    }

    /// Takes raw RGB8 pixels (row-major, `width * height * 3` bytes), e.g. from the C API.
    pub fn from_rgb8(width: usize, height: usize, rgb: Vec<u8>) -> Result<Self> {
        Self::new(width, height, rgb, MEMORY)
    }

    fn new(width: usize, height: usize, rgb: Vec<u8>, source_name: &str) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(image_err(
                source_name,
                format!("image is empty ({width}x{height} pixels)"),
            ));
        }
        let expected = width.checked_mul(height).and_then(|n| n.checked_mul(3));
        if expected != Some(rgb.len()) {
            return Err(image_err(
                source_name,
                format!(
                    "RGB8 buffer holds {} bytes, a {width}x{height} image needs width*height*3",
                    rgb.len()
                ),
            ));
        }
        Ok(ImageInput {
            width,
            height,
            rgb,
            source_name: source_name.to_string(),
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The file path, or `<memory>`.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

fn decode(bytes: &[u8], source_name: &str) -> Result<ImageInput> {
    let err = |reason: String| image_err(source_name, reason);
    let format = image::guess_format(bytes)
        .map_err(|_| err("not a PNG, JPEG or WebP image (unrecognised file signature)".into()))?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) {
        return Err(err(format!(
            "{format:?} images are not supported (only PNG, JPEG and WebP)"
        )));
    }
    let name = format!("{format:?}").to_uppercase();
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .map_err(|e| err(format!("cannot decode {name}: {e}")))?;
    // transformers' `load_image` (used for paths and URLs) applies `ImageOps.exif_transpose`.
    // A malformed EXIF block is ignored rather than failing the image, as Pillow does.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| err(format!("cannot decode {name}: {e}")))?;
    img.apply_orientation(orientation);
    let (width, height) = (img.width() as usize, img.height() as usize);
    ImageInput::new(width, height, to_rgb8_like_pillow(img), source_name)
}

/// RGB8 pixels as Pillow's `Image.open(...).convert("RGB")` gives them. Alpha is dropped (not
/// composited) and grey is replicated, as in the `image` crate; 16-bit samples differ: Pillow
/// keeps the high byte of 16-bit colour, and opens 16-bit grey as mode "I;16", whose conversion
/// to RGB clamps the value to 255 instead of scaling it.
fn to_rgb8_like_pillow(img: DynamicImage) -> Vec<u8> {
    let high_byte = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(high_byte).collect(),
        DynamicImage::ImageRgba16(b) => b.pixels().flat_map(|p| [0, 1, 2].map(|c| high_byte(p.0[c]))).collect(),
        DynamicImage::ImageLuma16(b) => b.pixels().flat_map(|p| [p.0[0].min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(b) => b.pixels().flat_map(|p| [high_byte(p.0[0]); 3]).collect(),
        other => other.into_rgb8().into_raw(),
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The fields of `preprocessor_config.json` that `Qwen2VLImageProcessor` uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// Multiplies the u8 values, in f64 (transformers' `rescale`).
    pub rescale_factor: f64,
    /// Kept as f32: `normalize` casts mean and std to the image's dtype.
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for PreprocessorConfig {
    /// transformers' `Qwen2VLImageProcessor()` defaults.
    fn default() -> Self {
        PreprocessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            rescale_factor: 1.0 / 255.0,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
        }
    }
}

impl PreprocessorConfig {
    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Err(Error::config(
                &path,
                "missing: the model directory needs a preprocessor_config.json to process images",
            ));
        }
        Self::from_file(&path)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let obj = read_json_object(path)?;
        let f = Fields { path, obj: &obj };
        // Options this port does not implement are refused rather than silently ignored.
        for key in ["do_resize", "do_rescale", "do_normalize"] {
            if f.opt_bool(key)? == Some(false) {
                return Err(f.err(format!("`{key}: false` is not supported")));
            }
        }
        if let Some(r) = f.opt_usize("resample")? {
            if r != 3 {
                return Err(f.err(format!("`resample` {r} is not supported (only 3, BICUBIC)")));
            }
        }
        // `size` is deliberately not read: transformers 4.57's __init__ replaces any valid `size`
        // by the defaults and only `min_pixels` / `max_pixels` override them.
        let d = Self::default();
        let cfg = PreprocessorConfig {
            min_pixels: f.opt_usize("min_pixels")?.unwrap_or(d.min_pixels),
            max_pixels: f.opt_usize("max_pixels")?.unwrap_or(d.max_pixels),
            patch_size: f.opt_usize("patch_size")?.unwrap_or(d.patch_size),
            temporal_patch_size: f.opt_usize("temporal_patch_size")?.unwrap_or(d.temporal_patch_size),
            merge_size: f.opt_usize("merge_size")?.unwrap_or(d.merge_size),
            rescale_factor: f.opt_f64("rescale_factor")?.unwrap_or(d.rescale_factor),
            image_mean: per_channel(&f, "image_mean")?.unwrap_or(CLIP_MEAN).map(|v| v as f32),
            image_std: per_channel(&f, "image_std")?.unwrap_or(CLIP_STD).map(|v| v as f32),
        };
        for (key, v) in [
            ("patch_size", cfg.patch_size),
            ("temporal_patch_size", cfg.temporal_patch_size),
            ("merge_size", cfg.merge_size),
        ] {
            if v == 0 {
                return Err(f.err(format!("`{key}` must be positive")));
            }
        }
        if cfg.image_std.contains(&0.0) {
            return Err(f.err("`image_std` must not contain 0"));
        }
        Ok(cfg)
    }

    /// Side of the pixel grid that resized images snap to (28 for Qwen2.5-VL).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per flattened patch: channels · temporal · patch² (1176 for Qwen2.5-VL).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// A 3-element list of numbers, or one number for all channels (both are valid in transformers).
fn per_channel(f: &Fields, key: &str) -> Result<Option<[f64; 3]>> {
    let bad = || f.err(format!("`{key}` must be a number or a list of 3 numbers"));
    match f.obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(|v| Some([v; 3])).ok_or_else(bad),
        Some(Value::Array(items)) if items.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, item) in out.iter_mut().zip(items) {
                *o = item.as_f64().ok_or_else(bad)?;
            }
            Ok(Some(out))
        }
        Some(_) => Err(bad()),
    }
}

// ---------------------------------------------------------------------------------------------
// smart_resize
// ---------------------------------------------------------------------------------------------

/// transformers' `smart_resize`: the (height, width) to resize to, both multiples of `factor`,
/// with about the original aspect ratio and an area within [min_pixels, max_pixels].
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    smart_resize_impl(height, width, factor, min_pixels, max_pixels)
        .map_err(|reason| image_err(&format!("image of {height}x{width} (h x w)"), reason))
}

fn smart_resize_impl(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> std::result::Result<(usize, usize), String> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(format!("cannot resize {height}x{width} pixels to a grid of {factor}"));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > 200.0 {
        return Err(format!("absolute aspect ratio must be smaller than 200, got {ratio}"));
    }
    // Python's int / int and float ops on values < 2^53 are these f64 ops; `round` is half-to-even.
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    let area = height.saturating_mul(width) as f64;
    if h_bar.saturating_mul(w_bar) > max_pixels {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar.saturating_mul(w_bar) < min_pixels {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        // Only reachable with min_pixels = 0; transformers would fail later in PIL.
        return Err(format!("resizes to an empty {h_bar}x{w_bar} image"));
    }
    Ok((h_bar, w_bar))
}

// ---------------------------------------------------------------------------------------------
// Pillow BICUBIC resampling
// ---------------------------------------------------------------------------------------------

/// Fractional bits of the fixed-point weights: 8 for the pixel value and 2 of headroom for
/// bicubic's negative lobes leave 22 in an i32 (Pillow's PRECISION_BITS).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = -0.5, evaluated exactly as Pillow's `bicubic_filter`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The fixed-point taps of one resampling pass: output pixel `i` reads `len[i]` input pixels from
/// `start[i]` with weights `weights[i * ksize ..][.. len[i]]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box. Each f64
    /// operation is kept in Pillow's order: the weights must round to the same integers.
    fn new(in_size: usize, out_size: usize) -> Taps {
        const SUPPORT: f64 = 2.0;
        // Pillow takes the box edges as C floats: (double)(float in1 - float in0) / outSize.
        let scale = (in_size as f32) as f64 / out_size as f64;
        // When downscaling, the kernel is stretched over `scale` input pixels (antialiasing).
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut taps = Taps {
            start: Vec::with_capacity(out_size),
            len: Vec::with_capacity(out_size),
            ksize,
            weights: vec![0; out_size * ksize],
        };
        let mut raw = Vec::with_capacity(ksize);
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) casts truncate toward zero, like `as`.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            raw.clear();
            raw.extend((xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)));
            let total: f64 = raw.iter().sum();
            for (dst, &w) in taps.weights[xx * ksize..].iter_mut().zip(&raw) {
                let w = if total != 0.0 { w / total } else { w };
                // Round half away from zero, as Pillow does.
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                *dst = if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            taps.start.push(xmin as usize);
            taps.len.push(raw.len());
        }
        taps
    }

    /// One output value: the weighted sum of `len` samples `stride` bytes apart from `src[at]`,
    /// rounded (the 1/2 added up front) and clamped to u8.
    fn apply(&self, i: usize, src: &[u8], at: usize, stride: usize) -> u8 {
        let weights = &self.weights[i * self.ksize..][..self.len[i]];
        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
        for (j, &w) in weights.iter().enumerate() {
            acc += i64::from(src[at + j * stride]) * i64::from(w);
        }
        (acc >> PRECISION_BITS).clamp(0, 255) as u8
    }
}

/// Resizes RGB8 pixels (`w`x`h`, row-major) to `new_w`x`new_h` exactly as Pillow ≤ 12's
/// `Image.resize(..., Resampling.BICUBIC)`: separable, horizontal pass first, each pass rounded
/// and clamped to u8, a pass whose size does not change skipped.
///
/// # Panics
/// If `rgb.len() != w * h * 3` (an [`ImageInput`] always satisfies this).
pub fn resize_bicubic(rgb: &[u8], w: usize, h: usize, new_w: usize, new_h: usize) -> Vec<u8> {
    assert_eq!(rgb.len(), w * h * 3, "resize_bicubic: buffer is not {w}x{h} RGB8");
    if new_w == 0 || new_h == 0 {
        return Vec::new();
    }
    let mut cur = rgb.to_vec();
    if new_w != w {
        let taps = Taps::new(w, new_w);
        let mut out = Vec::with_capacity(new_w * h * 3);
        for y in 0..h {
            for x in 0..new_w {
                for c in 0..3 {
                    out.push(taps.apply(x, &cur, (y * w + taps.start[x]) * 3 + c, 3));
                }
            }
        }
        cur = out;
    }
    if new_h != h {
        let taps = Taps::new(h, new_h);
        let stride = new_w * 3;
        let mut out = Vec::with_capacity(new_w * new_h * 3);
        for y in 0..new_h {
            for i in 0..stride {
                out.push(taps.apply(y, &cur, taps.start[y] * stride + i, stride));
            }
        }
        cur = out;
    }
    cur
}

// ---------------------------------------------------------------------------------------------
// Preprocess
// ---------------------------------------------------------------------------------------------

/// The vision tower's input for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// `[N, patch_dim]` row-major, N = grid_t · grid_h · grid_w patches in the processor's order.
    pub pixel_values: Vec<f32>,
    /// (t, h, w) in patches, as transformers' `image_grid_thw`.
    pub grid_thw: [usize; 3],
    /// (height, width) in pixels after smart_resize.
    pub resized: (usize, usize),
    pub merge_size: usize,
}

impl Preprocessed {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Tokens after the 2x2 (merge²) patch merger: the number of `<|image_pad|>` tokens.
    pub fn num_merged_tokens(&self) -> usize {
        self.num_patches() / (self.merge_size * self.merge_size)
    }
}

/// The whole processor: smart_resize, Pillow BICUBIC resize, rescale, normalize, patchify.
pub fn preprocess(img: &ImageInput, cfg: &PreprocessorConfig) -> Result<Preprocessed> {
    let (h, w) = smart_resize_impl(img.height, img.width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)
        .map_err(|reason| image_err(&img.source_name, reason))?;
    let resized = resize_bicubic(&img.rgb, img.width, img.height, w, h);
    patchify(&resized, h, w, cfg).map_err(|reason| image_err(&img.source_name, reason))
}

/// Rescales, normalizes and patchifies already-resized RGB8 pixels; `height` and `width` must
/// be multiples of `cfg.factor()`.
pub fn normalize_and_patchify(
    rgb: &[u8],
    height: usize,
    width: usize,
    cfg: &PreprocessorConfig,
) -> Result<Preprocessed> {
    patchify(rgb, height, width, cfg).map_err(|reason| image_err(MEMORY, reason))
}

fn patchify(
    rgb: &[u8],
    height: usize,
    width: usize,
    cfg: &PreprocessorConfig,
) -> std::result::Result<Preprocessed, String> {
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let factor = cfg.factor();
    if height == 0 || width == 0 || height % factor != 0 || width % factor != 0 {
        return Err(format!(
            "{height}x{width} is not a non-empty multiple of {factor} pixels"
        ));
    }
    if height.checked_mul(width).and_then(|n| n.checked_mul(3)) != Some(rgb.len()) {
        return Err(format!("RGB8 buffer holds {} bytes, not {height}x{width}x3", rgb.len()));
    }
    // Each output value depends only on (byte, channel): x * (1/255) in f64, cast to f32, then
    // (x - mean) / std in f32, the numpy dtypes of transformers' rescale and normalize.
    let lut: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            std::array::from_fn(|v| {
                let x = (v as f64 * cfg.rescale_factor) as f32;
                (x - cfg.image_mean[c]) / cfg.image_std[c]
            })
        })
        .collect();
    let (grid_h, grid_w) = (height / p, width / p);
    let mut out = Vec::with_capacity(grid_h * grid_w * cfg.patch_dim());
    // Merged m x m blocks in raster order, then the block's patches in raster order, so the
    // merger's m² neighbours are consecutive rows. Inside a patch: channel, frame, row, column;
    // a still image fills all `t` frames with copies.
    for bh in 0..grid_h / m {
        for bw in 0..grid_w / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for (c, lut) in lut.iter().enumerate() {
                        for _ in 0..t {
                            for y in y0..y0 + p {
                                let row = &rgb[(y * width + x0) * 3..][..p * 3];
                                out.extend(row.chunks_exact(3).map(|px| lut[px[c] as usize]));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Preprocessed {
        pixel_values: out,
        grid_thw: [1, grid_h, grid_w],
        resized: (height, width),
        merge_size: m,
    })
}
