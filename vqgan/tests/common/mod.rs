//! Test fixtures shared by the vqgan test files.
#![allow(dead_code)] // each test file uses some of them

use nn::training::GradClip;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use vqgan::loss::perceptual::VGG16_CONVS;

/// Named f32 tensors -> safetensors bytes.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A VGG-16 with torchvision's tensor names and shapes and random (He-scaled) weights, as
/// `(name, shape, values)`; `lpips` channel weights are added when given.
pub fn random_vgg16(
    seed: u64,
    prefix: &str,
    lpips: Option<f32>,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    for (index, from, to) in VGG16_CONVS {
        let scale = (6.0 / (9.0 * from as f32)).sqrt();
        let weight: Vec<f32> = (0..to * from * 9)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        tensors.push((
            format!("{prefix}features.{index}.weight"),
            vec![to, from, 3, 3],
            weight,
        ));
        let bias: Vec<f32> = (0..to).map(|_| rng.random_range(-0.01..0.01)).collect();
        tensors.push((format!("{prefix}features.{index}.bias"), vec![to], bias));
    }
    if let Some(weight) = lpips {
        for (k, channels) in [64, 128, 256, 512, 512].into_iter().enumerate() {
            tensors.push((
                format!("lin{k}.model.1.weight"),
                vec![1, channels, 1, 1],
                vec![weight / channels as f32; channels],
            ));
        }
    }
    tensors
}

/// Checks that `grad_clip = "global"` reaches a stage's updates, training through
/// `run(name, grad_clip, grad_clip_norm)` and reading a run's metrics lines with `log(name)`: a
/// bound no gradient reaches is the unclipped run (either scope), a tight one changes the
/// losses, and `not_positive` is refused by name. Returns the tight run's log.
pub fn assert_global_clipping_reaches_the_updates<T, E: std::fmt::Display>(
    run: impl Fn(&str, GradClip, f32) -> Result<T, E>,
    log: impl Fn(&str) -> String,
    not_positive: f32,
) -> String {
    let trained = |name: &str, grad_clip, bound| {
        if let Err(e) = run(name, grad_clip, bound) {
            panic!("{name}: {e}");
        }
        log(name)
    };
    let loose = trained("loose-global", GradClip::Global, 1e9);
    assert_eq!(loose, trained("loose-per-tensor", GradClip::PerTensor, 1e9));
    let tight = trained("tight-global", GradClip::Global, 1e-3);
    assert_ne!(loose, tight);
    match run("not-positive", GradClip::Global, not_positive) {
        Ok(_) => panic!("grad_clip_norm {not_positive} was accepted"),
        Err(e) => assert!(e.to_string().contains("grad_clip_norm"), "{e}"),
    }
    tight
}
