//! Progress bars for the long commands (indicatif): position, loss, tokens/s and ETA.
//! indicatif draws nothing when stderr is not a terminal (CI, pipes, tests).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(label: &str, len: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} elapsed {elapsed} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar }
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// One training step done.
    pub fn step(&self, loss: f64, tokens_per_s: f64) {
        self.bar.set_message(format!("loss {loss:.4} {tokens_per_s:.0} tok/s"));
        self.bar.inc(1);
    }

    /// One unit of non-training work done, with a free-form message.
    pub fn tick(&self, msg: String) {
        self.bar.set_message(msg);
        self.bar.inc(1);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
