//! `train parti` with the fused kernels (libtorch's attention, layer norm, cross-entropy and
//! AdamW on `tch`) and with the compositions (`PARTI_FUSED=off`) follows the same loss curve:
//! within rounding on `tch`, where the kernels sum in another order, and bit for bit on `flex`,
//! where both trainings are the composition (only the validation pass, outside autodiff, differs
//! there: its GELU takes the rational erf unless `PARTI_FUSED=off`).

mod common;

use std::path::Path;

use common::{bin, parti_command};
use manifests::testing::{assert_succeeded, finish};

/// Per-step training losses and the final validation loss of a `train parti` run.
fn curve(upstream: &Path, out: &Path, fused: bool) -> (Vec<f64>, f64) {
    let mut command = parti_command(upstream, out, 16);
    if fused {
        command.env_remove("PARTI_FUSED");
    } else {
        command.env("PARTI_FUSED", "off");
    }
    assert_succeeded(&finish(vec![command.spawn().unwrap()]));
    let log = manifests::testing::artifact_bytes(out, "metrics.jsonl");
    let losses = String::from_utf8(log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|entry| entry["loss"].as_f64())
        .collect();
    let (stage, _) = manifests::Upstream::read(&out.display().to_string()).unwrap();
    let validation = stage.manifest.metrics["val_loss"].as_f64().unwrap();
    (losses, validation)
}

#[test]
fn fused_kernels_leave_the_loss_curve_unchanged() {
    let upstream = tempfile::tempdir().unwrap();
    manifests::testing::run_stages(
        &bin(),
        upstream.path(),
        &manifests::testing::few_step_pipeline(120, 60),
    );
    std::fs::write(upstream.path().join("parti.toml"), "log_every = 1\n").unwrap();
    let runs = tempfile::tempdir().unwrap();
    let (fused, fused_validation) = curve(upstream.path(), &runs.path().join("fused"), true);
    let (composed, composed_validation) =
        curve(upstream.path(), &runs.path().join("composed"), false);
    assert_eq!(fused.len(), 16, "{fused:?}");
    assert_eq!(fused.len(), composed.len());
    // The curve must move, or agreeing would say little.
    assert!(fused[15] < 0.9 * fused[0], "{fused:?}");
    if nn::backend::backend_name() == "flex" {
        assert_eq!(fused, composed);
        assert!(
            (fused_validation - composed_validation).abs() <= 1e-5 * composed_validation.abs(),
            "validation loss: rational erf {fused_validation}, libm erf {composed_validation}"
        );
        return;
    }
    // The kernels did run: they round differently from the composition.
    assert_ne!(fused, composed, "PARTI_FUSED=off changed nothing on tch");
    // f32 rounding differences compound through 16 AdamW steps; 1e-3 relative is far below
    // any change in what is learned (the loss moves by tens of percent over the run).
    for (step, (a, b)) in fused.iter().zip(&composed).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs(),
            "step {step}: fused {a}, composed {b}\n{fused:?}\n{composed:?}"
        );
    }
    assert!(
        (fused_validation - composed_validation).abs() <= 1e-3 * composed_validation.abs(),
        "validation loss: fused {fused_validation}, composed {composed_validation}"
    );
}
