//! `vqgan train` as a pipeline stage: reads an ingest manifest, writes weights that load back,
//! records its metrics, and skips itself when nothing changed.

use std::process::Command;

use burn::store::{ModuleSnapshot, SafetensorsStore};
use manifests::Upstream;
use vqgan::VitVqganConfig;

fn run(binary: &str, args: &[&str]) -> String {
    let output = Command::new(binary).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{binary} {args:?}: {text}");
    text
}

#[test]
fn trains_from_an_ingest_manifest_and_writes_loadable_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // The ingest binary is built by the same `cargo test --workspace`; find it beside ours.
    let ingest = std::path::Path::new(env!("CARGO_BIN_EXE_vqgan")).with_file_name("ingest");
    assert!(
        ingest.exists(),
        "{} missing: run `cargo test --release --workspace` (or `make test`)",
        ingest.display()
    );
    let ingest = ingest.to_str().unwrap();
    run(
        ingest,
        &[
            "synth",
            "--out",
            &path("synth"),
            "--images",
            "40",
            "--documents",
            "4",
        ],
    );
    run(
        ingest,
        &[
            "pairs",
            "--preset",
            "tiny",
            "--input",
            &path("synth/pairs"),
            "--out",
            &path("pairs"),
        ],
    );
    let vqgan = env!("CARGO_BIN_EXE_vqgan");
    let args = [
        "train",
        "--pairs",
        &path("pairs"),
        "--out",
        &path("vqgan"),
        "--steps",
        "3",
        "--batch-size",
        "4",
    ];
    run(vqgan, &args);

    let (stage, _) = Upstream::read(&path("vqgan")).unwrap();
    let metrics = &stage.manifest.metrics;
    let psnr = metrics["psnr_db"].as_f64().unwrap();
    let usage = metrics["codebook_usage"].as_f64().unwrap();
    assert!(psnr.is_finite() && psnr > 0.0, "{metrics:?}");
    assert!(usage > 0.0 && usage <= 1.0, "{metrics:?}");
    assert_eq!(
        stage.manifest.inputs[0].stage.as_deref(),
        Some("ingest.pairs")
    );
    assert!(stage.manifest.verify(&stage.location, true).is_empty());

    let weights = stage.artifacts_of_kind("checkpoint")[0];
    let bytes = stage.read_artifact(weights).unwrap().to_vec();
    let device = nn::backend::device("cpu").unwrap();
    let mut model = VitVqganConfig::tiny().init(&device);
    let before = model
        .quantizer
        .codebook
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let result = model
        .load_from(&mut SafetensorsStore::from_bytes(Some(bytes)))
        .unwrap();
    assert!(
        result.missing.is_empty() && result.errors.is_empty(),
        "{:?} {:?}",
        result.missing,
        result.errors
    );
    let after = model
        .quantizer
        .codebook
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_ne!(before, after, "loading replaced the fresh codebook");

    let again = run(vqgan, &args);
    assert!(again.contains("up to date"), "{again}");
}
