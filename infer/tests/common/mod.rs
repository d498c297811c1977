//! The small trained model the infer tests sample from.

use std::path::PathBuf;

/// A few-step pipeline up to `train parti` in the test binary's fixture folder (with a `train
/// text-encoder` for reranking when `reranker`); returns the folder. Once per test binary.
pub fn trained(reranker: bool) -> PathBuf {
    let dir = manifests::testing::fixture_dir(
        env!("CARGO_TARGET_TMPDIR"),
        manifests::fixture_name!("trained"),
    );
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

/// A 2-step `vqgan superres` model (64 -> 256 px, crops of 8 pixels) on the tokenizer of a
/// [`trained`] folder, under `dir/superres`; returns its folder.
#[allow(dead_code)]
pub fn superres(dir: &std::path::Path) -> PathBuf {
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_infer"));
    let config = dir.join("superres.toml");
    std::fs::write(&config, "patch = 8\nheld_out = 2\nlog_every = 1\n").unwrap();
    let steps = [
        "ingest synth --out D/synth-large --images 20 --documents 2 --size 256".to_string(),
        "ingest pairs --preset tiny --size 256 --input D/synth-large/pairs --out D/pairs-large"
            .to_string(),
        format!(
            "vqgan superres --pairs D/pairs-large --vqgan D/vqgan --out D/superres --steps 2 \
             --batch-size 4 --config {}",
            config.display()
        ),
    ];
    manifests::testing::run_stages(&bin, dir, &steps);
    dir.join("superres")
}

/// Mean absolute difference of two pictures of one size, per channel, in [0, 1]: how far an
/// enlarged picture lies from a plain enlargement of its sample.
pub fn mean_abs_difference(a: &image::DynamicImage, b: &image::DynamicImage) -> f64 {
    let (a, b) = (a.to_rgb8(), b.to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / (a.as_raw().len() as f64 * 255.0)
}
