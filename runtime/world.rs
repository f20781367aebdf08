//! The shapes world: a small, deterministic visual world in which the MASSV effect can be
//! reproduced on any machine. Each scene is an 84×84 image with 1–3 distinct shapes of
//! distinct colours, each centred in its own cell of a 3×3 grid, on a plain or noisy
//! background, with a caption and visually grounded questions whose answers need the image.
//! A cell is 28×28 pixels: exactly one merged vision token (2×2 patches of 14), so each
//! shape is seen whole by one token of the target's vision tower.

use crate::sampling::Rng;

pub const IMAGE_SIZE: usize = 84;
/// Seeds of the splits: training scenes never appear in the held-out set.
pub const TRAIN_SEED: u64 = 1;
pub const HELDOUT_SEED: u64 = 2;
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 200, 30]),
    ("purple", [140, 60, 170]),
    ("orange", [245, 130, 20]),
];
const ROWS: [&str; 3] = ["top", "middle", "bottom"];
const COLS: [&str; 3] = ["left", "center", "right"];
const NUMBERS: [&str; 4] = ["zero", "one", "two", "three"];

#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub kind: usize,
    pub colour: usize,
    /// Cell of the 3×3 grid (row, column).
    pub cell: (usize, usize),
    /// Radius in pixels; the centre is the cell's.
    pub radius: f32,
    pub centre: (f32, f32),
}

impl Shape {
    pub fn kind_name(&self) -> &'static str {
        SHAPES[self.kind]
    }
    pub fn colour_name(&self) -> &'static str {
        COLOURS[self.colour].0
    }
    pub fn location(&self) -> String {
        match self.cell {
            (1, 1) => "center".into(),
            (r, c) => format!("{} {}", ROWS[r], COLS[c]),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub shapes: Vec<Shape>,
    pub noisy: bool,
    pub background: [u8; 3],
    noise_seed: u64,
}

/// What a question asks about; accuracy is reported per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuestionKind {
    Colour,
    Shape,
    Count,
    Position,
    Describe,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Qa {
    pub kind: QuestionKind,
    pub question: String,
    pub answer: String,
}

impl Scene {
    /// A random scene; the same seed gives the same scene.
    pub fn random(rng: &mut Rng) -> Scene {
        let n = 1 + (rng.next_u64() % 3) as usize;
        let kinds = pick_distinct(rng, SHAPES.len(), n);
        let colours = pick_distinct(rng, COLOURS.len(), n);
        let cells = pick_distinct(rng, 9, n);
        let cell_size = IMAGE_SIZE as f32 / 3.0;
        let shapes = (0..n)
            .map(|i| {
                let cell = (cells[i] / 3, cells[i] % 3);
                // Nearly one size: the frozen random vision tower then sees one pattern per shape.
                let radius = 11.5 + rng.uniform() as f32;
                let cx = (cell.1 as f32 + 0.5) * cell_size;
                let cy = (cell.0 as f32 + 0.5) * cell_size;
                Shape {
                    kind: kinds[i],
                    colour: colours[i],
                    cell,
                    radius,
                    centre: (cx, cy),
                }
            })
            .collect();
        let grey = 200 + (rng.next_u64() % 50) as u8;
        let tint = (rng.next_u64() % 3) as usize;
        let mut background = [grey; 3];
        background[tint] = background[tint].saturating_add(5);
        Scene {
            shapes,
            noisy: rng.next_u64() % 2 == 0,
            background,
            noise_seed: rng.next_u64(),
        }
    }

    /// The image as RGB8, IMAGE_SIZE × IMAGE_SIZE, row-major.
    pub fn render(&self) -> Vec<u8> {
        let mut rng = Rng::new(self.noise_seed);
        let mut px = Vec::with_capacity(IMAGE_SIZE * IMAGE_SIZE * 3);
        for _ in 0..IMAGE_SIZE * IMAGE_SIZE {
            for &b in &self.background {
                let noise = if self.noisy {
                    (rng.next_u64() % 41) as i32 - 20
                } else {
                    0
                };
                px.push((b as i32 + noise).clamp(0, 255) as u8);
            }
        }
        for s in &self.shapes {
            let rgb = COLOURS[s.colour].1;
            for y in 0..IMAGE_SIZE {
                for x in 0..IMAGE_SIZE {
                    let (dx, dy) = (x as f32 + 0.5 - s.centre.0, y as f32 + 0.5 - s.centre.1);
                    if inside(s.kind, dx / s.radius, dy / s.radius) {
                        px[(y * IMAGE_SIZE + x) * 3..][..3].copy_from_slice(&rgb);
                    }
                }
            }
        }
        px
    }

    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .shapes
            .iter()
            .map(|s| format!("{} {} {}", article(s.colour_name()), s.colour_name(), s.kind_name()))
            .collect();
        let list = match parts.len() {
            1 => parts[0].clone(),
            2 => format!("{} and {}", parts[0], parts[1]),
            _ => format!("{}, {} and {}", parts[0], parts[1], parts[2]),
        };
        let bg = if self.noisy { "noisy" } else { "plain" };
        capitalise(&format!("{list} on a {bg} background."))
    }

    /// Every question the scene answers (one per kind and shape).
    pub fn questions(&self) -> Vec<Qa> {
        let mut qs = Vec::new();
        for s in &self.shapes {
            let (k, c) = (s.kind_name(), s.colour_name());
            qs.push(Qa {
                kind: QuestionKind::Colour,
                question: format!("What colour is the {k}?"),
                answer: format!("The {k} is {c}."),
            });
            qs.push(Qa {
                kind: QuestionKind::Shape,
                question: format!("What shape is {c}?"),
                answer: format!("The {c} shape is a {k}."),
            });
            qs.push(Qa {
                kind: QuestionKind::Position,
                question: format!("Where is the {c} {k}?"),
                answer: format!("The {c} {k} is at the {}.", s.location()),
            });
        }
        let n = self.shapes.len();
        let count = if n == 1 {
            "There is one shape.".to_string()
        } else {
            format!("There are {} shapes.", NUMBERS[n])
        };
        qs.push(Qa {
            kind: QuestionKind::Count,
            question: "How many shapes are there?".into(),
            answer: count,
        });
        qs.push(Qa {
            kind: QuestionKind::Describe,
            question: "Describe the image.".into(),
            answer: self.caption(),
        });
        qs
    }
}

/// Whether (x, y), in units of the radius from the centre, is inside the shape.
fn inside(kind: usize, x: f32, y: f32) -> bool {
    match SHAPES[kind] {
        "circle" => x * x + y * y <= 1.0,
        "square" => x.abs() <= 0.85 && y.abs() <= 0.85,
        // Apex up, base at y = 0.8.
        "triangle" => (-1.0..=0.8).contains(&y) && x.abs() <= (y + 1.0) / 1.8 * 0.95,
        _ => {
            // Five-pointed star: radius oscillating between 0.45 and 1 with the angle.
            let r = (x * x + y * y).sqrt();
            let a = y.atan2(x) + std::f32::consts::FRAC_PI_2;
            let t = (a * 5.0 / (2.0 * std::f32::consts::PI)).rem_euclid(1.0);
            let edge = 0.45 + 0.55 * (1.0 - 2.0 * (t - 0.5).abs()).powi(2);
            r <= edge
        }
    }
}

fn pick_distinct(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// The scenes of a split: `count` scenes from `seed` (train and held-out use different seeds).
pub fn scenes(seed: u64, count: usize) -> Vec<Scene> {
    let mut rng = Rng::new(seed);
    (0..count).map(|_| Scene::random(&mut rng)).collect()
}

/// Every text the world can produce, for training its tokenizer.
pub fn corpus(scenes: &[Scene]) -> Vec<String> {
    let mut out = Vec::new();
    for s in scenes {
        out.push(s.caption());
        for q in s.questions() {
            out.push(q.question);
            out.push(q.answer);
        }
    }
    out
}

/// The 22 added tokens of every Qwen2 tokenizer, in id order (the first 14 special).
pub const QWEN2_ADDED_TOKENS: [&str; 22] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
];

/// Trains a byte-level BPE of `vocab_size` tokens on `texts`, Qwen2-style (NFC, the Qwen2
/// split pattern, byte-level), appends the Qwen2 added tokens and writes
/// `tokenizer.json` + `tokenizer_config.json` (with `chat_template`) into `dir`.
pub fn train_tokenizer(
    texts: &[String],
    vocab_size: usize,
    chat_template: &str,
    dir: &std::path::Path,
) -> crate::Result<()> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    let err = |e: String| crate::Error::Tokenizer {
        path: dir.join("tokenizer.json"),
        reason: e,
    };
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    crate::tokenizer::set_qwen2_pipeline(&mut tok).map_err(err)?;
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(1)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    tok.train(&mut trainer, texts.iter()).map_err(|e| err(e.to_string()))?;
    let base = tok.get_vocab_size(true) as u32;
    let mut decoder = serde_json::Map::new();
    for (i, t) in QWEN2_ADDED_TOKENS.iter().enumerate() {
        let special = i < 14;
        tok.add_special_tokens(&[AddedToken::from(*t, special).normalized(false)]);
        decoder.insert(
            (base + i as u32).to_string(),
            serde_json::json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                               "single_word": false, "special": special}),
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let json = tok.to_string(false).map_err(|e| err(e.to_string()))?;
    crate::weights::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let cfg = serde_json::json!({
        "added_tokens_decoder": decoder,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
        "model_max_length": 4096,
        "tokenizer_class": "Qwen2Tokenizer",
    });
    crate::weights::write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap_or_default().as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_consistent() {
        let a = scenes(1, 50);
        assert_eq!(a, scenes(1, 50));
        assert_ne!(a, scenes(2, 50));
        for s in &a {
            assert!((1..=3).contains(&s.shapes.len()));
            let px = s.render();
            assert_eq!(px.len(), IMAGE_SIZE * IMAGE_SIZE * 3);
            // Every shape's colour is visible at its centre.
            for sh in &s.shapes {
                let (x, y) = (sh.centre.0 as usize, sh.centre.1 as usize);
                assert_eq!(
                    &px[(y * IMAGE_SIZE + x) * 3..][..3],
                    &COLOURS[sh.colour].1,
                    "{}",
                    s.caption()
                );
            }
            let qs = s.questions();
            assert_eq!(qs.len(), 3 * s.shapes.len() + 2);
        }
    }

    #[test]
    fn questions_read_naturally() {
        let s = Scene {
            shapes: vec![Shape {
                kind: 2,
                colour: 0,
                cell: (0, 2),
                radius: 10.0,
                centre: (90.0, 18.0),
            }],
            noisy: false,
            background: [220; 3],
            noise_seed: 0,
        };
        let qs = s.questions();
        assert_eq!(qs[0].answer, "The triangle is red.");
        assert_eq!(qs[1].answer, "The red shape is a triangle.");
        assert_eq!(qs[2].answer, "The red triangle is at the top right.");
        assert_eq!(qs[3].answer, "There is one shape.");
        assert_eq!(s.caption(), "A red triangle on a plain background.");
    }

    #[test]
    fn world_tokenizer_round_trips_and_templates() {
        let tmp = tempfile::tempdir().unwrap();
        let texts = corpus(&scenes(3, 200));
        let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";
        train_tokenizer(&texts, 400, template, tmp.path()).unwrap();
        let tok = crate::tokenizer::Tokenizer::from_dir(tmp.path()).unwrap();
        // The world's text saturates below 400 merges; added tokens follow the BPE ids.
        let base = tok.vocab_size() as u32 - 22;
        assert!(base <= 400 && base > 256, "{base}");
        assert_eq!(tok.token_to_id("<|image_pad|>"), Some(base + 12));
        for t in &texts[..20] {
            let ids = tok.encode(t).unwrap();
            assert!(
                ids.len() <= t.split(' ').count() + 3,
                "{t}: {ids:?} — words should be whole tokens"
            );
            assert_eq!(&tok.decode(&ids, false).unwrap(), t);
        }
        assert_eq!(tok.eos_token_id(), Some(base + 2));
    }
}
