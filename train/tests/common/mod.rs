//! What the `train parti` process tests share.

use std::path::{Path, PathBuf};
use std::process::Command;

use manifests::testing::lone_command;

pub fn bin() -> PathBuf {
    manifests::testing::bin_dir(env!("CARGO_BIN_EXE_train"))
}

/// `train parti --preset tiny` for `steps` steps on the tokens, tokenizer and `parti.toml` under
/// `upstream`, into `out`; not yet started.
pub fn parti_command(upstream: &Path, out: &Path, steps: usize) -> Command {
    let mut command = lone_command(bin().join("train"));
    command
        .args(["parti", "--preset", "tiny", "--steps", &steps.to_string()])
        .arg("--tokens")
        .arg(upstream.join("tokens"))
        .arg("--tokenizer")
        .arg(upstream.join("tokenizer"))
        .arg("--config")
        .arg(upstream.join("parti.toml"))
        .arg("--out")
        .arg(out);
    command
}
