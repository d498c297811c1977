//! `vqgan bench`: one ViT-VQGAN train step (forward, pixel and VQ losses, backward, AdamW) on
//! random images, against the same architecture in PyTorch (`bench/torch_models.py`).

use burn::tensor::{Distribution, Tensor};
use nn::bench::{Comparison, TrainStepArgs, time_train_steps};

use crate::Error;
use models::vqgan::{VitVqgan, VitVqganConfig};

fn preset(name: &str) -> Result<VitVqganConfig, Error> {
    match name {
        "tiny" => Ok(VitVqganConfig::tiny()),
        "small" => Ok(VitVqganConfig::small()),
        other => Err(Error::Usage(format!(
            "no benchmark for preset '{other}' (tiny, small)"
        ))),
    }
}

/// Batch 16 unless `--batch` says otherwise.
pub fn train_step(args: &TrainStepArgs) -> Result<Comparison, Error> {
    let (name, batch) = (args.preset.as_str(), args.batch.unwrap_or(16));
    let config = preset(name)?;
    let workers = args
        .workers(batch)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let device = workers[0].clone();
    let _seeded = nn::backend::seed_exclusively(&device, 0);
    let model: VitVqgan = config.init(&device);
    nn::training::materialize(&model);
    let mut optimizer = nn::fused::AdamW {
        beta_2: 0.99,
        ..Default::default()
    }
    .init();
    let size = config.image_size;
    let images = Tensor::<4>::random(
        [batch, 3, size, size],
        Distribution::Uniform(0.0, 1.0),
        &device,
    );
    let ours = time_train_steps(model, &mut optimizer, args, &workers, |model, share| {
        let images = share.of(&images);
        let out = model.forward(images.clone());
        // f32 as PyTorch's subtraction promotes it (the decoder's output is bf16 under autocast).
        let error = nn::fused::to_dtype(out.images, images.dtype()) - images;
        error.clone().powi_scalar(2).mean() + error.abs().mean() + out.quantized.loss
    })?;
    nn::bench::compare_train_step(
        &ours,
        args,
        "vqgan-step",
        batch,
        format!(
            "ViT-VQGAN {name} train step, batch {batch} ({} worker(s))",
            workers.len()
        ),
    )
    .map_err(|e| Error::Usage(e.to_string()))
}
