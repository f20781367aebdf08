//! The generic training loop over (params, grads): batches drawn in a seeded order,
//! gradient accumulation, mean CE over all scored tokens of a step, global-norm clipping,
//! AdamW on the warmup + cosine schedule, a JSON loss curve, and checkpoints
//! (safetensors weights + moments, JSON state) that resume bit-exactly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use massv::weights::write_atomic;
use massv::{Error, Result};

use crate::objective::Objective;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use crate::params::Params;
use crate::progress::Progress;

pub const CHECKPOINT_FORMAT: &str = "massv-train-checkpoint/1";
const LATEST: &str = "latest";
const STATE_FILE: &str = "state.json";
const PARAMS_FILE: &str = "params.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";

/// SplitMix64 with visible state, so a checkpoint can store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher–Yates permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// What a run does; a resumed run must be given the same options (steps may grow).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step (the step's loss is the mean over all of them).
    pub accum: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub adamw: AdamWConfig,
    /// Global gradient-norm limit; None: no clipping.
    pub clip_norm: Option<f64>,
    pub seed: u64,
    /// Draw examples in a fresh seeded permutation each epoch (else in file order).
    pub shuffle: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 100,
            batch: 4,
            accum: 1,
            lr: 1e-3,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            adamw: AdamWConfig::default(),
            clip_norm: Some(1.0),
            seed: 0,
            shuffle: true,
        }
    }
}

impl TrainOptions {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            peak_lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.accum == 0 {
            return Err(Error::InvalidArgument("batch and accum must be at least 1".into()));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::InvalidArgument(format!("learning rate {} is not ≥ 0", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::InvalidArgument("min-lr-ratio must be in [0, 1]".into()));
        }
        if self.clip_norm.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return Err(Error::InvalidArgument("clip norm must be > 0".into()));
        }
        Ok(())
    }

    /// The options a resumed run must share with the checkpoint (all but `steps`).
    fn compatible(&self, other: &TrainOptions) -> bool {
        TrainOptions { steps: 0, ..*self } == TrainOptions { steps: 0, ..*other }
    }
}

/// One optimizer step in the loss curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// 1-based step number.
    pub step: usize,
    /// Mean CE per scored token of the step's examples (before the update).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// The loop's state between steps: what a checkpoint stores besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: String,
    /// Steps completed.
    pub step: usize,
    /// Optimizer steps taken (AdamW's t).
    pub adam_t: u64,
    /// The shuffling RNG now, and as it was before drawing the current epoch's order.
    pub rng: Rng,
    pub epoch_rng: Rng,
    /// Data cursor: epoch number and index into that epoch's order.
    pub epoch: usize,
    pub cursor: usize,
    pub dataset_len: usize,
    pub options: TrainOptions,
    pub schedule: Schedule,
    pub log: Vec<StepLog>,
}

/// Where and how often to checkpoint, and the observers of a run.
#[derive(Default)]
pub struct RunControl<'a> {
    /// Checkpoints go to `dir/checkpoint-{step}/` with a `dir/latest` pointer.
    pub checkpoint_dir: Option<PathBuf>,
    /// Save every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Continue from the latest checkpoint in `checkpoint_dir` when there is one.
    pub resume: bool,
    /// Stop (after checkpointing) once this many steps are done: an interruption.
    pub stop_after: Option<usize>,
    /// The loss curve as JSON, rewritten at every checkpoint and at the end.
    pub log_path: Option<PathBuf>,
    /// Which trainable tensors get weight decay (default: matrices).
    pub decay: Option<&'a dyn Fn(&str) -> bool>,
    /// Progress-bar label (hidden when stderr is not a terminal).
    pub label: String,
}

#[derive(Debug, Clone)]
pub struct TrainReport {
    pub state: TrainState,
    /// True when stopped early by `stop_after`.
    pub interrupted: bool,
    pub resumed_from: Option<usize>,
}

/// Trains the tensors of `params` that `trainable` selects on `obj`.
pub fn train(
    params: &mut Params,
    trainable: &dyn Fn(&str) -> bool,
    obj: &dyn Objective,
    opts: &TrainOptions,
    ctl: &RunControl,
) -> Result<TrainReport> {
    opts.validate()?;
    if obj.is_empty() {
        return Err(Error::InvalidArgument("no training examples".into()));
    }
    let mut grads = params.zeros_like(trainable);
    if grads.is_empty() {
        return Err(Error::InvalidArgument("no trainable tensors selected".into()));
    }
    let default_decay = |n: &str| params.shape(n).is_some_and(|s| s.len() >= 2);
    let decayed: std::collections::HashSet<String> = grads
        .names()
        .iter()
        .filter(|n| ctl.decay.map_or_else(|| default_decay(n), |f| f(n)))
        .cloned()
        .collect();
    let decay = |n: &str| decayed.contains(n);
    let mut opt = AdamW::new(opts.adamw, &grads);
    let mut rng = Rng::new(opts.seed);
    let epoch_rng = rng;
    let order = if opts.shuffle {
        rng.permutation(obj.len())
    } else {
        (0..obj.len()).collect()
    };
    let mut st = TrainState {
        format: CHECKPOINT_FORMAT.into(),
        step: 0,
        adam_t: 0,
        rng,
        epoch_rng,
        epoch: 0,
        cursor: 0,
        dataset_len: obj.len(),
        options: *opts,
        schedule: opts.schedule(),
        log: Vec::new(),
    };
    let mut order = order;
    let mut resumed_from = None;
    if let (true, Some(dir)) = (ctl.resume, &ctl.checkpoint_dir) {
        if let Some(ck) = load_checkpoint(dir)? {
            if !ck.state.options.compatible(opts) || ck.state.dataset_len != obj.len() {
                return Err(Error::InvalidArgument(format!(
                    "{}: the checkpoint was made with other options or data ({:?}, {} examples); \
                     resume with the same ones, or start a fresh --out",
                    dir.display(),
                    ck.state.options,
                    ck.state.dataset_len
                )));
            }
            for name in grads.names() {
                if !ck.params.contains(name) {
                    return Err(Error::InvalidArgument(format!(
                        "{}: the checkpoint lacks trainable tensor `{name}`",
                        dir.display()
                    )));
                }
            }
            params.update_from(ck.params)?;
            opt.m.update_from(ck.m)?;
            opt.v.update_from(ck.v)?;
            opt.t = ck.state.adam_t;
            let mut r = ck.state.epoch_rng;
            order = if opts.shuffle {
                r.permutation(obj.len())
            } else {
                (0..obj.len()).collect()
            };
            resumed_from = Some(ck.state.step);
            st = TrainState {
                options: *opts,
                schedule: opts.schedule(),
                ..ck.state
            };
        }
    }

    let progress = Progress::new(&ctl.label, opts.steps as u64);
    progress.set_position(st.step as u64);
    let schedule = opts.schedule();
    let mut interrupted = false;
    while st.step < opts.steps {
        if ctl.stop_after.is_some_and(|s| st.step >= s) {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        grads.fill_zero();
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        for _ in 0..opts.batch * opts.accum {
            if st.cursor == order.len() {
                st.epoch += 1;
                st.cursor = 0;
                st.epoch_rng = st.rng;
                if opts.shuffle {
                    order = st.rng.permutation(obj.len());
                }
            }
            let i = order[st.cursor];
            st.cursor += 1;
            let l = obj.loss(params, Some(&mut grads), i)?;
            loss_sum += l.loss_sum;
            tokens += l.tokens;
        }
        if tokens > 0 {
            grads.scale(1.0 / tokens as f32);
        }
        let grad_norm = clip_grad_norm(&mut grads, opts.clip_norm);
        let lr = schedule.lr(st.step);
        opt.step(params, &grads, lr, &decay)?;
        st.step += 1;
        st.adam_t = opt.t;
        let secs = t0.elapsed().as_secs_f64();
        let loss = if tokens > 0 { loss_sum / tokens as f64 } else { 0.0 };
        if !loss.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "the loss became {loss} at step {}; lower the learning rate",
                st.step
            )));
        }
        st.log.push(StepLog {
            step: st.step,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: if secs > 0.0 { tokens as f64 / secs } else { 0.0 },
        });
        progress.step(loss, tokens as f64 / secs.max(1e-9));
        let every = ctl.checkpoint_every > 0 && st.step % ctl.checkpoint_every == 0;
        let stop = ctl.stop_after.is_some_and(|s| st.step >= s) && st.step < opts.steps;
        if let (true, Some(dir)) = (every || stop, &ctl.checkpoint_dir) {
            save_checkpoint(dir, params, &grads, &opt, &st)?;
            write_log(ctl, &st)?;
        }
    }
    progress.finish();
    if let Some(dir) = &ctl.checkpoint_dir {
        if !interrupted {
            save_checkpoint(dir, params, &grads, &opt, &st)?;
        }
    }
    write_log(ctl, &st)?;
    Ok(TrainReport {
        state: st,
        interrupted,
        resumed_from,
    })
}

fn write_log(ctl: &RunControl, st: &TrainState) -> Result<()> {
    if let Some(path) = &ctl.log_path {
        let json = serde_json::json!({
            "steps": st.log,
            "options": st.options,
            "schedule": st.schedule,
        });
        let text = serde_json::to_string_pretty(&json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub state: TrainState,
    /// The trainable tensors.
    pub params: Params,
    pub m: Params,
    pub v: Params,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes `dir/checkpoint-{step}/` (trainable params, moments, state) and then points
/// `dir/latest` at it; older checkpoints are removed. A crash at any point leaves the
/// previous complete checkpoint in place.
pub fn save_checkpoint(dir: &Path, params: &Params, grads: &Params, opt: &AdamW, st: &TrainState) -> Result<()> {
    let name = format!("checkpoint-{}", st.step);
    let ck = dir.join(&name);
    std::fs::create_dir_all(&ck).map_err(|e| io(&ck, e))?;
    params
        .select(|n| grads.contains(n), str::to_string)?
        .save(&ck.join(PARAMS_FILE))?;
    let mut moments = opt.m.select(|_| true, |n| format!("m.{n}"))?;
    moments.update_from(opt.v.select(|_| true, |n| format!("v.{n}"))?)?;
    moments.save(&ck.join(OPTIM_FILE))?;
    let json = serde_json::to_string_pretty(st).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&ck.join(STATE_FILE), json.as_bytes())?;
    write_atomic(&dir.join(LATEST), name.as_bytes())?;
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with("checkpoint-") && fname != name && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// The checkpoint `dir/latest` points at, or None when there is none.
pub fn load_checkpoint(dir: &Path) -> Result<Option<Checkpoint>> {
    let latest = dir.join(LATEST);
    if !latest.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(|e| io(&latest, e))?;
    let ck = dir.join(name.trim());
    let state_path = ck.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: state_path.clone(),
        reason: format!("not a training state: {e}"),
    })?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(Error::Config {
            path: state_path,
            reason: format!("format {:?}, expected {CHECKPOINT_FORMAT:?}", state.format),
        });
    }
    let params = Params::load(&ck.join(PARAMS_FILE))?;
    let moments = Params::load(&ck.join(OPTIM_FILE))?;
    let m = moments.select(|n| n.starts_with("m."), |n| n["m.".len()..].to_string())?;
    let v = moments.select(|n| n.starts_with("v."), |n| n["v.".len()..].to_string())?;
    Ok(Some(Checkpoint { state, params, m, v }))
}
