//! The progress bar every stage draws while it works (ingest's shards and samples, training
//! steps, encode, eval and generate): one look for all of them, shown only where someone reads
//! it, so a batch job's log stays plain lines.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether progress bars are drawn: stderr is a terminal and `PARTI_PROGRESS` is not `off`.
pub fn bars_shown() -> bool {
    std::io::stderr().is_terminal() && std::env::var("PARTI_PROGRESS").as_deref() != Ok("off")
}

/// A bar over `total` units of `unit` (steps, prompts, shards), `done` of them already done,
/// labelled `label`; hidden unless `shown` (callers pass [`bars_shown`], or less).
pub fn bar(total: u64, done: u64, unit: &str, label: &str, shown: bool) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
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
