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

/// One side of the load benchmark: `clients` requests sent at once to a server taking at most
/// `max_batch` requests per round.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRun {
    pub max_batch: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub latency_p50_seconds: f64,
    pub latency_p99_seconds: f64,
    pub rounds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub samples_per_request: usize,
    pub model: String,
    pub backend: &'static str,
    /// Every client's request in rounds of up to `clients`, whatever their settings.
    pub batched: LoadRun,
    /// One request per round.
    pub one_at_a_time: LoadRun,
    /// batched / one-at-a-time requests per second.
    pub speedup: f64,
}

/// `infer bench-serve`: `clients` single-sample requests with distinct seeds (and the model's
/// other settings) against an in-process `infer serve` on loopback, with cross-request batching
/// and then one request at a time, same model, same run.
pub fn serve_load(parti: &str, clients: usize, device: &str) -> Result<LoadReport, Error> {
    use crate::sample::Generator;
    use crate::serve::{DEFAULT_QUEUE, ServeConfig};
    if clients == 0 {
        return Err(Error::Usage("--clients must be at least 1".into()));
    }
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Error::Data(format!("starting the async runtime: {e}")))?;
    let mut runs = Vec::new();
    let mut model = String::new();
    for max_batch in [clients, 1] {
        let generator = Generator::load(parti, None, None, device)?;
        model = generator.name.clone();
        let config = ServeConfig {
            max_batch,
            queue: clients.max(DEFAULT_QUEUE),
            ..ServeConfig::new(generator.recommended.clone())
        };
        let worker = crate::serve::spawn_worker(generator, &config)?;
        let run = runtime.block_on(load(worker.clone(), config, clients));
        worker.shutdown();
        runs.push(run?);
    }
    let one_at_a_time = runs.pop().ok_or_else(|| Error::Data("no runs".into()))?;
    let batched = runs.pop().ok_or_else(|| Error::Data("no runs".into()))?;
    Ok(LoadReport {
        clients,
        samples_per_request: 1,
        model,
        backend: nn::backend::backend_name(),
        speedup: batched.requests_per_second / one_at_a_time.requests_per_second.max(1e-12),
        batched,
        one_at_a_time,
    })
}

/// Sends one warm-up request, then `clients` at once; every answer must be 200.
async fn load(
    worker: crate::serve::WorkerHandle,
    config: crate::serve::ServeConfig,
    clients: usize,
) -> Result<LoadRun, Error> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Error::Data(format!("{what}: {e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| failed("binding a loopback port", &e))?;
    let address = listener
        .local_addr()
        .map_err(|e| failed("reading the bound address", &e))?;
    let url = format!("http://{address}/v1/generate");
    let max_batch = config.max_batch;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = config.connection_limits();
    let router = crate::serve::router(worker.clone(), config);
    let server = tokio::spawn(crate::serve::serve(
        listener,
        router,
        async {
            let _ = stopped.await;
        },
        limits,
    ));
    let client = reqwest::Client::new();
    let prompts: Vec<String> = crate::eval::eval_objects(clients)
        .iter()
        .map(crate::eval::prompt)
        .collect();
    let send = |seed: usize| {
        let (client, url) = (client.clone(), url.clone());
        let prompt = prompts[seed % prompts.len()].clone();
        async move {
            let started = Instant::now();
            let body = serde_json::json!({"prompt": prompt, "seed": seed, "samples": 1, "keep": 1});
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| failed("sending a request", &e))?;
            let status = response.status();
            let bytes = response
                .bytes()
                .await
                .map_err(|e| failed("reading an answer", &e))?;
            if !status.is_success() {
                return Err(Error::Data(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )));
            }
            Ok::<f64, Error>(started.elapsed().as_secs_f64())
        }
    };
    send(0).await?;
    let rounds_before = worker.stats().rounds;
    let started = Instant::now();
    let answers = futures::future::join_all((0..clients).map(send)).await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = server.await;
    let mut latencies = answers.into_iter().collect::<Result<Vec<f64>, Error>>()?;
    latencies.sort_by(f64::total_cmp);
    let at = |share: f64| latencies[((latencies.len() - 1) as f64 * share).round() as usize];
    Ok(LoadRun {
        max_batch,
        seconds,
        requests_per_second: clients as f64 / seconds.max(1e-12),
        latency_p50_seconds: at(0.5),
        latency_p99_seconds: at(0.99),
        rounds: worker.stats().rounds - rounds_before,
    })
}
