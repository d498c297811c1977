//! `infer serve`: an HTTP front end to one [`Generator`].
//!
//! - `POST /v1/generate`: JSON `{"prompt": "...", "samples": 4, "keep": 1, "guidance_scale": 1.1,
//!   "temperature": 0.1, "top_k": 0, "top_p": 1.0, "seed": 0, "upscale": true,
//!   "format": "base64" | "png"}` (everything but `prompt` optional: the model's own settings,
//!   [`ServeConfig::sampling`]; `upscale` defaults to whether the server loaded a
//!   super-resolution model, `--upscale`). `base64` answers `{"prompt", "images": [{"png_base64",
//!   "score", "sample"}], "image_size", "upscaled", "seed", "sampling", "batch", "seconds"}`
//!   with the kept images best first; `png` answers the best image as `image/png`.
//! - `GET /v1/model`: the model's name, manifest digests and default sampling settings (and
//!   where they came from).
//! - `GET /healthz`: `{"status": "ok", "rounds", "requests", "queued", "rejected", ...}`.
//! - `GET /metrics`: the same counters and more (answers by status, latency, queue wait, round
//!   sizes and times) for Prometheus ([`crate::metrics`]).
//! - `GET /`: a page to try prompts (`/?prompt=...&autorun=1` fills the box and generates).
//!
//! Errors are JSON `{"error": "..."}`: 400/415/422 for a body that is not valid JSON or not a
//! valid request, 413 for a body over 64 KiB, 408 for a body that does not arrive within the
//! read timeout, 503 when the queue is full or the server is stopping, 504 after the request
//! timeout, 500 when sampling failed. A client that does not send its headers within the read
//! timeout is disconnected.
//!
//! **Batching.** One worker thread owns the generator; requests wait in a FIFO queue of at most
//! `queue` requests. Whenever the worker is free it takes the oldest `max_batch` requests
//! waiting, fewer when their decoder rows would pass `max_rows` (after waiting for more to
//! arrive: until `batch_wait` passes without a new request, at most `batch_wait_limit` in all),
//! whatever their settings, and
//! decodes all their samples as the rows of one batch ([`Generator::sample_rows`]; on flex one
//! batch per CPU core): every row
//! carries its own guidance, temperature, top-k/top-p and random stream (the request's seed and
//! the sample's index), so a request's images depend only on the request, alone or in a crowd.
//! Requests that arrive during a round join the next one: the rows of a batch share one KV
//! cache position, so a request cannot start while others are half-way through their grids.
//! After the round, all its grids are decoded and reranked together ([`Generator::finish`]).

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::metrics::{self, Metrics};
use crate::sample::{
    Generator, PromptImages, Row, Sampled, SamplingConfig, SamplingSettings, top_k_fits,
};
use crate::{Error, png};

/// The page served at `/`.
pub const PAGE: &str = include_str!("page.html");

/// Most samples one request may ask for.
pub const MAX_SAMPLES: usize = 16;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most requests sampled together in one round (whatever their settings).
    pub max_batch: usize,
    /// Most decoder rows in one round (a sample is one row, two with guidance); `None`: as many
    /// as keep the round's KV cache within [`DEFAULT_CACHE_BYTES`] ([`default_max_rows`]). Each
    /// row holds its own cache, so this, not the request count, bounds a round's memory; a
    /// request asking for more rows than this runs in a round of its own.
    pub max_rows: Option<usize>,
    /// Most requests waiting for the worker; more are refused with 503.
    pub queue: usize,
    /// How long a request may wait and sample before it is answered with 504.
    pub timeout: Duration,
    /// How long a client may take to send a request's headers, and then its body, before the
    /// connection is closed (headers) or answered with 408 (body): slow or stalled clients
    /// must not hold connections, or the shutdown, for ever.
    pub read_timeout: Duration,
    /// Connections served at once; more wait in the listen queue until one closes, so a flood
    /// of clients costs neither unbounded memory nor file descriptors.
    pub max_connections: usize,
    pub max_prompt_chars: usize,
    /// How long the worker waits, after the latest request arrived, for others to join its
    /// round before it starts (0: start at once with whatever is waiting). Requests sent
    /// together reach the queue over some milliseconds (their connections and bodies are
    /// handled one by one); waiting for a quiet gap rather than a fixed time after the first
    /// lets them share a round rather than the first few running alone while the rest wait.
    pub batch_wait: Duration,
    /// The most the worker waits in all before starting a round, however often requests
    /// keep arriving.
    pub batch_wait_limit: Duration,
    /// What a request does not say: the model's settings, or those of `--sampling-from`.
    pub sampling: SamplingSettings,
}

/// Requests per round and queue places by default: 64 clients at once are answered within a
/// round or two, more wait, and 503 is left for a queue four times that.
pub const DEFAULT_MAX_BATCH: usize = 64;
pub const DEFAULT_QUEUE: usize = 256;

/// Connections at once by default: two per queue place (a queued request holds its
/// connection), within the common limit of 1024 open files per process.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// The KV cache a round may hold by default ([`default_max_rows`]).
pub const DEFAULT_CACHE_BYTES: usize = 4 << 30;

/// Most rows per round by default, whatever the model: a round of 64 requests of 4 guided
/// samples, as many as the tiny model's bench sends.
pub const DEFAULT_MAX_ROWS: usize = 512;

/// The largest request body accepted (a prompt is at most `max_prompt_chars` characters; the
/// rest of a request is a few numbers).
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// Bytes of KV cache one decoder row holds by its last step: f32 keys and values of every
/// decoder layer over the whole grid, and of its cross-attention over the longest text.
pub fn cache_bytes_per_row(config: &models::PartiConfig) -> usize {
    let positions = config.grid * config.grid + config.encoder.max_length;
    config.n_layers * 2 * positions * config.d_model * std::mem::size_of::<f32>()
}

/// Rows per round that keep its KV cache within [`DEFAULT_CACHE_BYTES`], at least one
/// request's worth ([`MAX_SAMPLES`] guided samples) and at most [`DEFAULT_MAX_ROWS`]: 512 for
/// the tiny model, 37 for the 350M one (108 MiB of cache per row).
pub fn default_max_rows(config: &models::PartiConfig) -> usize {
    (DEFAULT_CACHE_BYTES / cache_bytes_per_row(config).max(1))
        .clamp(2 * MAX_SAMPLES, DEFAULT_MAX_ROWS)
}
impl ServeConfig {
    /// The defaults, sampling with `sampling`.
    pub fn new(sampling: SamplingSettings) -> ServeConfig {
        ServeConfig {
            max_batch: DEFAULT_MAX_BATCH,
            max_rows: None,
            queue: DEFAULT_QUEUE,
            timeout: Duration::from_secs(120),
            read_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_prompt_chars: 500,
            batch_wait: Duration::from_millis(5),
            batch_wait_limit: Duration::from_millis(50),
            sampling,
        }
    }
}

/// The body of `POST /v1/generate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: String,
    pub samples: Option<usize>,
    pub keep: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    /// Enlarge the kept pictures with the server's super-resolution model.
    pub upscale: Option<bool>,
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON with every kept image as base64 PNG.
    #[default]
    Base64,
    /// The best image as an `image/png` body.
    Png,
}

impl GenerateRequest {
    /// Whether to enlarge this request's pictures: as asked, else whenever the server can.
    pub fn upscale(&self, upscaled_size: Option<usize>) -> Result<bool, String> {
        match (self.upscale, upscaled_size) {
            (Some(true), None) => Err("this server has no super-resolution model (start it \
                 with --upscale SUPERRES_MANIFEST)"
                .into()),
            (Some(wanted), _) => Ok(wanted),
            (None, available) => Ok(available.is_some()),
        }
    }

    /// The sampling settings of a valid request, or what is wrong with it.
    pub fn sampling(&self, config: &ServeConfig) -> Result<SamplingConfig, String> {
        if self.prompt.trim().is_empty() {
            return Err("prompt must not be empty".into());
        }
        let chars = self.prompt.chars().count();
        if chars > config.max_prompt_chars {
            return Err(format!(
                "prompt is {chars} characters; at most {} are accepted",
                config.max_prompt_chars
            ));
        }
        let defaults = &config.sampling.settings;
        let samples = self.samples.unwrap_or(defaults.samples.min(MAX_SAMPLES));
        if !(1..=MAX_SAMPLES).contains(&samples) {
            return Err(format!("samples must be within 1..={MAX_SAMPLES}"));
        }
        let sampling = SamplingConfig {
            guidance_scale: self.guidance_scale.unwrap_or(defaults.guidance_scale),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            samples,
            keep: self.keep.unwrap_or(defaults.keep.min(samples)),
            seed: self.seed.unwrap_or(defaults.seed),
            // The server's choice (`--no-cache`), not the request's.
            use_cache: defaults.use_cache,
        };
        sampling.validate().map_err(|e| match e {
            Error::Usage(message) => message,
            other => other.to_string(),
        })?;
        Ok(sampling)
    }
}

/// What the worker sends back for one request.
struct Generated {
    images: PromptImages,
    /// The kept pictures enlarged, in `images.kept` order, when the request asked for it.
    enlarged: Option<Vec<Vec<f32>>>,
    /// Requests sampled in the same round.
    batch: usize,
}

struct Job {
    queued_at: Instant,
    prompt: String,
    config: SamplingConfig,
    upscale: bool,
    reply: oneshot::Sender<Result<Generated, String>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    arrived: Condvar,
    max_batch: usize,
    max_rows: usize,
    capacity: usize,
    batch_wait: Duration,
    batch_wait_limit: Duration,
    image_size: usize,
    codebook_size: usize,
    /// Side of the enlarged pictures, when the generator has a super-resolution model.
    upscaled_size: Option<usize>,
    text_tokens: usize,
    /// The model's name and the manifests it was loaded from, for `/v1/model`.
    model: serde_json::Value,
    metrics: Metrics,
}

impl Shared {
    /// The queue, even after a panic elsewhere (the worker never panics while holding it).
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Counters for `/healthz`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Sampling rounds run ([`Generator::generate`] calls).
    pub rounds: u64,
    /// Requests sampled.
    pub requests: u64,
    /// Requests waiting now.
    pub queued: usize,
    /// Requests refused because the queue was full.
    pub rejected: u64,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

/// The way into the worker thread; cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Starts the worker thread that owns `generator` and samples what is queued, batch by batch.
pub fn spawn_worker(generator: Generator, config: &ServeConfig) -> Result<WorkerHandle, Error> {
    if config.max_batch == 0 || config.queue == 0 || config.max_rows == Some(0) {
        return Err(Error::Usage(
            "max batch, max rows and queue must be at least 1".into(),
        ));
    }
    let max_rows = config
        .max_rows
        .unwrap_or_else(|| default_max_rows(&generator.parti_config));
    info!(
        "rounds of at most {} requests and {max_rows} rows ({:.1} MiB of KV cache per row)",
        config.max_batch,
        cache_bytes_per_row(&generator.parti_config) as f64 / f64::from(1 << 20)
    );
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        arrived: Condvar::new(),
        max_batch: config.max_batch,
        max_rows,
        capacity: config.queue,
        batch_wait: config.batch_wait,
        batch_wait_limit: config.batch_wait_limit,
        image_size: generator.vqgan_config.image_size,
        codebook_size: generator.parti_config.codebook_size,
        upscaled_size: generator
            .upscaler
            .as_ref()
            .map(|upscaler| upscaler.config.output_size()),
        text_tokens: generator.tokenizer.max_length(),
        model: json!({
            "name": generator.name,
            "manifests": generator.provenance.iter()
                .map(|(uri, digest)| json!({"uri": uri, "digest": digest}))
                .collect::<Vec<_>>(),
            "backend": nn::backend::backend_name(),
            "upscale": generator.upscaler.as_ref().map(|upscaler| json!({
                "manifest": upscaler.uri,
                "from": upscaler.config.input_size,
                "to": upscaler.config.output_size(),
            })),
        }),
        metrics: Metrics::new(&generator.name, nn::backend::backend_name(), config.timeout),
    });
    let worker = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("parti-sampler".into())
        .spawn(move || work(generator, &worker))
        .map_err(|e| Error::Data(format!("starting the sampling thread: {e}")))?;
    Ok(WorkerHandle {
        shared,
        thread: Arc::new(Mutex::new(Some(thread))),
    })
}

impl WorkerHandle {
    fn submit(
        &self,
        prompt: String,
        config: SamplingConfig,
        upscale: bool,
    ) -> Result<oneshot::Receiver<Result<Generated, String>>, Refused> {
        let (reply, receive) = oneshot::channel();
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(Refused::Closed);
        }
        // Requests whose client has gone (timed out, disconnected) do not hold places.
        queue.jobs.retain(|job| !job.reply.is_closed());
        if queue.jobs.len() >= self.shared.capacity {
            self.shared.metrics.rejected();
            return Err(Refused::Full);
        }
        queue.jobs.push_back(Job {
            queued_at: Instant::now(),
            prompt,
            config,
            upscale,
            reply,
        });
        self.shared.arrived.notify_all();
        Ok(receive)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            rounds: self.shared.metrics.rounds(),
            requests: self.shared.metrics.sampled_requests(),
            queued: self.shared.lock().jobs.len(),
            rejected: self.shared.metrics.queue_rejected(),
        }
    }

    /// Side of the generated images in pixels.
    pub fn image_size(&self) -> usize {
        self.shared.image_size
    }

    /// Side of the enlarged images, when the server has a super-resolution model.
    pub fn upscaled_size(&self) -> Option<usize> {
        self.shared.upscaled_size
    }

    /// Refuses new requests, answers the waiting ones with 503, lets the round in progress
    /// finish and waits for the worker thread to end.
    pub fn shutdown(&self) {
        let waiting = {
            let mut queue = self.shared.lock();
            queue.closed = true;
            self.shared.arrived.notify_all();
            std::mem::take(&mut queue.jobs)
        };
        drop(waiting);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            warn!("the sampling thread panicked");
        }
    }
}

/// Decoder rows a request takes: one per sample, two with guidance.
fn rows_of(config: &SamplingConfig) -> usize {
    config.samples * if config.guided() { 2 } else { 1 }
}

/// How many of the oldest requests make the next round: at most `max_batch` requests and
/// `max_rows` rows, and at least one request however many rows it takes.
fn round_size(rows: impl Iterator<Item = usize>, max_batch: usize, max_rows: usize) -> usize {
    let mut taken = 0;
    let mut total = 0;
    for rows in rows.take(max_batch) {
        if taken > 0 && total + rows > max_rows {
            break;
        }
        total += rows;
        taken += 1;
    }
    taken
}

/// Removes the next round from the queue ([`round_size`]).
fn take_round(jobs: &mut VecDeque<Job>, max_batch: usize, max_rows: usize) -> Vec<Job> {
    let take = round_size(
        jobs.iter().map(|job| rows_of(&job.config)),
        max_batch,
        max_rows,
    );
    jobs.drain(..take).collect()
}

/// Whether the queue already holds a full round, so there is no point waiting for more.
fn round_is_full(jobs: &VecDeque<Job>, max_batch: usize, max_rows: usize) -> bool {
    jobs.len() >= max_batch
        || jobs.iter().map(|job| rows_of(&job.config)).sum::<usize>() >= max_rows
}

/// The next round, or `None` once the worker is shut down.
fn next_round(shared: &Shared) -> Option<Vec<Job>> {
    let mut queue = shared.lock();
    loop {
        if queue.closed {
            return None;
        }
        queue.jobs.retain(|job| !job.reply.is_closed());
        if !queue.jobs.is_empty() {
            break;
        }
        queue = shared
            .arrived
            .wait(queue)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    let limit = Instant::now() + shared.batch_wait_limit;
    let mut quiet_until = Instant::now() + shared.batch_wait;
    let mut waiting = queue.jobs.len();
    while !queue.closed && !round_is_full(&queue.jobs, shared.max_batch, shared.max_rows) {
        let now = Instant::now();
        if queue.jobs.len() > waiting {
            quiet_until = now + shared.batch_wait;
        }
        waiting = queue.jobs.len();
        let left = quiet_until.min(limit).saturating_duration_since(now);
        if left.is_zero() {
            break;
        }
        queue = shared
            .arrived
            .wait_timeout(queue, left)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
    if queue.closed {
        return None;
    }
    queue.jobs.retain(|job| !job.reply.is_closed());
    Some(take_round(
        &mut queue.jobs,
        shared.max_batch,
        shared.max_rows,
    ))
}

fn work(generator: Generator, shared: &Shared) {
    while let Some(round) = next_round(shared) {
        if round.is_empty() {
            continue;
        }
        let started = Instant::now();
        let rows: Vec<Row> = round
            .iter()
            .flat_map(|job| {
                (0..job.config.samples).map(|stream| Row {
                    prompt: &job.prompt,
                    settings: &job.config,
                    stream,
                })
            })
            .collect();
        shared.metrics.round_started(
            round
                .iter()
                .map(|job| started.duration_since(job.queued_at).as_secs_f64()),
            round.iter().map(|job| rows_of(&job.config)).sum(),
        );
        let use_cache = round.iter().all(|job| job.config.use_cache);
        let outcome = catch_unwind(AssertUnwindSafe(|| generator.sample_rows(&rows, use_cache)));
        let batch = round.len();
        let grids = match outcome {
            Ok(Ok(grids)) if grids.len() == rows.len() => grids,
            failed => {
                let message = match failed {
                    Ok(Ok(grids)) => format!(
                        "sampling returned {} grids for {} rows",
                        grids.len(),
                        rows.len()
                    ),
                    Ok(Err(e)) => format!("sampling failed: {e}"),
                    Err(_) => "sampling panicked (see the server log)".to_string(),
                };
                warn!("{message}");
                // Before the answers, so a client that reads the metrics after its answer finds
                // its round in them.
                shared.metrics.round_ended(started.elapsed().as_secs_f64());
                for job in round {
                    let _ = job.reply.send(Err(message.clone()));
                }
                continue;
            }
        };
        shared.metrics.sampled(rows.len());
        info!(
            "sampled {batch} requests ({} rows) in {:.2} s",
            rows.len(),
            started.elapsed().as_secs_f64()
        );
        let mut grids = grids.into_iter();
        let sampled: Vec<Sampled> = round
            .iter()
            .map(|job| Sampled {
                prompt: &job.prompt,
                config: &job.config,
                tokens: grids.by_ref().take(job.config.samples).collect(),
            })
            .collect();
        let finishing = Instant::now();
        let finished = catch_unwind(AssertUnwindSafe(|| {
            let finished = generator.finish(&sampled)?;
            let enlarged = enlarge_kept(&generator, &round, &finished)?;
            Ok::<_, Error>((finished, enlarged))
        }));
        shared.metrics.round_ended(started.elapsed().as_secs_f64());
        match finished {
            Ok(Ok((finished, enlarged))) => {
                info!(
                    "decoded and reranked {batch} requests in {:.2} s",
                    finishing.elapsed().as_secs_f64()
                );
                for ((job, images), enlarged) in round.into_iter().zip(finished).zip(enlarged) {
                    let _ = job.reply.send(Ok(Generated {
                        images,
                        enlarged,
                        batch,
                    }));
                }
            }
            failed => {
                let message = match failed {
                    Ok(Err(e)) => format!("decoding failed: {e}"),
                    _ => "decoding panicked (see the server log)".to_string(),
                };
                warn!("{message}");
                for job in round {
                    let _ = job.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

/// The kept pictures of the round's requests that asked for it, enlarged in one call; per
/// request in round order, `None` for those that did not ask.
fn enlarge_kept(
    generator: &Generator,
    round: &[Job],
    finished: &[PromptImages],
) -> Result<Vec<Option<Vec<Vec<f32>>>>, Error> {
    let wanted: Vec<Vec<f32>> = round
        .iter()
        .zip(finished)
        .filter(|(job, _)| job.upscale)
        .flat_map(|(_, images)| images.kept.iter().map(|&i| images.images[i].clone()))
        .collect();
    if wanted.is_empty() {
        return Ok(vec![None; round.len()]);
    }
    let mut enlarged = generator.upscale(&wanted)?.into_iter();
    Ok(round
        .iter()
        .zip(finished)
        .map(|(job, images)| {
            job.upscale
                .then(|| enlarged.by_ref().take(images.kept.len()).collect())
        })
        .collect())
}

#[derive(Clone)]
struct App {
    worker: WorkerHandle,
    config: Arc<ServeConfig>,
}

/// The `{"error": ...}` answer.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The routes, answering with `worker`.
pub fn router(worker: WorkerHandle, config: ServeConfig) -> Router {
    let app = App {
        worker,
        config: Arc::new(config),
    };
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/model", get(model))
        .route(
            "/v1/generate",
            post(generate)
                .route_layer(middleware::from_fn_with_state(app.clone(), body_within))
                // Outside `body_within`, so its 408 and 413 are counted too.
                .route_layer(middleware::from_fn_with_state(app.clone(), count_answer)),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(app)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn healthz(State(app): State<App>) -> Json<serde_json::Value> {
    let stats = app.worker.stats();
    Json(json!({
        "status": "ok",
        "rounds": stats.rounds,
        "requests": stats.requests,
        "queued": stats.queued,
        "rejected": stats.rejected,
        "max_batch": app.config.max_batch,
        "max_rows": app.worker.shared.max_rows,
        "queue": app.config.queue,
        "image_size": app.worker.image_size(),
        "max_prompt_chars": app.config.max_prompt_chars,
        "text_tokens": app.worker.shared.text_tokens,
    }))
}

async fn metrics(State(app): State<App>) -> Response {
    let queued = app.worker.stats().queued;
    match app.worker.shared.metrics.encode(queued) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Counts a `/v1/generate` answer by its status, with its latency; a request whose connection
/// closed first (the handler dropped unfinished) as [`metrics::CLOSED_BEFORE_ANSWER`].
async fn count_answer(State(app): State<App>, request: Request, next: Next) -> Response {
    let mut answer = Answer {
        shared: Arc::clone(&app.worker.shared),
        arrived: Instant::now(),
        code: metrics::CLOSED_BEFORE_ANSWER,
    };
    let response = next.run(request).await;
    answer.code = response.status().as_u16();
    response
}

/// A `/v1/generate` request being answered, counted when dropped: with its answer's status, or
/// unanswered.
struct Answer {
    shared: Arc<Shared>,
    arrived: Instant,
    code: u16,
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.shared
            .metrics
            .answered(self.code, self.arrived.elapsed().as_secs_f64());
    }
}

async fn model(State(app): State<App>) -> Json<serde_json::Value> {
    let mut model = app.worker.shared.model.clone();
    model["sampling"] = json!(app.config.sampling.settings);
    model["sampling_from"] = json!(app.config.sampling.source);
    model["image_size"] = json!(app.worker.image_size());
    model["upscaled_size"] = json!(app.worker.upscaled_size());
    model["max_samples"] = json!(MAX_SAMPLES);
    Json(model)
}

async fn generate(
    State(app): State<App>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let sampling = match request.sampling(&app.config) {
        Ok(sampling) => sampling,
        Err(message) => return error(StatusCode::UNPROCESSABLE_ENTITY, message),
    };
    if let Err(e) = top_k_fits(sampling.top_k, app.worker.shared.codebook_size) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    }
    let upscale = match request.upscale(app.worker.upscaled_size()) {
        Ok(upscale) => upscale,
        Err(message) => return error(StatusCode::UNPROCESSABLE_ENTITY, message),
    };
    let waiting = match app
        .worker
        .submit(request.prompt.clone(), sampling.clone(), upscale)
    {
        Ok(waiting) => waiting,
        Err(Refused::Full) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the queue is full ({} requests waiting); try again later",
                    app.config.queue
                ),
            );
        }
        Err(Refused::Closed) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            );
        }
    };
    let generated = match tokio::time::timeout(app.config.timeout, waiting).await {
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no images within {:.1} s; the server is busy",
                    app.config.timeout.as_secs_f64()
                ),
            );
        }
        Ok(Err(_)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            );
        }
        Ok(Ok(Err(message))) => return error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Ok(Ok(Ok(generated))) => generated,
    };
    let size = match (&generated.enlarged, app.worker.upscaled_size()) {
        (Some(_), Some(upscaled)) => upscaled,
        _ => app.worker.image_size(),
    };
    let format = request.format;
    let batch = generated.batch;
    let encoded = tokio::task::spawn_blocking(move || encode(&generated, size, format)).await;
    let pngs = match encoded {
        Ok(Ok(pngs)) => pngs,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match format {
        Format::Png => {
            let (best, _, _) = pngs.into_iter().next().unwrap_or_default();
            ([(header::CONTENT_TYPE, "image/png")], best).into_response()
        }
        Format::Base64 => {
            let images: Vec<_> = pngs
                .iter()
                .map(|(bytes, score, sample)| {
                    json!({"png_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
                        "score": score, "sample": sample})
                })
                .collect();
            Json(json!({
                "prompt": request.prompt,
                "images": images,
                "image_size": size,
                "upscaled": upscale,
                "seed": sampling.seed,
                "sampling": sampling,
                "batch": batch,
                "seconds": started.elapsed().as_secs_f64(),
            }))
            .into_response()
        }
    }
}

/// One image's PNG, its reranking score and its sample index.
type Encoded = (Vec<u8>, Option<f64>, usize);

/// PNGs of the kept images (only the best for [`Format::Png`]) with their scores.
fn encode(generated: &Generated, size: usize, format: Format) -> Result<Vec<Encoded>, Error> {
    let result = &generated.images;
    let wanted = if format == Format::Png { 1 } else { usize::MAX };
    result
        .kept
        .iter()
        .take(wanted)
        .enumerate()
        .map(|(rank, &i)| {
            let pixels = match &generated.enlarged {
                Some(enlarged) => enlarged
                    .get(rank)
                    .ok_or_else(|| Error::Data("fewer enlarged pictures than kept ones".into()))?,
                None => &result.images[i],
            };
            Ok((png(pixels, size)?, result.scores.as_ref().map(|s| s[i]), i))
        })
        .collect()
}

/// How [`serve`] treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers (its body's is [`body_within`]'s).
    pub read_timeout: Duration,
    /// Time the connections open at the shutdown signal get to finish.
    pub grace: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl ServeConfig {
    /// This config's limits for [`serve`]: the requests in progress when the shutdown signal
    /// comes get as long to finish as any request may take.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            read_timeout: self.read_timeout,
            grace: self.timeout,
            max_connections: self.max_connections,
        }
    }
}

/// Serves `router` on `listener` (HTTP/1) until `shutdown` completes, then lets the requests in
/// progress finish within `limits.grace` before closing their connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A place first: at the limit, clients wait in the listen queue, not in memory.
        let place = tokio::select! {
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait for connections to close rather than
                    // spin on the error.
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection =
            connections.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("connection ended: {e}");
            }
            drop(place);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, connections.shutdown())
        .await
        .is_err()
    {
        warn!(
            "connections still open {:.1} s after the shutdown signal are closed",
            limits.grace.as_secs_f64()
        );
    }
    Ok(())
}

/// Reads a request's body before its handler runs: at most [`MAX_BODY_BYTES`] (413 beyond),
/// within the server's `read_timeout` (408 after). Without this, a client that announces a
/// body and sends it a byte at a time would hold its connection, and the shutdown, for ever.
async fn body_within(State(app): State<App>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(
        app.config.read_timeout,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    )
    .await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {MAX_BODY_BYTES} bytes"),
                );
            }
            // The connection broke mid-body: nobody reads this answer, but the metrics count it.
            let closed = StatusCode::from_u16(metrics::CLOSED_BEFORE_ANSWER)
                .unwrap_or(StatusCode::BAD_REQUEST);
            return error(closed, format!("the request body was cut off: {e}"));
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {:.1} s",
                    app.config.read_timeout.as_secs_f64()
                ),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    info!("shutting down: finishing the requests in progress");
}

#[cfg(test)]
mod tests {
    use super::round_size;

    #[test]
    fn a_round_stops_at_its_request_or_row_limit_and_always_takes_one_request() {
        // Rows per waiting request, oldest first.
        let waiting = [4, 8, 32, 2, 2];
        let size = |max_batch, max_rows| round_size(waiting.iter().copied(), max_batch, max_rows);
        assert_eq!(size(64, 512), 5, "everything fits");
        assert_eq!(size(2, 512), 2, "the request limit");
        assert_eq!(size(64, 12), 2, "4 + 8 rows; the next 32 would pass 12");
        assert_eq!(size(64, 44), 3, "exactly at the row limit");
        assert_eq!(
            size(64, 3),
            1,
            "a request over the row limit still runs, alone"
        );
        assert_eq!(round_size([32, 2].into_iter(), 64, 16), 1);
        assert_eq!(round_size(std::iter::empty(), 64, 16), 0);
    }
}
