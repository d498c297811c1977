//! The super-resolution model's contract: the presets' shapes and parameter counts (Parti's
//! figures: about 15M for 256 -> 512 and 30M for 256 -> 1024), a fresh model equal to the
//! bicubic baseline, and the helpers it is scored with.

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use models::superres::{SuperResConfig, bicubic, downscale};
use nn::backend;

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn presets_enlarge_by_their_scale_with_the_papers_parameter_counts() {
    let device = backend::device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 3);
    for (name, scale, parameters) in [
        ("tiny", 4, None),
        ("512", 2, Some(15_000_000.0)),
        ("1024", 4, Some(30_000_000.0)),
    ] {
        let config = SuperResConfig::preset(name).unwrap();
        assert_eq!(config.scale, scale, "{name}");
        assert_eq!(config.output_size(), config.input_size * scale, "{name}");
        let model = config.init(&device);
        // The count a config is checked against its weights with, before anything is built.
        assert_eq!(
            config.parameter_count(),
            model.num_params() as u64,
            "{name}"
        );
        let count = model.num_params() as f64;
        if let Some(expected) = parameters {
            assert!(
                (count / expected - 1.0).abs() < 0.1,
                "{name}: {count} parameters, Parti's is about {expected}"
            );
            assert_eq!((config.blocks, config.channels), (12, 128), "{name}");
        } else {
            assert!(count < 1_000_000.0, "tiny: {count} parameters");
        }
        // Fully convolutional: any input size, here a small non-square one.
        let x = Tensor::<4>::random([2, 3, 6, 10], Distribution::Uniform(0.0, 1.0), &device);
        assert_eq!(
            model.forward(x).dims(),
            [2, 3, 6 * scale, 10 * scale],
            "{name}"
        );
    }
    assert!(SuperResConfig::preset("2048").is_err());
}

#[test]
fn downscale_averages_blocks_and_bicubic_keeps_a_flat_picture_flat() {
    let device = backend::device("cpu").unwrap();
    let values: Vec<f32> = (0..3 * 4 * 4).map(|v| v as f32).collect();
    let x = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([1, 3, 4, 4]);
    let small = floats(downscale(x, 2));
    // Channel 0, top-left 2x2 block: 0, 1, 4, 5.
    assert_eq!(&small[..4], &[2.5, 4.5, 10.5, 12.5]);
    assert_eq!(small[4], 18.5);

    let flat = Tensor::<4>::full([1, 3, 5, 5], 0.25, &device);
    let enlarged = bicubic(flat, 4);
    assert_eq!(enlarged.dims(), [1, 3, 20, 20]);
    assert!(floats(enlarged).iter().all(|v| (v - 0.25).abs() < 1e-5));
}

#[test]
fn a_fresh_model_is_about_bicubic_upsampling() {
    // The body's last convolution starts near-silent, so training starts from (about) the
    // baseline the model is scored against.
    let device = backend::device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 5);
    let model = SuperResConfig::tiny().init(&device);
    let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Uniform(0.0, 1.0), &device);
    let (ours, baseline) = (floats(model.forward(x.clone())), floats(bicubic(x, 4)));
    assert_eq!(ours.len(), 2 * 3 * 32 * 32);
    let worst = ours
        .iter()
        .zip(&baseline)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst > 0.0 && worst < 0.02, "{worst}");
}

#[test]
fn training_moves_it_past_bicubic_on_sharp_edges() {
    use burn::optim::{AdamWConfig, GradientsParams};
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 7);
    let mut model = SuperResConfig::tiny().init(&device);
    // Hard-edged squares at 32 px: bicubic blurs their edges from the 8 px averages.
    let side = 32;
    let picture = |top: usize, left: usize, size: usize, colour: [f32; 3]| {
        let mut data = vec![0.5f32; 3 * side * side];
        for (c, value) in colour.iter().enumerate() {
            for y in top..top + size {
                for x in left..left + size {
                    data[c * side * side + y * side + x] = *value;
                }
            }
        }
        data
    };
    let data = [
        picture(3, 5, 13, [1.0, 0.0, 0.0]),
        picture(10, 2, 17, [0.0, 0.0, 1.0]),
        picture(6, 9, 11, [1.0, 1.0, 0.0]),
        picture(1, 14, 15, [0.0, 0.0, 0.0]),
    ]
    .concat();
    let targets = Tensor::<1>::from_floats(data.as_slice(), &device).reshape([4, 3, side, side]);
    let inputs = downscale(targets.clone(), 4);
    let mse = |a: Tensor<4>, b: Tensor<4>| -> f32 {
        floats((a.clamp(0.0, 1.0) - b).powi_scalar(2).mean())[0]
    };
    let baseline = mse(bicubic(inputs.clone(), 4), targets.clone());
    let mut optimizer = AdamWConfig::new().init();
    for _ in 0..150 {
        let loss = (model.forward(inputs.clone()) - targets.clone())
            .abs()
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(2e-3, model, grads);
    }
    let trained = mse(model.forward(inputs), targets);
    let gain_db = 10.0 * (baseline / trained).log10();
    assert!(
        gain_db > 3.0,
        "bicubic MSE {baseline}, trained {trained}: {gain_db:.2} dB"
    );
}

#[test]
fn bicubic_uses_half_pixel_centres() {
    // Output j samples input (j + 0.5) / scale - 0.5 with Keys' cubic at a = -0.75 (PyTorch's
    // and Pillow's), so a ramp comes back at those positions, bent only by the kernel.
    let device = backend::device("cpu").unwrap();
    let ramp: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 8) as f32).collect();
    let x = Tensor::<1>::from_floats(ramp.as_slice(), &device).reshape([1, 3, 8, 8]);
    let out = floats(bicubic(x, 4));
    let keys = |d: f32| {
        let (a, d) = (-0.75f32, d.abs());
        if d <= 1.0 {
            (a + 2.0) * d.powi(3) - (a + 3.0) * d.powi(2) + 1.0
        } else if d < 2.0 {
            a * (d.powi(3) - 5.0 * d.powi(2) + 8.0 * d - 4.0)
        } else {
            0.0
        }
    };
    for j in 8..24 {
        let position = (j as f32 + 0.5) / 4.0 - 0.5;
        let left = position.floor();
        let expected: f32 = (-1..=2)
            .map(|k| {
                let tap = left + k as f32;
                tap * keys(position - tap)
            })
            .sum();
        let got = out[10 * 32 + j];
        assert!(
            (got - expected).abs() < 1e-4,
            "column {j}: {got} vs {expected}"
        );
    }
}
