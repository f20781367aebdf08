//! Image preprocessing against transformers' `Qwen2VLImageProcessor` (4.57.6) and Pillow 12.3.0:
//! decode, smart_resize, BICUBIC resize (byte for byte), rescale/normalize/patchify, and errors.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, max_abs_diff, Golden};
use massv::image::{normalize_and_patchify, preprocess, resize_bicubic, smart_resize, ImageInput, PreprocessorConfig};
use massv::Error;
use safetensors::{Dtype, SafeTensors};

const HUB: &str = "qwen2_5_vl-tiny-hub";
/// Lossless cases: our decode must equal Pillow's, so everything downstream is exact.
const LOSSLESS: [&str; 5] = [
    "ongrid_56x84",
    "nonsquare_150x100",
    "small_20x30",
    "big_300x200",
    "photo_64x64",
];
const JPEG: &str = "photo_90x70";
/// Decoder tolerance. Our JPEG decoder is zune-jpeg (the `image` crate's), Pillow's is
/// libjpeg-turbo; both use integer IDCTs and triangle ("fancy") chroma upsampling but round
/// differently, so about a quarter of the bytes differ, by at most 4 away from the last row and
/// column (measured on Pillow-encoded q75-q100 JPEGs, 4:2:0 / 4:2:2 / 4:4:4, baseline and
/// progressive). On the last column/row, where the width/height is not a multiple of the MCU,
/// zune-jpeg upsamples from the encoder's padding while libjpeg-turbo replicates the edge sample,
/// so differences there follow the chroma contrast at the edge (38 on the fixture).
const JPEG_INTERIOR_TOLERANCE: u8 = 4;
const JPEG_MEAN_TOLERANCE: f64 = 1.0;

fn cfg() -> PreprocessorConfig {
    PreprocessorConfig::from_dir(&fixture(HUB)).expect("fixture preprocessor_config.json")
}

fn image_path(case: &str) -> PathBuf {
    let file = match case {
        JPEG => format!("{case}.jpg"),
        "photo_64x64" => format!("{case}.webp"),
        _ => format!("{case}.png"),
    };
    fixture("images").join(file)
}

fn golden(case: &str) -> Golden {
    Golden::open(&fixture(HUB).join(format!("expected_{case}.safetensors")))
}

fn meta(case: &str) -> serde_json::Value {
    let path = fixture(HUB).join(format!("expected_{case}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn hw(v: &serde_json::Value) -> (usize, usize) {
    (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize)
}

/// A u8 tensor of a safetensors file: (shape, bytes).
fn u8_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("golden file parses");
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{name} missing"));
    assert_eq!(t.dtype(), Dtype::U8, "{name}");
    (t.shape().to_vec(), t.data().to_vec())
}

fn golden_u8(case: &str, name: &str) -> (Vec<usize>, Vec<u8>) {
    u8_tensor(&fixture(HUB).join(format!("expected_{case}.safetensors")), name)
}

/// Number of differing bytes and the largest difference.
fn byte_diff(a: &[u8], b: &[u8]) -> (usize, u8) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diffs = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).filter(|&d| d > 0);
    diffs.fold((0, 0), |(n, m), d| (n + 1, m.max(d)))
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.len() as f64
}

fn assert_bytes_eq(ours: &[u8], pillow: &[u8], what: &str) {
    let (n, max) = byte_diff(ours, pillow);
    assert!(
        n == 0,
        "{what}: {n} of {} bytes differ from Pillow (max {max})",
        ours.len()
    );
}

/// The golden's pixel_values and grid against ours.
fn check_pixel_values(case: &str, ours: &massv::image::Preprocessed) {
    let g = golden(case);
    let (shape, expected) = g.f32("pixel_values");
    let (_, grid) = g.i64("image_grid_thw");
    let grid: Vec<usize> = grid.iter().map(|&v| v as usize).collect();
    assert_eq!(ours.grid_thw.to_vec(), grid, "{case}: grid_thw");
    assert_eq!(shape, vec![ours.num_patches(), 1176], "{case}: pixel_values shape");
    assert_eq!(ours.num_merged_tokens(), shape[0] / 4, "{case}: merged tokens");
    let diff = max_abs_diff(&ours.pixel_values, &expected);
    assert!(diff <= 1e-6, "{case}: pixel_values differ by {diff}");
    // Same f32 ops in the same order as numpy, so the values are in fact identical bit for bit.
    let differing = ours
        .pixel_values
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "{case}: {differing} pixel_values differ in their last bits"
    );
}

#[track_caller]
fn expect_image_err<T: std::fmt::Debug>(r: massv::Result<T>, source: &str, words: &[&str]) -> String {
    match r {
        Err(Error::Image { source_name, reason }) => {
            assert_eq!(source_name, source, "source_name ({reason})");
            for w in words {
                assert!(reason.contains(w), "reason {reason:?} lacks {w:?}");
            }
            reason
        }
        other => panic!("expected Error::Image, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// smart_resize
// ---------------------------------------------------------------------------------------------

#[test]
fn smart_resize_matches_goldens() {
    let cfg = cfg();
    assert_eq!(cfg.factor(), 28);
    for case in LOSSLESS.iter().chain([&JPEG]) {
        let m = meta(case);
        let (h, w) = hw(&m["original_hw"]);
        let img = ImageInput::from_path(&image_path(case)).unwrap();
        assert_eq!((img.height(), img.width()), (h, w), "{case}: decoded size");
        let got = smart_resize(h, w, cfg.factor(), cfg.min_pixels, cfg.max_pixels).unwrap();
        assert_eq!(got, hw(&m["smart_resize_hw"]), "{case}");
    }
}

#[test]
fn smart_resize_unit_cases() {
    let big = 28 * 28 * 1280;
    // Python's round is half-to-even: 70/28 = 2.5 -> 2, 126/28 = 4.5 -> 4 (half-up gives 3 and 5).
    assert_eq!(smart_resize(70, 90, 28, 3136, big).unwrap(), (56, 84));
    assert_eq!(smart_resize(126, 126, 28, 3136, big).unwrap(), (112, 112));
    assert_eq!(smart_resize(98, 98, 28, 3136, big).unwrap(), (112, 112)); // 3.5 -> 4
                                                                          // Below min_pixels: ceil path.
    assert_eq!(smart_resize(30, 20, 28, 3136, 31360).unwrap(), (84, 56));
    // Above max_pixels: floor path, and max(factor, ...) keeps the short side at one unit.
    assert_eq!(smart_resize(200, 300, 28, 3136, 31360).unwrap(), (140, 196));
    assert_eq!(smart_resize(28, 4200, 28, 3136, 28 * 28 * 10).unwrap(), (28, 1064));
    // Aspect ratio: 200 is allowed, anything above is an error (either orientation).
    assert_eq!(smart_resize(1, 200, 28, 3136, big).unwrap(), (28, 812));
    expect_image_err(
        smart_resize(1, 201, 28, 3136, big),
        "image of 1x201 (h x w)",
        &["aspect ratio", "200"],
    );
    expect_image_err(
        smart_resize(402, 2, 28, 3136, big),
        "image of 402x2 (h x w)",
        &["aspect ratio"],
    );
    expect_image_err(smart_resize(0, 5, 28, 3136, big), "image of 0x5 (h x w)", &[]);
}

/// 348 cases from transformers' smart_resize: random sizes and bounds, ties, the aspect limit,
/// other factors (tests/reference/make_resize_cases.py).
#[test]
fn smart_resize_matches_transformers_on_random_cases() {
    let path = fixture("resize_cases/smart_resize.json");
    let rows: Vec<Vec<Option<usize>>> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(rows.len() > 300);
    for row in rows {
        let [h, w, f, lo, hi] = [0, 1, 2, 3, 4].map(|i| row[i].unwrap());
        let got = smart_resize(h, w, f, lo, hi).ok();
        let expected = row[5].zip(row[6]);
        assert_eq!(got, expected, "smart_resize({h}, {w}, factor={f}, min={lo}, max={hi})");
    }
}

// ---------------------------------------------------------------------------------------------
// Resize
// ---------------------------------------------------------------------------------------------

#[test]
fn resize_matches_pillow_byte_for_byte() {
    let cfg = cfg();
    for case in LOSSLESS {
        let img = ImageInput::from_path(&image_path(case)).unwrap();
        let (h, w) = smart_resize(img.height(), img.width(), cfg.factor(), cfg.min_pixels, cfg.max_pixels).unwrap();
        let ours = resize_bicubic(img.rgb(), img.width(), img.height(), w, h);
        let (shape, pillow) = golden_u8(case, "resized_rgb");
        assert_eq!(shape, vec![h, w, 3], "{case}");
        assert_bytes_eq(&ours, &pillow, case);
    }
}

/// Pillow-generated resizes of random content: upscales up to 20x, downscales down to 1/90,
/// one axis only, mixed directions, unchanged size (tests/reference/make_resize_cases.py).
#[test]
fn resize_matches_pillow_on_extra_cases() {
    let path = fixture("resize_cases/pillow_bicubic.safetensors");
    let mut n = 0;
    for i in 0.. {
        let name = format!("{i:02}.input");
        let bytes = std::fs::read(&path).unwrap();
        if SafeTensors::deserialize(&bytes).unwrap().tensor(&name).is_err() {
            break;
        }
        let (si, input) = u8_tensor(&path, &name);
        let (so, expected) = u8_tensor(&path, &format!("{i:02}.output"));
        let ours = resize_bicubic(&input, si[1], si[0], so[1], so[0]);
        assert_bytes_eq(
            &ours,
            &expected,
            &format!("case {i}: {}x{} -> {}x{}", si[1], si[0], so[1], so[0]),
        );
        n += 1;
    }
    assert_eq!(n, 14);
}

#[test]
fn resize_to_same_size_is_identity() {
    let rgb: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
    assert_eq!(resize_bicubic(&rgb, 7, 5, 7, 5), rgb);
    assert!(resize_bicubic(&rgb, 7, 5, 0, 3).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Whole processor
// ---------------------------------------------------------------------------------------------

#[test]
fn pixel_values_match_goldens() {
    let cfg = cfg();
    for case in LOSSLESS {
        let img = ImageInput::from_path(&image_path(case)).unwrap();
        let out = preprocess(&img, &cfg).unwrap();
        let m = meta(case);
        assert_eq!(out.resized, hw(&m["smart_resize_hw"]), "{case}");
        check_pixel_values(case, &out);
    }
}

#[test]
fn pixel_values_are_a_function_of_pillows_resized_bytes() {
    // Tests normalize + patchify alone, from Pillow's own resize output, for every case.
    let cfg = cfg();
    for case in LOSSLESS.iter().chain([&JPEG]) {
        let (shape, resized) = golden_u8(case, "resized_rgb");
        let out = normalize_and_patchify(&resized, shape[0], shape[1], &cfg).unwrap();
        check_pixel_values(case, &out);
    }
}

#[test]
fn in_memory_and_raw_inputs_give_the_same_result() {
    let cfg = cfg();
    let path = image_path("nonsquare_150x100");
    let from_path = ImageInput::from_path(&path).unwrap();
    assert_eq!(from_path.source_name(), path.display().to_string());
    let from_mem = ImageInput::from_encoded(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(from_mem.source_name(), "<memory>");
    let raw = ImageInput::from_rgb8(from_path.width(), from_path.height(), from_path.rgb().to_vec()).unwrap();
    let a = preprocess(&from_path, &cfg).unwrap();
    assert_eq!(a, preprocess(&from_mem, &cfg).unwrap());
    assert_eq!(a, preprocess(&raw, &cfg).unwrap());
}

/// The JPEG: our decoder is zune-jpeg, Pillow's is libjpeg-turbo. Their outputs may differ by a
/// small amount per byte; everything after decoding must still be exact on Pillow's bytes.
#[test]
fn jpeg_decode_is_close_and_resize_of_pillows_decode_is_exact() {
    let cfg = cfg();
    let ours = ImageInput::from_path(&image_path(JPEG)).unwrap();
    let (shape, pillow_decoded) = golden_u8(JPEG, "decoded_rgb");
    assert_eq!(shape, vec![ours.height(), ours.width(), 3]);
    let (w, h) = (ours.width(), ours.height());
    let (n, max) = byte_diff(ours.rgb(), &pillow_decoded);
    let interior = |rgb: &[u8]| -> Vec<u8> {
        rgb.chunks(w * 3)
            .take(h - 1)
            .flat_map(|r| &r[..(w - 1) * 3])
            .copied()
            .collect()
    };
    let (_, interior_max) = byte_diff(&interior(ours.rgb()), &interior(&pillow_decoded));
    let mean = mean_abs_diff(ours.rgb(), &pillow_decoded);
    eprintln!(
        "{JPEG}: zune-jpeg vs libjpeg-turbo: {n} of {} bytes differ, max {max} (interior {interior_max}), mean {mean:.3}",
        pillow_decoded.len()
    );
    assert!(
        interior_max <= JPEG_INTERIOR_TOLERANCE,
        "JPEG decode differs from Pillow by {interior_max}"
    );
    assert!(
        mean <= JPEG_MEAN_TOLERANCE,
        "JPEG decode differs from Pillow by {mean} on average"
    );

    // From Pillow's decoded pixels, resize and pixel_values are exact.
    let pillow_img = ImageInput::from_rgb8(ours.width(), ours.height(), pillow_decoded).unwrap();
    let out = preprocess(&pillow_img, &cfg).unwrap();
    let resized = resize_bicubic(pillow_img.rgb(), pillow_img.width(), pillow_img.height(), 84, 56);
    assert_bytes_eq(&resized, &golden_u8(JPEG, "resized_rgb").1, JPEG);
    check_pixel_values(JPEG, &out);

    // From our own decode, the grid is the same and the resized pixels close.
    let own = preprocess(&ours, &cfg).unwrap();
    assert_eq!(own.grid_thw, out.grid_thw);
    let own_resized = resize_bicubic(ours.rgb(), w, h, 84, 56);
    let mean = mean_abs_diff(&own_resized, &resized);
    let diff = max_abs_diff(&own.pixel_values, &out.pixel_values);
    eprintln!("{JPEG}: from our decode, resized bytes differ by {mean:.3} on average, pixel_values by at most {diff}");
    assert!(mean <= JPEG_MEAN_TOLERANCE, "{mean}");
}

#[test]
fn image_over_max_pixels_is_resized_down() {
    let cfg = cfg();
    let (w, h) = (1000, 800);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    let out = preprocess(&ImageInput::from_rgb8(w, h, rgb).unwrap(), &cfg).unwrap();
    let (rh, rw) = out.resized;
    assert!(rh * rw <= cfg.max_pixels, "{rh}x{rw}");
    assert_eq!((rh % 28, rw % 28), (0, 0));
    assert_eq!(out.grid_thw, [1, rh / 14, rw / 14]);
    assert_eq!(out.pixel_values.len(), out.num_patches() * 1176);
}

/// Decoding matches transformers' `load_image(path)`: EXIF orientation applied
/// (`ImageOps.exif_transpose`), then Pillow's `convert("RGB")`, including its 16-bit quirks
/// (high byte of 16-bit colour, 16-bit grey clamped to 255), alpha dropped, palettes expanded.
#[test]
fn decoding_matches_pillow_load_image() {
    let dir = fixture("resize_cases");
    let expected = std::fs::read(dir.join("decode.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&expected).unwrap();
    let mut names = expected.names();
    names.sort();
    assert_eq!(names.len(), 15);
    for name in names {
        let img = ImageInput::from_path(&dir.join(format!("{name}.png"))).unwrap();
        let t = expected.tensor(name).unwrap();
        assert_eq!((img.height(), img.width()), (t.shape()[0], t.shape()[1]), "{name}");
        let (n, max) = byte_diff(img.rgb(), t.data());
        assert!(n == 0, "{name}: {n} bytes differ from Pillow (max {max})");
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inputs_are_image_errors() {
    expect_image_err(
        ImageInput::from_encoded(b"definitely not an image"),
        "<memory>",
        &["PNG"],
    );
    expect_image_err(ImageInput::from_encoded(&[]), "<memory>", &[]);
    expect_image_err(
        ImageInput::from_encoded(b"GIF89a\x01\x00\x01\x00"),
        "<memory>",
        &["not supported"],
    );

    let png = std::fs::read(image_path("big_300x200")).unwrap();
    for cut in [png.len() / 2, 40, 8] {
        expect_image_err(ImageInput::from_encoded(&png[..cut]), "<memory>", &["PNG"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    expect_image_err(ImageInput::from_path(&truncated), &truncated.display().to_string(), &[]);

    expect_image_err(ImageInput::from_rgb8(0, 0, vec![]), "<memory>", &["empty"]);
    expect_image_err(ImageInput::from_rgb8(0, 10, vec![]), "<memory>", &["empty"]);
    expect_image_err(ImageInput::from_rgb8(4, 3, vec![0; 35]), "<memory>", &["35 bytes"]);
    expect_image_err(ImageInput::from_rgb8(usize::MAX, 3, vec![0; 9]), "<memory>", &[]);

    // Too elongated for transformers: refused by preprocess, naming the source.
    let thin = ImageInput::from_rgb8(201, 1, vec![0; 201 * 3]).unwrap();
    expect_image_err(preprocess(&thin, &cfg()), "<memory>", &["aspect ratio"]);

    match ImageInput::from_path(Path::new("/nonexistent/image.png")) {
        Err(Error::Io { .. }) => {}
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

#[test]
fn config_from_fixture_and_defaults() {
    let c = cfg();
    assert_eq!((c.min_pixels, c.max_pixels), (3136, 31360));
    assert_eq!((c.patch_size, c.temporal_patch_size, c.merge_size), (14, 2, 2));
    // numpy casts the JSON doubles to the image's f32.
    assert_eq!(c.image_mean, [0.48145466f64, 0.4578275, 0.40821073].map(|v| v as f32));
    assert_eq!(c.image_std, [0.26862954f64, 0.26130258, 0.27577711].map(|v| v as f32));
    assert_eq!(c.patch_dim(), 1176);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    // `size` is ignored, as transformers 4.57's Qwen2VLImageProcessor ignores it.
    std::fs::write(&path, r#"{"size": {"shortest_edge": 10, "longest_edge": 20}}"#).unwrap();
    let d = PreprocessorConfig::from_dir(dir.path()).unwrap();
    assert_eq!(d, PreprocessorConfig::default());
    assert_eq!((d.min_pixels, d.max_pixels), (56 * 56, 28 * 28 * 1280));

    std::fs::write(&path, r#"{"image_mean": 0.5, "image_std": [1, 2, 4]}"#).unwrap();
    let d = PreprocessorConfig::from_dir(dir.path()).unwrap();
    assert_eq!((d.image_mean, d.image_std), ([0.5; 3], [1.0, 2.0, 4.0]));
}

#[test]
fn bad_configs_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    match PreprocessorConfig::from_dir(dir.path()) {
        Err(Error::Config { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected Error::Config, got {other:?}"),
    }
    for (json, field) in [
        (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
        (r#"{"image_std": "x"}"#, "image_std"),
        (r#"{"max_pixels": -1}"#, "max_pixels"),
        (r#"{"patch_size": 0}"#, "patch_size"),
        (r#"{"do_normalize": false}"#, "do_normalize"),
        (r#"{"resample": 2}"#, "resample"),
    ] {
        std::fs::write(&path, json).unwrap();
        match PreprocessorConfig::from_dir(dir.path()) {
            Err(Error::Config { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(reason.contains(field), "{json}: {reason}");
            }
            other => panic!("{json}: expected Error::Config, got {other:?}"),
        }
    }
}
