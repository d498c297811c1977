//! The small trained model the infer tests sample from.

use std::path::PathBuf;

/// A few-step pipeline up to `train parti` in a new folder (with a `train text-encoder` for
/// reranking when `reranker`); returns the folder.
pub fn trained(reranker: bool) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_infer"));
    let mut steps = manifests::testing::few_step_pipeline(200, 100);
    let mut parti = "train parti --tokens D/tokens --tokenizer D/tokenizer --out D/parti \
                     --steps 3 --batch-size 4"
        .to_string();
    if reranker {
        steps.push(
            "train text-encoder --tokenizer D/tokenizer --text D/text --pairs D/pairs \
             --out D/text-encoder --steps 3 --batch-size 4"
                .into(),
        );
        parti.push_str(" --text-encoder D/text-encoder");
    }
    steps.push(parti);
    manifests::testing::run_stages(&bin, &dir, &steps);
    dir
}
