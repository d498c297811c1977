//! `infer bench`: sampling speed of the same decoder with and without the KV cache, and against
//! the same decoder in PyTorch with its own KV cache, measured in one run on one machine (a
//! benchmark, not a test: nothing here asserts a time).

use std::time::Instant;

use burn::tensor::{Bool, Int, Tensor};
use models::parti::PartiConfig;
use models::text_encoder::TextEncoderConfig;
use nn::bench::TorchPeer;
use serde::Serialize;

use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct KvCacheReport {
    pub tokens: usize,
    pub grid: usize,
    pub d_model: usize,
    pub layers: usize,
    pub batch: usize,
    pub cached_seconds: f64,
    pub uncached_seconds: f64,
    pub cached_tokens_per_second: f64,
    pub uncached_tokens_per_second: f64,
    /// cached / uncached throughput.
    pub speedup: f64,
    pub backend: &'static str,
    /// The same decoder in PyTorch with its own KV cache (`bench/torch_models.py`), same run.
    pub torch_tokens_per_second: Option<f64>,
    /// ours cached / PyTorch cached throughput (above 1: we are faster).
    pub torch_speedup: Option<f64>,
}

/// Greedy decoding of a `grid x grid` image with a randomly initialised decoder of the given
/// shape, once step by step with the KV cache and once recomputing the whole prefix per token.
/// Both runs must produce the same tokens (checked), so the comparison is like for like.
pub fn kv_cache(
    grid: usize,
    d_model: usize,
    layers: usize,
    batch: usize,
    device: &str,
    peer: Option<&TorchPeer>,
) -> Result<KvCacheReport, Error> {
    let device = nn::backend::device(device).map_err(|e| Error::Usage(e.to_string()))?;
    let _seeded = nn::backend::seed_exclusively(&device, 0);
    let heads = (d_model / 64).max(1);
    let encoder = TextEncoderConfig::new(1000, 128, d_model, 2, heads, 4 * d_model);
    let config = PartiConfig::new(encoder, grid, 8192, d_model, layers, heads, 4 * d_model)
        .with_conv_window(11)
        .with_full_attention_every(4);
    let model = config.init(&device);
    let text: Vec<i32> = (0..batch * 16).map(|i| 5 + (i % 900) as i32).collect();
    let ids = Tensor::<1, Int>::from_data(text.as_slice(), &device).reshape([batch, 16]);
    let padding = Tensor::<1, Bool>::from_data(vec![false; batch * 16].as_slice(), &device)
        .reshape([batch, 16]);
    let condition = model.condition(ids, padding, None);
    let masks = model.masks(&device);
    let n = config.tokens();
    let bos = model.bos_id() as i32;
    let greedy = |logits: Tensor<2>| -> Result<Vec<i32>, Error> {
        logits
            .argmax(1)
            .into_data_as::<i64>()
            .try_to_vec::<i64>()
            .map(|v| v.into_iter().map(|t| t as i32).collect())
            .map_err(|e| Error::Data(format!("{e:?}")))
    };

    let started = Instant::now();
    let mut state = model.start(&condition);
    let mut input = vec![bos; batch];
    let mut cached = Vec::with_capacity(n);
    for _ in 0..n {
        let step = Tensor::<1, Int>::from_data(input.as_slice(), &device).reshape([batch, 1]);
        input = greedy(model.step(step, &mut state, &masks))?;
        cached.push(input.clone());
    }
    let cached_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut history: Vec<Vec<i32>> = vec![vec![bos]; batch];
    let mut uncached = Vec::with_capacity(n);
    for _ in 0..n {
        let len = history[0].len();
        let flat: Vec<i32> = history.iter().flatten().copied().collect();
        let prefix = Tensor::<1, Int>::from_data(flat.as_slice(), &device).reshape([batch, len]);
        let next = greedy(model.last_logits_uncached(prefix, &condition, &masks))?;
        for (row, token) in history.iter_mut().zip(&next) {
            row.push(*token);
        }
        uncached.push(next);
    }
    let uncached_seconds = started.elapsed().as_secs_f64();
    if cached != uncached {
        return Err(Error::Data(
            "cached and uncached decoding disagree: the benchmark compares different work".into(),
        ));
    }
    let tokens = n * batch;
    let cached_tokens_per_second = tokens as f64 / cached_seconds;
    let torch_tokens_per_second = match peer {
        Some(peer) => {
            let report = peer
                .run(&[
                    "parti-sample".into(),
                    "--grid".into(),
                    grid.to_string(),
                    "--d-model".into(),
                    d_model.to_string(),
                    "--layers".into(),
                    layers.to_string(),
                    "--batch".into(),
                    batch.to_string(),
                ])
                .map_err(|e| Error::Usage(e.to_string()))?;
            Some(report["tokens_per_second"].as_f64().ok_or_else(|| {
                Error::Data(format!(
                    "the PyTorch peer reported no tokens_per_second: {report}"
                ))
            })?)
        }
        None => None,
    };
    Ok(KvCacheReport {
        tokens: n,
        grid,
        d_model,
        layers,
        batch,
        cached_seconds,
        uncached_seconds,
        cached_tokens_per_second,
        uncached_tokens_per_second: tokens as f64 / uncached_seconds,
        speedup: uncached_seconds / cached_seconds,
        backend: nn::backend::backend_name(),
        torch_tokens_per_second,
        torch_speedup: torch_tokens_per_second.map(|torch| cached_tokens_per_second / torch),
    })
}
