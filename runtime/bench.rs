//! `massv bench`: target-only, text-drafter and MASSV-drafter decoding (chains, and
//! token trees with `--tree`) on the same inputs, one table (MAL, drafted tokens per
//! pass, tokens/s, ms per token, per-stage ms, speedup), and the decode step of a model
//! next to its memory-bandwidth floor. The target's LM runs where `--device` puts it,
//! each drafter's beside it where the kernels serve the drafter (else on the CPU), and
//! the floor model's where `--device` puts it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backend::{cuda, Device, DeviceRequest};
use crate::error::Result;
use crate::image::ImageInput;
use crate::model::qwen2::Logits;
use crate::model::{Lm, Target};
use crate::spec::engine::{Engine, GenerateParams, Hooks};
use crate::spec::tree::TreeSpec;

/// One decoding setup of the comparison.
#[derive(Debug, Clone)]
pub struct Setup {
    pub label: String,
    pub drafter: Option<PathBuf>,
    /// Token trees of this shape instead of chains of γ.
    pub tree: Option<TreeSpec>,
}

/// One row of the table: a decoding setup summed over every input.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setup: String,
    /// Tokens emitted by verification passes / passes, over all inputs.
    pub mal: f64,
    /// Drafted tokens the target scores per pass (γ for chains, mean nodes for trees):
    /// the verify cost beside the MAL it buys.
    pub drafted_per_pass: f64,
    pub tokens_per_s: f64,
    pub ms_per_token: f64,
    pub speedup: f64,
    /// Mean per-request stage times (ms).
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub accept_ms: f64,
    pub tokens: usize,
    pub passes: usize,
}

pub struct Input {
    pub prompt: String,
    pub image: Option<ImageInput>,
}

/// Runs `setups` over `inputs` on the CPU; the first setup is the speedup baseline.
pub fn compare(target: &Path, setups: &[Setup], inputs: &[Input], params: &GenerateParams) -> Result<Vec<Row>> {
    Ok(compare_on(target, setups, inputs, params, DeviceRequest::Cpu)?.0)
}

/// [`compare`] with the target's LM on the device `req` means for it (chosen once, by
/// the first setup's load, and kept for the others); returns that device too.
pub fn compare_on(
    target: &Path,
    setups: &[Setup],
    inputs: &[Input],
    params: &GenerateParams,
    req: DeviceRequest,
) -> Result<(Vec<Row>, Device)> {
    let mut rows: Vec<Row> = Vec::new();
    let mut device = None;
    for setup in setups {
        let engine = match device {
            None => Engine::load_for(target, setup.drafter.as_deref(), req)?,
            Some(d) => Engine::load_on(target, setup.drafter.as_deref(), d)?,
        };
        device = Some(engine.target.device());
        let p = GenerateParams {
            draft_mode: None,
            tree: setup.tree.clone(),
            ..params.clone()
        };
        let (mut tokens, mut passes, mut emitted, mut loop_s) = (0usize, 0usize, 0.0f64, 0.0f64);
        let mut drafted = 0.0f64;
        let mut stage = [0.0f64; 5];
        for input in inputs {
            let out = engine.generate(&input.prompt, input.image.as_ref(), &p, Hooks::default())?;
            let m = &out.metrics;
            let t = &m.timings_ms;
            tokens += out.tokens.len().saturating_sub(1);
            passes += m.target_passes;
            emitted += m.mal * m.target_passes as f64;
            let per_pass = match setup.tree {
                Some(_) => m.tree_nodes,
                None if setup.drafter.is_some() => m.gamma as f64,
                None => 0.0,
            };
            drafted += per_pass * m.target_passes as f64;
            loop_s += (t.draft + t.verify + t.accept) / 1e3;
            for (acc, v) in stage.iter_mut().zip([
                t.vision,
                t.prefill_target + t.prefill_draft,
                t.draft,
                t.verify,
                t.accept,
            ]) {
                *acc += v / inputs.len() as f64;
            }
        }
        let ms_per_token = if tokens > 0 { loop_s * 1e3 / tokens as f64 } else { 0.0 };
        let speedup = rows.first().map_or(1.0, |base| {
            if ms_per_token > 0.0 {
                base.ms_per_token / ms_per_token
            } else {
                0.0
            }
        });
        rows.push(Row {
            setup: setup.label.clone(),
            mal: if passes > 0 { emitted / passes as f64 } else { 0.0 },
            drafted_per_pass: if passes > 0 { drafted / passes as f64 } else { 0.0 },
            tokens_per_s: if loop_s > 0.0 { tokens as f64 / loop_s } else { 0.0 },
            ms_per_token,
            speedup,
            vision_ms: stage[0],
            prefill_ms: stage[1],
            draft_ms: stage[2],
            verify_ms: stage[3],
            accept_ms: stage[4],
            tokens,
            passes,
        });
    }
    let device = match device {
        Some(d) => d,
        None => Target::choose_device(target, req)?,
    };
    Ok((rows, device))
}

pub fn print_table(rows: &[Row]) {
    println!(
        "{:<28} {:>6} {:>7} {:>9} {:>8} {:>8} {:>9} {:>10} {:>9} {:>10} {:>9}",
        "setup", "MAL", "drafted", "tok/s", "ms/tok", "speedup", "vision", "prefill", "draft", "verify", "accept"
    );
    for r in rows {
        println!(
            "{:<28} {:>6.2} {:>7.1} {:>9.1} {:>8.2} {:>7.2}x {:>9.2} {:>10.2} {:>9.2} {:>10.2} {:>9.2}",
            r.setup,
            r.mal,
            r.drafted_per_pass,
            r.tokens_per_s,
            r.ms_per_token,
            r.speedup,
            r.vision_ms,
            r.prefill_ms,
            r.draft_ms,
            r.verify_ms,
            r.accept_ms
        );
    }
    println!("(drafted: tokens the target scores per pass besides the last one; stage columns: mean ms per request)");
}

/// A model's decode step against the time it takes just to stream its weights once.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub model: String,
    /// Where the step ran ([`device_name`]).
    pub device: String,
    pub weight_bytes: usize,
    pub copy_gb_per_s: f64,
    pub floor_ms: f64,
    pub decode_step_ms: f64,
    pub ratio_to_floor: f64,
}

/// Decode-step time of the LM in `dir` where `req` puts it, as [`Target::load_for`]
/// does (mean over `steps` greedy steps after a short prompt, each ending in its argmax
/// on the host, as decoding waits for it), and its floor: the bytes of weights a step
/// reads (f32 on the CPU, bf16 on a GPU) / that device's measured copy bandwidth.
pub fn decode_floor(dir: &Path, steps: usize, req: DeviceRequest) -> Result<Floor> {
    let target = Target::load_for(dir, req)?;
    let cfg = target.text_config().clone();
    let (d, i, l) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers);
    let per_layer = (cfg.q_dim() + 2 * cfg.kv_dim()) * d + d * cfg.q_dim() + 3 * d * i + 2 * d;
    // A step reads every layer plus the head (the embedding table when tied); the
    // embedding lookup itself touches one row.
    let elem = match target.device() {
        Device::Cpu => 4,
        Device::Cuda => 2,
    };
    let weight_bytes = elem * (l * per_layer + cfg.vocab_size * d + d);
    let prompt: Vec<u32> = (0..16).map(|t| t % cfg.vocab_size as u32).collect();
    let (_, mut s) = target.prefill(&prompt, &[], &[], steps + 1, Logits::Last)?;
    target.decode_argmax(&[1], &mut s)?; // warm-up
    let t0 = Instant::now();
    for k in 0..steps {
        target.decode_argmax(&[(k % 100) as u32], &mut s)?;
    }
    let decode_step_ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let copy = match target.lm() {
        Lm::Cuda(m) => m.device().copy_bandwidth()? / 1e9,
        Lm::Cpu(_) => copy_bandwidth(),
    };
    let floor_ms = weight_bytes as f64 / (copy * 1e9) * 1e3;
    Ok(Floor {
        model: dir.display().to_string(),
        device: device_name(target.device()),
        weight_bytes,
        copy_gb_per_s: copy,
        floor_ms,
        decode_step_ms,
        ratio_to_floor: decode_step_ms / floor_ms,
    })
}

/// Measured memory bandwidth (GB/s) of a large copy, counting read + write bytes; the
/// best of a few runs, as a floor should be.
pub fn copy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * n as f64 / best / 1e9
}

/// The results' `device` field: `cpu: <model> (<threads> threads)` or `cuda: <GPU name>`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu: {} ({} threads)", cpu_name(), rayon::current_num_threads()),
        Device::Cuda => format!(
            "cuda: {}",
            cuda::probe().map_or_else(|e| format!("unknown GPU ({e})"), |i| i.name)
        ),
    }
}

/// The CPU's model name (Linux), for the results' `device` field.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
