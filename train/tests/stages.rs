//! `train text-encoder` and `train parti` as stages on real (small) upstream manifests: the
//! contrastive pair learns to retrieve held-out shapes pictures from their captions well above
//! chance, stopped runs resume to exactly the uninterrupted result, and the manifests carry the
//! metrics the pipeline reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use manifests::Upstream;
use train::pretrain::{PretrainConfig, PretrainInputs, PretrainOptions, pretrain};
use train::seq2seq::{Seq2SeqConfig, Seq2SeqInputs, Seq2SeqOptions, train_parti};

fn run(binary: &Path, args: &[&str]) {
    let output = Command::new(binary).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}{}",
        binary.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Upstream manifests shared by every test of this file: synth -> pairs, text, tokenizer,
/// a few-step VQGAN and its token shards.
fn upstream() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let bin = |name: &str| Path::new(env!("CARGO_BIN_EXE_train")).with_file_name(name);
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        for name in ["ingest", "vqgan"] {
            assert!(
                bin(name).exists(),
                "{name} missing: run `cargo test --release --workspace`"
            );
        }
        run(
            &bin("ingest"),
            &[
                "synth",
                "--out",
                &p("synth"),
                "--images",
                "400",
                "--documents",
                "200",
            ],
        );
        run(
            &bin("ingest"),
            &[
                "pairs",
                "--preset",
                "tiny",
                "--input",
                &p("synth/pairs"),
                "--out",
                &p("pairs"),
            ],
        );
        run(
            &bin("ingest"),
            &["text", "--input", &p("synth/text"), "--out", &p("text")],
        );
        run(
            &bin("train"),
            &[
                "tokenizer",
                "--text",
                &p("text"),
                "--captions",
                &p("pairs"),
                "--out",
                &p("tokenizer"),
            ],
        );
        run(
            &bin("vqgan"),
            &[
                "train",
                "--pairs",
                &p("pairs"),
                "--out",
                &p("vqgan"),
                "--steps",
                "3",
                "--batch-size",
                "4",
            ],
        );
        run(
            &bin("vqgan"),
            &[
                "encode",
                "--vqgan",
                &p("vqgan"),
                "--pairs",
                &p("pairs"),
                "--out",
                &p("tokens"),
            ],
        );
        dir
    })
}

fn path(name: &str) -> String {
    upstream().join(name).to_str().unwrap().to_string()
}

/// Stages seed the process-wide device generator before initialising; one at a time.
static TRAINING: Mutex<()> = Mutex::new(());

fn artifact_text(dir: &Path, name: &str) -> String {
    let (stage, _) = Upstream::read(dir.to_str().unwrap()).unwrap();
    let artifact = stage
        .manifest
        .artifacts
        .iter()
        .find(|a| a.uri == name)
        .unwrap();
    String::from_utf8(stage.read_artifact(artifact).unwrap().to_vec()).unwrap()
}

#[test]
fn contrastive_retrieval_beats_chance_and_the_manifest_has_the_metrics() {
    let _serial = TRAINING.lock();
    let out = tempfile::tempdir().unwrap();
    let config = PretrainConfig {
        steps: 160,
        contrastive_every: 2,
        warmup_steps: 10,
        checkpoint_every: 0,
        ..PretrainConfig::preset("tiny").unwrap()
    };
    let (tokenizer, text, pairs) = (path("tokenizer"), path("text"), path("pairs"));
    let inputs = PretrainInputs {
        tokenizer: &tokenizer,
        text: &text,
        pairs: &pairs,
    };
    let options = PretrainOptions {
        out: out.path().to_str().unwrap().to_string(),
        device: "cpu".into(),
        force: false,
        stop_after: None,
    };
    let manifest = pretrain(&config, &inputs, &options).unwrap();
    let m = |name: &str| manifest.metrics[name].as_f64().unwrap();
    assert!(
        m("recall_at_1") > 2.0 * m("recall_at_1_chance"),
        "{:?}",
        manifest.metrics
    );
    assert!(m("recall_at_5") >= m("recall_at_1"));
    assert!(
        (0.0..=1.0).contains(&m("mlm_accuracy")) && m("mlm_accuracy") > 0.1,
        "{:?}",
        manifest.metrics
    );
    // MLM loss fell over the run.
    let log = artifact_text(out.path(), "metrics.jsonl");
    let mlm: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["objective"] == "mlm")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(mlm.last().unwrap() < &(0.7 * mlm[0]), "{mlm:?}");
    let (stage, _) = Upstream::read(out.path().to_str().unwrap()).unwrap();
    let device = nn::backend::device("cpu").unwrap();
    train::pretrain::load_pretrained(&stage, &device).unwrap();
}

#[test]
fn stopped_text_encoder_and_parti_runs_resume_exactly() {
    let _serial = TRAINING.lock();
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, text, pairs, tokens) = (
        path("tokenizer"),
        path("text"),
        path("pairs"),
        path("tokens"),
    );

    let config = PretrainConfig {
        steps: 6,
        batch_size: 8,
        checkpoint_every: 2,
        log_every: 1,
        ..PretrainConfig::preset("tiny").unwrap()
    };
    let inputs = PretrainInputs {
        tokenizer: &tokenizer,
        text: &text,
        pairs: &pairs,
    };
    let options = |name: &str, stop_after| PretrainOptions {
        out: dir.path().join(name).to_str().unwrap().to_string(),
        device: "cpu".into(),
        force: false,
        stop_after,
    };
    pretrain(&config, &inputs, &options("whole", None)).unwrap();
    assert!(matches!(
        pretrain(&config, &inputs, &options("resumed", Some(3))),
        Err(train::Error::Paused { step: 3 })
    ));
    pretrain(&config, &inputs, &options("resumed", None)).unwrap();
    assert_eq!(
        artifact_text(&dir.path().join("whole"), "metrics.jsonl"),
        artifact_text(&dir.path().join("resumed"), "metrics.jsonl")
    );

    let config = Seq2SeqConfig {
        steps: 5,
        batch_size: 8,
        accumulation: 2,
        checkpoint_every: 2,
        log_every: 1,
        ..Seq2SeqConfig::preset("tiny").unwrap()
    };
    let text_encoder = dir.path().join("whole").to_str().unwrap().to_string();
    let inputs = Seq2SeqInputs {
        tokens: &tokens,
        tokenizer: &tokenizer,
        text_encoder: Some(&text_encoder),
    };
    let options = |name: &str, stop_after| Seq2SeqOptions {
        out: dir.path().join(name).to_str().unwrap().to_string(),
        device: "cpu".into(),
        workers: Some(1),
        force: false,
        stop_after,
    };
    let whole = train_parti(&config, &inputs, &options("parti-whole", None)).unwrap();
    assert!(train_parti(&config, &inputs, &options("parti-resumed", Some(2))).is_err());
    train_parti(&config, &inputs, &options("parti-resumed", None)).unwrap();
    assert_eq!(
        artifact_text(&dir.path().join("parti-whole"), "metrics.jsonl"),
        artifact_text(&dir.path().join("parti-resumed"), "metrics.jsonl")
    );
    for name in ["val_perplexity", "val_token_accuracy"] {
        assert!(whole.metrics[name].as_f64().unwrap().is_finite(), "{name}");
    }
    assert!(dir.path().join("parti-whole/loss.png").exists());

    // Data parallel over two devices (here the CPU twice, so it runs without GPUs): the two
    // micro-batches of each step go to different replicas, whose gradients are summed in
    // micro-batch order, which must give exactly the single-worker run.
    let parallel = Seq2SeqOptions {
        device: "cpu,cpu".into(),
        ..options("parti-parallel", None)
    };
    let parallel_manifest = train_parti(&config, &inputs, &parallel).unwrap();
    assert_eq!(
        artifact_text(&dir.path().join("parti-whole"), "metrics.jsonl"),
        artifact_text(&dir.path().join("parti-parallel"), "metrics.jsonl")
    );
    assert_eq!(
        whole.metrics["val_loss"],
        parallel_manifest.metrics["val_loss"]
    );
    // Three micro-batches on two workers of one CPU (one takes two): still the one-worker run,
    // down to the weights' digest.
    let odd = Seq2SeqConfig {
        accumulation: 3,
        ..config.clone()
    };
    let one_worker = train_parti(&odd, &inputs, &options("parti-odd-one", None)).unwrap();
    let two_workers = train_parti(
        &odd,
        &inputs,
        &Seq2SeqOptions {
            workers: Some(2),
            ..options("parti-odd-two", None)
        },
    )
    .unwrap();
    assert_eq!(
        artifact_text(&dir.path().join("parti-odd-one"), "metrics.jsonl"),
        artifact_text(&dir.path().join("parti-odd-two"), "metrics.jsonl")
    );
    let weights = |manifest: &manifests::Manifest| {
        manifest
            .artifacts
            .iter()
            .find(|a| a.uri.ends_with("parti.safetensors"))
            .map(|a| a.digest.clone())
    };
    assert!(weights(&one_worker).is_some());
    assert_eq!(weights(&one_worker), weights(&two_workers));
}
