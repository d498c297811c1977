//! `train parti` with the fused kernels (libtorch's attention, layer norm, cross-entropy and
//! AdamW on `tch`) and with the compositions (`PARTI_FUSED=off`) follows the same loss curve:
//! within rounding on `tch`, where the kernels sum in another order, and bit for bit on `flex`,
//! where both trainings are the composition (only the validation pass, outside autodiff, differs
//! there: its GELU takes the rational erf unless `PARTI_FUSED=off`). On `tch`, `precision =
//! "bf16"` (libtorch's autocast) follows the f32 curve within bf16's rounding; `flex` refuses it.

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
    // The same run under bf16 autocast (config key `precision`).
    std::fs::write(
        upstream.path().join("parti.toml"),
        "log_every = 1\nprecision = \"bf16\"\n",
    )
    .unwrap();
    if nn::backend::backend_name() == "flex" {
        assert_eq!(fused, composed);
        assert!(
            (fused_validation - composed_validation).abs() <= 1e-5 * composed_validation.abs(),
            "validation loss: rational erf {fused_validation}, libm erf {composed_validation}"
        );
        let refused = parti_command(upstream.path(), &runs.path().join("bf16"), 16)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains("bf16 needs the tch backend"),
            "{stderr}"
        );
        return;
    }
    let (bf16, bf16_validation) = curve(upstream.path(), &runs.path().join("bf16"), true);
    let (stage, _) =
        manifests::Upstream::read(&runs.path().join("bf16").display().to_string()).unwrap();
    assert_eq!(stage.manifest.config["precision"], "bf16");
    // Autocast did engage: bf16 products round differently from f32 ones at the first step.
    assert_ne!(bf16[0], fused[0], "precision bf16 changed nothing");
    // bf16 keeps 8 bits of mantissa in the products (f32 in the sums, norms and losses):
    // within 2% of the f32 curve at every step, and the same validation loss within 2%.
    for (step, (a, b)) in bf16.iter().zip(&fused).enumerate() {
        assert!(
            (a - b).abs() <= 0.02 * b.abs(),
            "step {step}: bf16 {a}, f32 {b}\n{bf16:?}\n{fused:?}"
        );
    }
    assert!(
        (bf16_validation - fused_validation).abs() <= 0.02 * fused_validation.abs(),
        "validation loss: bf16 {bf16_validation}, f32 {fused_validation}"
    );
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
