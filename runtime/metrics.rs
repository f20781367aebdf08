//! Metrics of one generation (names are a contract: see README) and a Chrome trace of
//! its stages.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::weights::write_atomic;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Timings {
    pub vision: f64,
    pub prefill_target: f64,
    pub prefill_draft: f64,
    pub draft: f64,
    pub verify: f64,
    pub accept: f64,
    pub total: f64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Metrics {
    /// Tokens emitted by verification passes / verification passes (the bonus token
    /// included; the prefill's first token and pass are not counted).
    pub mal: f64,
    /// Fraction of the passes that drafted position i in which draft i was accepted.
    pub accept_rate_by_pos: Vec<f64>,
    pub timings_ms: Timings,
    /// Tokens emitted by the decode loop / its wall time (draft + verify + accept).
    pub tokens_per_s: f64,
    pub target_passes: usize,
    pub generated_tokens: usize,
    /// Drafted tokens per pass at most (the chain's γ, or the tree's depth).
    pub gamma: usize,
    /// Mean drafted nodes per tree pass (0 for chains).
    pub tree_nodes: f64,
    /// accepted_hist[k]: passes that accepted k drafted tokens (accepted depth for trees).
    pub accepted_hist: Vec<usize>,
}

/// Total variation distance ½ Σ |p − q| over the longer of the two vocabularies (the
/// shorter distribution is 0 past its end: a drafter's smaller vocabulary).
pub fn tvd(p: &[f32], q: &[f32]) -> f64 {
    let len = p.len().max(q.len());
    0.5 * (0..len)
        .map(|i| (p.get(i).copied().unwrap_or(0.0) as f64 - q.get(i).copied().unwrap_or(0.0) as f64).abs())
        .sum::<f64>()
}

/// Per-pass counts the engine accumulates; turned into [`Metrics`] at the end.
#[derive(Debug, Default)]
pub struct Counters {
    pub passes: usize,
    pub emitted_by_passes: usize,
    pub drafted_at: Vec<usize>,
    pub accepted_at: Vec<usize>,
    pub accepted_hist: Vec<usize>,
    pub tree_passes: usize,
    pub tree_nodes: usize,
}

impl Counters {
    pub fn record_pass(&mut self, drafted: usize, accepted: usize, emitted: usize) {
        if self.drafted_at.len() < drafted {
            self.drafted_at.resize(drafted, 0);
            self.accepted_at.resize(drafted, 0);
        }
        for i in 0..drafted {
            self.drafted_at[i] += 1;
            self.accepted_at[i] += (i < accepted) as usize;
        }
        self.passes += 1;
        self.emitted_by_passes += emitted;
        if self.accepted_hist.len() <= accepted {
            self.accepted_hist.resize(accepted + 1, 0);
        }
        self.accepted_hist[accepted] += 1;
    }

    /// A tree pass's size (drafted nodes); `record_pass` counts its acceptance.
    pub fn record_tree(&mut self, nodes: usize) {
        self.tree_passes += 1;
        self.tree_nodes += nodes;
    }

    pub fn mean_tree_nodes(&self) -> f64 {
        if self.tree_passes == 0 {
            0.0
        } else {
            self.tree_nodes as f64 / self.tree_passes as f64
        }
    }

    pub fn mal(&self) -> f64 {
        if self.passes == 0 {
            0.0
        } else {
            self.emitted_by_passes as f64 / self.passes as f64
        }
    }

    pub fn accept_rate_by_pos(&self) -> Vec<f64> {
        self.drafted_at
            .iter()
            .zip(&self.accepted_at)
            .map(|(&d, &a)| a as f64 / d as f64)
            .collect()
    }
}

/// Spans for chrome://tracing / Perfetto: one per stage per step.
#[derive(Debug)]
pub struct Trace {
    origin: Instant,
    events: Vec<serde_json::Value>,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            origin: Instant::now(),
            events: Vec::new(),
        }
    }
}

impl Trace {
    /// Records `name` as running from `start` until now; returns its length in ms.
    pub fn span(&mut self, name: &str, step: usize, start: Instant) -> f64 {
        let ts = start.duration_since(self.origin).as_secs_f64() * 1e6;
        let dur = start.elapsed().as_secs_f64() * 1e6;
        self.events.push(serde_json::json!({
            "name": name, "cat": "massv", "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": 1,
            "args": {"step": step},
        }));
        dur / 1e3
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let doc = serde_json::json!({"traceEvents": self.events, "displayTimeUnit": "ms"});
        write_atomic(path, doc.to_string().as_bytes())
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}
