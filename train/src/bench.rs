//! `train bench`: one Parti train step (text encoder, decoder with conv-shaped masks and
//! cross-attention, cross-entropy over the codebook, backward, AdamW) on random data, against the
//! same architecture in PyTorch (`bench/torch_models.py`).

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
        // The 350M slice's ops (layers, heads, masks, head, optimizer) on tensors too small to
        // compute: its step time is what issuing the ops costs the host, which on a GPU decides
        // whether the kernels run back to back.
        "350m-ops" => Ok((
            PartiConfig::new(
                TextEncoderConfig::new(100, 8, 64, 2, 16, 64),
                4,
                64,
                64,
                2,
                16,
                64,
            ),
            8,
        )),
        other => Err(Error::Usage(format!(
            "no benchmark for preset '{other}' (tiny, 350m-slice, 350m-ops)"
        ))),
    }
}

/// Batch 32 unless `--batch` says otherwise.
pub fn parti_step(args: &TrainStepArgs) -> Result<Comparison, Error> {
    let (name, batch) = (args.preset.as_str(), args.batch.unwrap_or(32));
    let (config, text_length) = preset(name)?;
    let workers = args
        .workers(batch)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let device = workers[0].clone();
    let _seeded = nn::backend::seed_exclusively(&device, 0);
    let model: Parti = config.init(&device);
    nn::training::materialize(&model);
    let mut optimizer = nn::fused::AdamW {
        weight_decay: 0.01,
        ..Default::default()
    }
    .init();
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
    let ours = time_train_steps(model, &mut optimizer, args, &workers, |model, share| {
        let targets = share.of(&targets);
        let condition = model.condition(share.of(&text), share.of(&padding), None);
        token_loss(model.forward(targets.clone(), &condition), targets)
    })?;
    let flops = parti_step_flops(&config, text_length, batch);
    nn::bench::compare_train_step(
        &ours,
        args,
        "parti-step",
        batch,
        format!(
            "Parti {name} train step, batch {batch} ({} worker(s))",
            workers.len()
        ),
    )
    .map(|comparison| comparison.with_model_flops(flops, args.peak_tflops))
    .map_err(|e| Error::Usage(e.to_string()))
}

/// The model FLOPs of one Parti train step on `batch` captions of `text_length` tokens, as
/// model FLOPs utilisation counts them (PaLM, appendix B): every matrix product of the forward
/// pass (projections, attention scores and weighted sums over whole score matrices, masks not
/// subtracted, MLPs, the output head), times 3 for forward and backward; embeddings, norms,
/// softmax and elementwise work are not counted.
pub fn parti_step_flops(config: &PartiConfig, text_length: usize, batch: usize) -> f64 {
    let encoder = &config.encoder;
    let (t, e, e_mlp) = (
        text_length as f64,
        encoder.d_model as f64,
        encoder.d_mlp as f64,
    );
    let (n, d, mlp, codes) = (
        (config.grid * config.grid) as f64,
        config.d_model as f64,
        config.d_mlp as f64,
        config.codebook_size as f64,
    );
    // Per layer: 4 projections (2 FLOPs per multiply-add), scores and weighted sum, the MLP.
    let encoder_layer = 8.0 * t * e * e + 4.0 * t * t * e + 4.0 * t * e * e_mlp;
    let encoder = encoder.n_layers as f64 * encoder_layer + 2.0 * t * e * d;
    let self_attention = 8.0 * n * d * d + 4.0 * n * n * d;
    // Queries and output over the image tokens, keys and values over the text.
    let cross_attention = 4.0 * n * d * d + 4.0 * t * d * d + 4.0 * n * t * d;
    let decoder_layer = self_attention + cross_attention + 4.0 * n * d * mlp;
    let decoder = config.n_layers as f64 * decoder_layer + 2.0 * n * d * codes;
    3.0 * batch as f64 * (encoder + decoder)
}

/// `train bench-distributed`: what a second process buys on this machine.
#[derive(clap::Args, Debug, Clone)]
pub struct ScalingArgs {
    /// The `vqgan encode` manifest to train on.
    #[arg(long)]
    pub tokens: String,
    /// The `train tokenizer` manifest.
    #[arg(long)]
    pub tokenizer: String,
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// The largest job to time (1, 2, ... up to this many processes).
    #[arg(long, default_value_t = 2)]
    pub processes: usize,
    /// Where the timed runs write (each run is forced).
    #[arg(long, default_value = "target/bench-distributed")]
    pub out: String,
}

/// Times `train parti` as jobs of 1..=`processes` processes on loopback (c10d + Gloo, launched
/// as torchrun would, each process with `cores / processes` threads) and reports image tokens
/// per second of the training loop, speedup and scaling efficiency.
pub fn scaling(args: &ScalingArgs) -> Result<String, Error> {
    let program =
        std::env::current_exe().map_err(|e| Error::Usage(format!("finding this program: {e}")))?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // Every process gets the same share of the cores, whatever the job's size, so the
    // efficiency measures what the job costs beyond its compute (as torchrun's OMP_NUM_THREADS).
    let threads = (cores / args.processes.max(1)).max(1);
    let mut rows = Vec::new();
    for world_size in 1..=args.processes.max(1) {
        let out = format!("{}/processes-{world_size}", args.out.trim_end_matches('/'));
        let port = manifests::testing::free_port();
        let ranks: Vec<std::process::Child> = (0..world_size)
            .map(|rank| {
                let mut command = std::process::Command::new(&program);
                command
                    .args(["parti", "--preset", &args.preset, "--force"])
                    .args(["--tokens", &args.tokens, "--tokenizer", &args.tokenizer])
                    .args(["--steps", &args.steps.to_string(), "--out", &out])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped());
                if world_size > 1 {
                    command
                        .env("RANK", rank.to_string())
                        .env("LOCAL_RANK", rank.to_string())
                        .env("WORLD_SIZE", world_size.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .env("GLOO_SOCKET_IFNAME", "lo");
                }
                command.env("OMP_NUM_THREADS", threads.to_string());
                command
                    .spawn()
                    .map_err(|e| Error::Usage(format!("starting rank {rank}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        for (rank, child) in ranks.into_iter().enumerate() {
            let output = child
                .wait_with_output()
                .map_err(|e| Error::Usage(format!("waiting for rank {rank}: {e}")))?;
            if !output.status.success() {
                return Err(Error::Usage(format!(
                    "rank {rank} of {world_size}: {}",
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
        }
        let (stage, _) = manifests::Upstream::read(&out)?;
        let tokens_per_second = stage
            .manifest
            .metrics
            .get("train_tokens_per_second")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| Error::Data(format!("{out}: no train_tokens_per_second")))?;
        rows.push((world_size, tokens_per_second));
    }
    let single = rows.first().map_or(1.0, |row| row.1);
    let mut report = format!(
        "train parti ({}), {} steps, {threads} thread(s) per process on {cores} core(s), \
         c10d + Gloo over loopback\n\
         processes  image tokens/s  speedup  scaling efficiency\n",
        args.preset, args.steps
    );
    for (world_size, tokens_per_second) in rows {
        let speedup = tokens_per_second / single;
        report.push_str(&format!(
            "{world_size:>9}  {tokens_per_second:>14.0}  {speedup:>6.2}x  {:>17.0}%\n",
            100.0 * speedup / world_size as f64
        ));
    }
    Ok(report)
}
