//! `train text-encoder` and `train parti` as stages on real (small) upstream manifests: the
//! contrastive pair learns to retrieve held-out shapes pictures from their captions well above
//! chance, stopped runs resume to exactly the uninterrupted result, and the manifests carry the
//! metrics the pipeline reports.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use manifests::Upstream;
use manifests::testing::assert_resumes_from;
use nn::cli::TrainingOptions;
use nn::training::{GradClip, Paused};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use train::parti::{PartiInputs, PartiTrainConfig, train_parti};
use train::text_encoder::{TextEncoderInputs, TextEncoderTrainConfig, train_text_encoder};

/// Upstream manifests shared by every test of this file: synth -> pairs, text, tokenizer,
/// a few-step VQGAN and its token shards.
fn upstream() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = manifests::testing::fixture_dir(
            env!("CARGO_TARGET_TMPDIR"),
            manifests::fixture_name!("upstream"),
        );
        let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_train"));
        manifests::testing::run_stages(
            &bin,
            &dir,
            &manifests::testing::few_step_pipeline(400, 200),
        );
        dir
    })
}

fn path(name: &str) -> String {
    upstream().join(name).to_str().unwrap().to_string()
}

/// Stages seed the process-wide device generator before initialising; one at a time.
static TRAINING: Mutex<()> = Mutex::new(());

/// `[tokenizer, text, pairs]` as `train text-encoder` inputs.
fn text_encoder_inputs(paths: &[String; 3]) -> TextEncoderInputs<'_> {
    TextEncoderInputs {
        tokenizer: &paths[0],
        text: &paths[1],
        pairs: &paths[2],
    }
}

fn artifact_text(dir: &Path, name: &str) -> String {
    String::from_utf8(manifests::testing::artifact_bytes(dir, name)).unwrap()
}

#[test]
fn contrastive_retrieval_beats_chance_and_the_manifest_has_the_metrics() {
    let _serial = TRAINING.lock();
    let out = tempfile::tempdir().unwrap();
    let config = TextEncoderTrainConfig {
        steps: 160,
        contrastive_every: 2,
        warmup_steps: 10,
        // The preset checkpoints every 200 steps: none in this run.
        ..TextEncoderTrainConfig::preset("tiny").unwrap()
    };
    let paths = [path("tokenizer"), path("text"), path("pairs")];
    let inputs = text_encoder_inputs(&paths);
    let options = TrainingOptions::new(out.path().to_str().unwrap());
    let manifest = train_text_encoder(&config, &inputs, &options).unwrap();
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
    models::load_text_encoder(&stage, &device).unwrap();
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

    let config = TextEncoderTrainConfig {
        steps: 6,
        batch_size: 8,
        checkpoint_every: 2,
        log_every: 1,
        ..TextEncoderTrainConfig::preset("tiny").unwrap()
    };
    let inputs = TextEncoderInputs {
        tokenizer: &tokenizer,
        text: &text,
        pairs: &pairs,
    };
    let options = |name: &str, stop_after| TrainingOptions {
        stop_after,
        ..TrainingOptions::new(dir.path().join(name).to_str().unwrap())
    };
    train_text_encoder(&config, &inputs, &options("whole", None)).unwrap();
    assert!(matches!(
        train_text_encoder(&config, &inputs, &options("resumed", Some(3))),
        Err(train::Error::Paused(Paused { step: 3 }))
    ));
    assert_resumes_from(3, || {
        train_text_encoder(&config, &inputs, &options("resumed", None))
    });
    assert_eq!(
        artifact_text(&dir.path().join("whole"), "metrics.jsonl"),
        artifact_text(&dir.path().join("resumed"), "metrics.jsonl")
    );

    let config = PartiTrainConfig {
        steps: 5,
        batch_size: 8,
        accumulation: 2,
        checkpoint_every: 2,
        log_every: 1,
        ..PartiTrainConfig::preset("tiny").unwrap()
    };
    let text_encoder = dir.path().join("whole").to_str().unwrap().to_string();
    let inputs = PartiInputs {
        tokens: &tokens,
        tokenizer: &tokenizer,
        text_encoder: Some(&text_encoder),
    };
    let options = |name: &str, stop_after| TrainingOptions {
        workers: Some(1),
        stop_after,
        ..TrainingOptions::new(dir.path().join(name).to_str().unwrap())
    };
    let whole = train_parti(&config, &inputs, &options("parti-whole", None)).unwrap();
    assert!(matches!(
        train_parti(&config, &inputs, &options("parti-resumed", Some(2))),
        Err(train::Error::Paused(Paused { step: 2 }))
    ));
    assert_resumes_from(2, || {
        train_parti(&config, &inputs, &options("parti-resumed", None))
    });
    assert_eq!(
        artifact_text(&dir.path().join("parti-whole"), "metrics.jsonl"),
        artifact_text(&dir.path().join("parti-resumed"), "metrics.jsonl")
    );
    for name in ["val_perplexity", "val_token_accuracy"] {
        assert!(whole.metrics[name].as_f64().unwrap().is_finite(), "{name}");
    }
    // The chart of loss and held-out metrics is an artifact, and a resumed run draws the same
    // one (its curves, held-out points included, live in the checkpoints).
    assert!(
        whole
            .artifacts
            .iter()
            .any(|a| a.uri == "training.png" && a.kind == "image/png"),
        "{:?}",
        whole.artifacts
    );
    let chart = std::fs::read(dir.path().join("parti-whole/training.png")).unwrap();
    assert_eq!(
        chart,
        std::fs::read(dir.path().join("parti-resumed/training.png")).unwrap(),
        "the resumed run drew another chart"
    );
    image::load_from_memory(&chart).unwrap();
    let text_encoder: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("whole/manifest.json")).unwrap())
            .unwrap();
    assert!(
        text_encoder["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["uri"] == "training.png"),
        "train text-encoder publishes no chart"
    );

    // Data parallel over two devices (here the CPU twice, so it runs without GPUs): the two
    // micro-batches of each step go to different replicas, whose gradients are summed in
    // micro-batch order, which must give exactly the single-worker run.
    let parallel = TrainingOptions {
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
    // Three micro-batches of two on two workers of one CPU (one takes two): still the
    // one-worker run, down to the weights' digest.
    let odd = PartiTrainConfig {
        batch_size: 6,
        accumulation: 3,
        ..config.clone()
    };
    let one_worker = train_parti(&odd, &inputs, &options("parti-odd-one", None)).unwrap();
    let two_workers = train_parti(
        &odd,
        &inputs,
        &TrainingOptions {
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

#[test]
fn cfg_dropout_happens_at_the_configured_rate() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let drops = train::parti::cfg_drops(&mut rng, 20_000, 0.1);
    let rate = drops.iter().filter(|d| **d).count() as f64 / drops.len() as f64;
    assert!((rate - 0.1).abs() < 0.01, "{rate}");
    assert!(
        train::parti::cfg_drops(&mut rng, 100, 0.0)
            .iter()
            .all(|d| !d)
    );
}

/// With dropout on, a stopped run still resumes to the uninterrupted one: the masks of a step
/// depend on the seed and the step, not on how many steps the process ran before. A run with
/// dropout refuses to share its micro-batches among workers (they would draw from one
/// generator in whatever order the threads run).
#[test]
fn runs_with_dropout_resume_exactly() {
    let _serial = TRAINING.lock();
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, text, pairs, tokens) = (
        path("tokenizer"),
        path("text"),
        path("pairs"),
        path("tokens"),
    );
    let run = |name: &str, stop_after, workers| TrainingOptions {
        stop_after,
        workers,
        ..TrainingOptions::new(dir.path().join(name).to_str().unwrap())
    };
    let log = |name: &str| artifact_text(&dir.path().join(name), "metrics.jsonl");

    let config = TextEncoderTrainConfig {
        steps: 5,
        batch_size: 8,
        checkpoint_every: 2,
        log_every: 1,
        dropout: 0.3,
        ..TextEncoderTrainConfig::preset("tiny").unwrap()
    };
    let inputs = TextEncoderInputs {
        tokenizer: &tokenizer,
        text: &text,
        pairs: &pairs,
    };
    train_text_encoder(&config, &inputs, &run("text-whole", None, None)).unwrap();
    assert!(matches!(
        train_text_encoder(&config, &inputs, &run("text-resumed", Some(3), None)),
        Err(train::Error::Paused(Paused { step: 3 }))
    ));
    assert_resumes_from(3, || {
        train_text_encoder(&config, &inputs, &run("text-resumed", None, None))
    });
    assert_eq!(log("text-whole"), log("text-resumed"));

    let config = PartiTrainConfig {
        steps: 5,
        batch_size: 8,
        accumulation: 2,
        checkpoint_every: 2,
        log_every: 1,
        dropout: 0.3,
        ..PartiTrainConfig::preset("tiny").unwrap()
    };
    let inputs = PartiInputs {
        tokens: &tokens,
        tokenizer: &tokenizer,
        text_encoder: None,
    };
    train_parti(&config, &inputs, &run("parti-whole", None, None)).unwrap();
    assert!(matches!(
        train_parti(&config, &inputs, &run("parti-resumed", Some(3), None)),
        Err(train::Error::Paused(Paused { step: 3 }))
    ));
    assert_resumes_from(3, || {
        train_parti(&config, &inputs, &run("parti-resumed", None, None))
    });
    assert_eq!(log("parti-whole"), log("parti-resumed"));
    // Dropout does something: without it the losses differ.
    let without = PartiTrainConfig {
        dropout: 0.0,
        ..config.clone()
    };
    train_parti(&without, &inputs, &run("parti-without", None, None)).unwrap();
    assert_ne!(log("parti-whole"), log("parti-without"));

    let shared = train_parti(&config, &inputs, &run("parti-shared", None, Some(2)));
    let refusal = shared.expect_err("two workers with dropout").to_string();
    assert!(refusal.contains("dropout"), "{refusal}");
}

/// Settings and inputs that cannot train are refused before any step, naming what is wrong:
/// batches that do not split into equal micro-batches, tokens outside the codebook their
/// manifest declares, and a text encoder trained with another tokenizer.
#[test]
fn parti_refuses_what_it_cannot_train_on() {
    let _serial = TRAINING.lock();
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = (path("tokenizer"), path("tokens"));
    let out = |name: &str| TrainingOptions::new(dir.path().join(name).to_str().unwrap());
    let config = PartiTrainConfig {
        steps: 2,
        batch_size: 8,
        accumulation: 2,
        ..PartiTrainConfig::preset("tiny").unwrap()
    };
    let refusal = |config: &PartiTrainConfig, inputs: &PartiInputs, name: &str| {
        train_parti(config, inputs, &out(name))
            .err()
            .unwrap_or_else(|| panic!("{name}: trained"))
            .to_string()
    };
    let inputs = PartiInputs {
        tokens: &tokens,
        tokenizer: &tokenizer,
        text_encoder: None,
    };
    let uneven = PartiTrainConfig {
        batch_size: 9,
        ..config.clone()
    };
    assert!(refusal(&uneven, &inputs, "uneven").contains("multiple of accumulation"));

    // The same token shards, declared as tokens of a 4-code codebook.
    fn copy_folder(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_folder(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let narrow = dir.path().join("narrow-tokens");
    copy_folder(Path::new(&tokens), &narrow);
    let manifest_path = narrow.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["metrics"]["codebook_size"] = serde_json::json!(4);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let narrow = narrow.to_str().unwrap().to_string();
    let message = refusal(
        &config,
        &PartiInputs {
            tokens: &narrow,
            ..inputs
        },
        "narrow",
    );
    assert!(
        message.contains("outside the manifest's codebook of 4"),
        "{message}"
    );

    // A text encoder trained with another tokenizer (on the documents alone, the captions
    // left out): the same settings, other pieces behind the ids.
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_train"));
    manifests::testing::run_stages(
        &bin,
        dir.path(),
        &[
            format!(
                "train tokenizer --text {} --out D/other-tokenizer",
                path("text")
            ),
            "train text-encoder --tokenizer D/other-tokenizer --text TEXT --pairs PAIRS \
             --out D/other-text-encoder --steps 1 --batch-size 4"
                .replace("TEXT", &path("text"))
                .replace("PAIRS", &path("pairs")),
        ],
    );
    let other = dir.path().join("other-text-encoder");
    let other = other.to_str().unwrap().to_string();
    let message = refusal(
        &config,
        &PartiInputs {
            text_encoder: Some(&other),
            ..inputs
        },
        "other-tokenizer",
    );
    assert!(
        message.contains("trained with the tokenizer") && message.contains("other-tokenizer"),
        "{message}"
    );
}

/// A run that diverges is stopped at its next checkpoint with an error, and neither that
/// checkpoint nor the model is written over what was there.
#[test]
fn a_diverged_run_saves_no_checkpoint_and_publishes_nothing() {
    let _serial = TRAINING.lock();
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = (path("tokenizer"), path("tokens"));
    let config = PartiTrainConfig {
        steps: 6,
        batch_size: 4,
        accumulation: 2,
        checkpoint_every: 3,
        warmup_steps: 0,
        learning_rate: 1e30,
        final_learning_rate: 1e30,
        ..PartiTrainConfig::preset("tiny").unwrap()
    };
    let inputs = PartiInputs {
        tokens: &tokens,
        tokenizer: &tokenizer,
        text_encoder: None,
    };
    let out = dir.path().join("diverged");
    let failed = train_parti(
        &config,
        &inputs,
        &TrainingOptions::new(out.to_str().unwrap()),
    );
    let message = failed.expect_err("a diverged run succeeded").to_string();
    assert!(message.contains("NaN or infinite"), "{message}");
    assert!(!out.join("manifest.json").exists());
    assert!(!out.join("parti.safetensors").exists());
}

/// `grad_clip = "global"` bounds the norm of all gradients together: a run with it learns (its
/// loss falls), its manifest records it, and it is not clipping each tensor to the same bound;
/// with a bound no gradient reaches, both are the unclipped run to the bit (Parti and the text
/// encoder). Unset, the key is not written, so a preset's config (and hash) is what it was. A
/// bound that is not positive is refused by name.
#[test]
fn global_gradient_clipping_learns_and_is_recorded() {
    let _serial = TRAINING.lock();
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = (path("tokenizer"), path("tokens"));
    let inputs = PartiInputs {
        tokens: &tokens,
        tokenizer: &tokenizer,
        text_encoder: None,
    };
    let log = |name: &str| artifact_text(&dir.path().join(name), "metrics.jsonl");
    let train = |name: &str, grad_clip: &str, grad_clip_norm: f32| {
        let config = PartiTrainConfig {
            steps: 12,
            batch_size: 8,
            log_every: 1,
            grad_clip: serde_json::from_value(serde_json::json!(grad_clip)).unwrap(),
            grad_clip_norm,
            ..PartiTrainConfig::preset("tiny").unwrap()
        };
        let options = TrainingOptions {
            workers: Some(1),
            ..TrainingOptions::new(dir.path().join(name).to_str().unwrap())
        };
        train_parti(&config, &inputs, &options).unwrap()
    };
    let preset = serde_json::to_value(PartiTrainConfig::preset("tiny").unwrap()).unwrap();
    assert!(preset.get("grad_clip").is_none(), "{preset}");

    let global = train("global", "global", 4.0);
    assert_eq!(global.config["grad_clip"], "global");
    let losses: Vec<f64> = log("global")
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64())
        .map(Option::unwrap)
        .collect();
    assert_eq!(losses.len(), 12);
    let mean = |part: &[f64]| part.iter().sum::<f64>() / part.len() as f64;
    assert!(
        mean(&losses[8..]) < 0.9 * mean(&losses[..4]),
        "the loss did not fall: {losses:?}"
    );

    train("tight-global", "global", 0.05);
    train("tight-per-tensor", "per_tensor", 0.05);
    assert_ne!(log("tight-global"), log("tight-per-tensor"));

    train("loose-global", "global", 1e9);
    train("loose-per-tensor", "per_tensor", 1e9);
    assert_eq!(log("loose-global"), log("loose-per-tensor"));
    assert_ne!(log("loose-global"), log("tight-global"));
    let refused = train_parti(
        &PartiTrainConfig {
            grad_clip_norm: -1.0,
            ..PartiTrainConfig::preset("tiny").unwrap()
        },
        &inputs,
        &TrainingOptions::new(dir.path().join("negative").to_str().unwrap()),
    )
    .unwrap_err()
    .to_string();
    assert!(refused.contains("grad_clip_norm"), "{refused}");

    // The text encoder's steps too.
    let paths = [path("tokenizer"), path("text"), path("pairs")];
    let text_encoder = |name: &str, grad_clip: GradClip, grad_clip_norm: f32| {
        let config = TextEncoderTrainConfig {
            steps: 4,
            batch_size: 8,
            log_every: 1,
            grad_clip,
            grad_clip_norm,
            ..TextEncoderTrainConfig::preset("tiny").unwrap()
        };
        let options = TrainingOptions::new(dir.path().join(name).to_str().unwrap());
        train_text_encoder(&config, &text_encoder_inputs(&paths), &options)
    };
    text_encoder("text-loose-global", GradClip::Global, 1e9).unwrap();
    text_encoder("text-loose-per-tensor", GradClip::PerTensor, 1e9).unwrap();
    assert_eq!(log("text-loose-global"), log("text-loose-per-tensor"));
    text_encoder("text-tight-global", GradClip::Global, 1e-3).unwrap();
    assert_ne!(log("text-loose-global"), log("text-tight-global"));
    let refused = text_encoder("text-zero", GradClip::Global, 0.0)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("grad_clip_norm"), "{refused}");
}
