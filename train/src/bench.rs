//! `train bench`: one Parti train step (text encoder, decoder with conv-shaped masks and
//! cross-attention, cross-entropy over the codebook, backward, AdamW) on random data, against the
//! same architecture in PyTorch (`bench/torch_models.py`).

use burn::optim::AdamWConfig;
use burn::tensor::{Bool, Int, Tensor};
use nn::bench::{Comparison, TrainStepArgs, time_train_steps};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Error;
use models::parti::{Parti, PartiConfig, token_loss};
use models::text_encoder::TextEncoderConfig;

/// `(config, text length)`, the same table as the peer's `PARTI`.
fn preset(name: &str) -> Result<(PartiConfig, usize), Error> {
    match name {
        "tiny" => Ok((
            PartiConfig::new(
                TextEncoderConfig::new(1000, 16, 128, 2, 4, 512),
                8,
                512,
                128,
                3,
                4,
                512,
            )
            .with_conv_window(5),
            16,
        )),
        // The 350M model's width (Parti Table 1) at two layers a side, full 32x32 grid.
        "350m-slice" => Ok((
            PartiConfig::new(
                TextEncoderConfig::new(16000, 64, 1024, 2, 16, 4096),
                32,
                8192,
                1024,
                2,
                16,
                4096,
            ),
            64,
        )),
        other => Err(Error::Usage(format!(
            "no benchmark for preset '{other}' (tiny, 350m-slice)"
        ))),
    }
}

/// Batch 32 unless `--batch` says otherwise.
pub fn parti_step(args: &TrainStepArgs) -> Result<Comparison, Error> {
    let (name, batch, rounds) = (args.preset.as_str(), args.batch.unwrap_or(32), args.rounds);
    let (config, text_length) = preset(name)?;
    let workers = args
        .workers(batch)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let device = workers[0].clone();
    let _seeded = nn::backend::seed_exclusively(&device, 0);
    let model: Parti = config.init(&device);
    nn::training::materialize(&model);
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let text: Vec<i32> = (0..batch * text_length)
        .map(|_| rng.random_range(5..config.encoder.vocab_size as i32))
        .collect();
    let tokens = config.tokens();
    let targets: Vec<i32> = (0..batch * tokens)
        .map(|_| rng.random_range(0..config.codebook_size as i32))
        .collect();
    let text = Tensor::<1, Int>::from_data(text.as_slice(), &device).reshape([batch, text_length]);
    let padding =
        Tensor::<1, Bool>::from_data(vec![false; batch * text_length].as_slice(), &device)
            .reshape([batch, text_length]);
    let targets = Tensor::<1, Int>::from_data(targets.as_slice(), &device).reshape([batch, tokens]);
    let ours = time_train_steps(model, &mut optimizer, rounds, &workers, |model, share| {
        let targets = share.of(&targets);
        let condition = model.condition(share.of(&text), share.of(&padding), None);
        token_loss(model.forward(targets.clone(), &condition), targets).0
    });
    nn::bench::compare_train_step(
        &ours,
        args.peer.peer(&args.device).as_ref(),
        "parti-step",
        name,
        batch,
        rounds,
        format!(
            "Parti {name} train step, batch {batch} ({} worker(s))",
            workers.len()
        ),
    )
    .map_err(|e| Error::Usage(e.to_string()))
}
