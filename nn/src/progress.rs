//! What a long-running loop shows while it works, and what a training stage keeps of it.
//!
//! [`Steps`] draws an indicatif bar (step, loss, rate, ETA) when stderr is a terminal and
//! writes the plain JSON log lines otherwise, so a job's log stays greppable. [`Curves`] holds a
//! training stage's loss and held-out metrics by step; it lives in the stage's checkpointed
//! progress (a resumed run draws the whole curve) and becomes the `training.png` artifact
//! (drawn by `plot::training_chart`).

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

/// Whether progress bars are drawn: stderr is a terminal and `PARTI_PROGRESS` is not `off`.
pub fn bars_shown() -> bool {
    std::io::stderr().is_terminal() && std::env::var("PARTI_PROGRESS").as_deref() != Ok("off")
}

/// A bar over `total` units of `unit` (steps, prompts, shards), `done` of them already done;
/// hidden when [`bars_shown`] is false.
pub fn bar(total: u64, done: u64, unit: &str, label: &str) -> ProgressBar {
    let target = if bars_shown() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let template = format!(
        "{label} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.set_position(done);
    bar.reset_eta();
    bar
}

/// A training loop's visible progress.
pub struct Steps {
    bar: ProgressBar,
}

impl Steps {
    /// Steps `done..total` of `stage` are left; only the job's leader (`shown`) draws a bar.
    pub fn new(stage: &str, total: usize, done: usize, shown: bool) -> Steps {
        let bar = if shown {
            bar(total as u64, done as u64, "steps", stage)
        } else {
            ProgressBar::hidden()
        };
        Steps { bar }
    }

    /// A logged step's line: the bar's message on a terminal, a log line otherwise; kept in
    /// `log` either way.
    pub fn line(&self, line: &Value, log: &mut String) {
        if self.bar.is_hidden() {
            info!("{line}");
        } else {
            self.bar.set_message(summary(line));
        }
        log.push_str(&format!("{line}\n"));
    }

    /// `done` steps finished.
    pub fn set_done(&self, done: usize) {
        self.bar.set_position(done as u64);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `loss 0.4213 mlm_accuracy 0.512` from a step line's numeric fields (step and learning rate
/// left out: the bar shows the step).
fn summary(line: &Value) -> String {
    let Some(fields) = line.as_object() else {
        return String::new();
    };
    fields
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "step" | "learning_rate"))
        .filter_map(|(name, value)| match value {
            Value::Number(number) => number.as_f64().map(|v| format!("{name} {v:.4}")),
            Value::String(text) => Some(format!("{name} {text}")),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Named series of `(step, value)`: training losses at logged steps and held-out metrics at
/// evaluation points.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    pub training: BTreeMap<String, Vec<(usize, f64)>>,
    pub held_out: BTreeMap<String, Vec<(usize, f64)>>,
}

impl Curves {
    pub fn training(&mut self, name: &str, step: usize, value: f64) {
        push(&mut self.training, name, step, value);
    }

    pub fn held_out(&mut self, name: &str, step: usize, value: f64) {
        push(&mut self.held_out, name, step, value);
    }
}

fn push(series: &mut BTreeMap<String, Vec<(usize, f64)>>, name: &str, step: usize, value: f64) {
    if value.is_finite() {
        series
            .entry(name.to_string())
            .or_default()
            .push((step, value));
    }
}

/// Evaluation points of a run of `steps` steps: about `points` of them, evenly spaced, the
/// last step always among them.
pub fn is_evaluation_step(step: usize, steps: usize, points: usize) -> bool {
    let every = steps.div_ceil(points.max(1)).max(1);
    step + 1 == steps || (step + 1).is_multiple_of(every)
}
