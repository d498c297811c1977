//! The training objective's parts: the adversarial losses and their discriminator, the
//! logit-Laplace likelihood, and the VGG-16 perceptual distance read from a safetensors file.

mod common;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Distribution, Tensor, TensorData};
use models::vqgan::VitVqganConfig;
use nn::backend;
use vqgan::loss::{
    AdversarialLoss, DiscriminatorConfig, Vgg16Features, discriminator_loss, generator_loss,
    logit_laplace,
};

fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

fn vector(values: &[f32], device: &burn::tensor::Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

fn softplus(x: f64) -> f64 {
    (1.0 + x.exp()).ln()
}

#[test]
fn adversarial_losses_follow_their_formulas() {
    let device = backend::device("cpu").unwrap();
    let (real, fake) = ([2.0f32, 0.5], [-2.0f32, 0.0]);
    let d = |kind| {
        scalar(discriminator_loss(
            kind,
            vector(&real, &device),
            vector(&fake, &device),
        ))
    };
    let g = |kind| scalar(generator_loss(kind, vector(&fake, &device)));
    // Hinge: mean(relu(1 - real)) + mean(relu(1 + fake)) = 0.25 + 0.5; generator -mean(fake).
    assert!((d(AdversarialLoss::Hinge) - 0.75).abs() < 1e-6);
    assert!((g(AdversarialLoss::Hinge) - 1.0).abs() < 1e-6);
    // Logistic: softplus(-real) + softplus(fake); generator softplus(-fake).
    let mean = |v: [f64; 2]| (v[0] + v[1]) / 2.0;
    let expected_d =
        mean(real.map(|r| softplus(-r as f64))) + mean(fake.map(|f| softplus(f as f64)));
    let expected_g = mean(fake.map(|f| softplus(-f as f64)));
    assert!((d(AdversarialLoss::NonSaturating) - expected_d).abs() < 1e-5);
    assert!((g(AdversarialLoss::NonSaturating) - expected_g).abs() < 1e-5);
}

/// Squares on gray against noise: a discriminator worth its name tells them apart quickly.
#[test]
fn the_discriminator_learns_to_tell_real_from_fake() {
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 3);
    let config = DiscriminatorConfig::new(16, 8, 16);
    assert_eq!(config.blocks(), 2);
    let mut critic = config.init(&device);
    let real = {
        let mut pixels = vec![0.5f32; 8 * 3 * 16 * 16];
        for (i, p) in pixels.iter_mut().enumerate() {
            let (y, x) = ((i / 16) % 16, i % 16);
            if (4..12).contains(&y) && (4..12).contains(&x) {
                *p = 0.9;
            }
        }
        Tensor::<4>::from_data(TensorData::new(pixels, [8, 3, 16, 16]), &device)
    };
    let fake = Tensor::<4>::random([8, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
    assert_eq!(critic.forward(real.clone()).dims(), [8]);
    let mut optimizer = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let loss = discriminator_loss(
            AdversarialLoss::NonSaturating,
            critic.forward(real.clone()),
            critic.forward(fake.clone()),
        );
        losses.push(scalar(loss.clone()));
        let grads = GradientsParams::from_grads(loss.backward(), &critic);
        critic = optimizer.step(1e-3, critic, grads);
    }
    // Undecided at first (2 ln 2 = 1.39 for logits near 0), then far below it.
    assert!(losses[0] > 0.8, "{losses:?}");
    assert!(
        losses[39] < 0.3 * losses[0] && losses[39] < 0.4,
        "{losses:?}"
    );
}

#[test]
fn the_adversarial_term_reaches_the_decoder_and_encoder() {
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 4);
    let model = VitVqganConfig::tiny().init(&device);
    let critic = DiscriminatorConfig::new(64, 8, 16).init(&device);
    let x = Tensor::<4>::random([2, 3, 64, 64], Distribution::Uniform(0.0, 1.0), &device);
    let grads = generator_loss(
        AdversarialLoss::Hinge,
        critic.forward(model.forward(x).images),
    )
    .backward();
    let magnitude = |t: Option<Tensor<2>>| t.map_or(0.0, |g| g.abs().sum().into_scalar::<f32>());
    let head = magnitude(model.decoder.to_pixels.weight.val().grad(&grads));
    let encoder = magnitude(model.encoder.to_codes.weight.val().grad(&grads));
    assert!(
        head > 0.0 && encoder > 0.0,
        "decoder {head}, encoder {encoder}"
    );
}

#[test]
fn logit_laplace_is_the_laplace_likelihood_in_logit_space() {
    let device = backend::device("cpu").unwrap();
    let target = [0.25f32, 0.5, 0.9, 0.0];
    let logits = [0.0f32, 1.0, 2.0, -3.0];
    let image =
        |v: &[f32]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 1, 2, 2]), &device);
    let nll = scalar(logit_laplace(image(&logits), image(&target)));
    let expected: f64 = target
        .iter()
        .zip(logits)
        .map(|(&t, mu)| {
            let x = (t as f64).clamp(1.0 / 512.0, 1.0 - 1.0 / 512.0);
            ((x / (1.0 - x)).ln() - mu as f64).abs() + (2.0 * x * (1.0 - x)).ln()
        })
        .sum::<f64>()
        / 4.0;
    assert!((nll - expected).abs() < 1e-4, "{nll} vs {expected}");
    // Smallest where the logits are the targets' logits.
    let exact: Vec<f32> = target
        .iter()
        .map(|&t| {
            let x = t.clamp(1.0 / 512.0, 1.0 - 1.0 / 512.0);
            (x / (1.0 - x)).ln()
        })
        .collect();
    assert!(scalar(logit_laplace(image(&exact), image(&target))) < nll);
}

fn vgg(bytes: &[u8], device: &burn::tensor::Device) -> Vgg16Features {
    Vgg16Features::from_safetensors(bytes, "vgg16.safetensors", device).unwrap()
}

#[test]
fn perceptual_distance_is_a_differentiable_distance_on_vgg16_features() {
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 5);
    let plain = common::safetensors_bytes(&common::random_vgg16(1, "", None));
    let features = vgg(&plain, &device);
    assert!(!features.has_lpips_weights());
    let a = Tensor::<4>::random([2, 3, 32, 32], Distribution::Uniform(0.0, 1.0), &device);
    let b = Tensor::<4>::random([2, 3, 32, 32], Distribution::Uniform(0.0, 1.0), &device)
        .require_grad();
    assert!(scalar(features.distance(a.clone(), a.clone())).abs() < 1e-6);
    let ab = features.distance(a.clone(), b.clone());
    let ba = scalar(features.distance(b.clone(), a.clone()));
    let grads = ab.backward();
    let ab = scalar(ab);
    assert!(ab > 1e-3, "{ab}");
    assert!((ab - ba).abs() < 1e-5 * ab.max(1.0));
    let grad = b.grad(&grads).unwrap();
    assert!(
        grad.abs().sum().into_scalar::<f32>() > 0.0,
        "no gradient reaches the image"
    );

    // LPIPS channel weights of 1/C per channel weigh like the plain channel mean; any prefix
    // before `features.` is accepted.
    let lpips = common::safetensors_bytes(&common::random_vgg16(1, "net.", Some(1.0)));
    let weighted = vgg(&lpips, &device);
    assert!(weighted.has_lpips_weights());
    let same = scalar(weighted.distance(a.clone(), b.clone().detach()));
    assert!((same - ab).abs() < 1e-4 * ab, "{same} vs {ab}");
    let doubled = common::safetensors_bytes(&common::random_vgg16(1, "", Some(2.0)));
    let twice = scalar(vgg(&doubled, &device).distance(a, b.detach()));
    assert!((twice - 2.0 * ab).abs() < 1e-4 * ab, "{twice} vs {ab}");
}

#[test]
fn a_bad_vgg16_file_is_refused_naming_the_tensor() {
    let device = backend::device("cpu").unwrap();
    let error = |bytes: &[u8]| match Vgg16Features::from_safetensors(bytes, "weights.st", &device) {
        Ok(_) => panic!("accepted a bad file"),
        Err(e) => e.to_string(),
    };
    let garbage = error(b"not safetensors at all");
    assert!(
        garbage.contains("weights.st") && garbage.contains("not a safetensors"),
        "{garbage}"
    );

    let mut tensors = common::random_vgg16(2, "", None);
    tensors.retain(|(name, _, _)| name != "features.28.bias");
    let missing = error(&common::safetensors_bytes(&tensors));
    assert!(missing.contains("features.28.bias"), "{missing}");

    let mut tensors = common::random_vgg16(2, "", None);
    tensors[0].1 = vec![64, 3, 1, 9];
    let misshapen = error(&common::safetensors_bytes(&tensors));
    assert!(
        misshapen.contains("features.0.weight") && misshapen.contains("[64, 3, 3, 3]"),
        "{misshapen}"
    );
}
