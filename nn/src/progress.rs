//! What a long-running loop shows while it works, and what a training stage keeps of it.
//!
//! [`Steps`] draws an indicatif bar (step, loss, rate, ETA) when stderr is a terminal and
//! writes the plain JSON log lines otherwise, so a job's log stays greppable. [`Curves`] holds a
//! training stage's loss and held-out metrics by step; it lives in the stage's checkpointed
//! progress (a resumed run draws the whole curve) and becomes the `training.png` artifact
//! (drawn by `plot::training_chart`).

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use tracing::info;

pub use manifests::progress::{bar, bars_shown};

/// A training loop's visible progress.
pub struct Steps {
    bar: ProgressBar,
}

impl Steps {
    /// Steps `done..total` of `stage` are left; only the job's leader (`shown`) draws a bar.
    pub fn new(stage: &str, total: usize, done: usize, shown: bool) -> Steps {
        let bar = bar(
            total as u64,
            done as u64,
            "steps",
            stage,
            shown && bars_shown(),
        );
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

    /// Several held-out readings `(name, value)` taken at `step`.
    pub fn held_out_at(&mut self, step: usize, readings: &[(&str, f64)]) {
        for &(name, value) in readings {
            self.held_out(name, step, value);
        }
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

/// Whether the held-out set is read after step `step` (0-based) of a run of `steps` steps:
/// about `points` times, evenly spaced, but not after the last step, whose reading is the
/// stage's final evaluation (pushed to the chart by the stage itself).
pub fn is_midway_evaluation(step: usize, steps: usize, points: usize) -> bool {
    let every = steps.div_ceil(points.max(1)).max(1);
    step + 1 < steps && (step + 1).is_multiple_of(every)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midway_evaluations_are_evenly_spaced_and_leave_the_last_step_to_the_final_one() {
        let after = |steps, points| {
            (0..steps)
                .filter(|&step| is_midway_evaluation(step, steps, points))
                .collect::<Vec<_>>()
        };
        // Every 4th step of 20 (steps 4, 8, 12, 16 done); the 20th is the final evaluation.
        assert_eq!(after(20, 5), vec![3, 7, 11, 15]);
        assert_eq!(after(3, 5), vec![0, 1]);
        assert!(after(1, 5).is_empty());
        assert!(after(0, 5).is_empty());
    }

    #[test]
    fn readings_taken_together_land_at_one_step_and_non_finite_ones_are_left_out() {
        let mut curves = Curves::default();
        curves.held_out_at(7, &[("psnr_db", 30.0), ("ssim", f64::NAN)]);
        assert_eq!(curves.held_out["psnr_db"], vec![(7, 30.0)]);
        assert!(!curves.held_out.contains_key("ssim"));
    }
}
