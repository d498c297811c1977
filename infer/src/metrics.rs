//! `GET /metrics` of `infer serve`: what the server has done since it started, in the
//! OpenMetrics text format that Prometheus scrapes.
//!
//! The counters behind `/healthz` live here too, so the two never disagree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// The media type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `/v1/generate` answer's HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    code: u16,
}

/// The model a server holds, as an info metric (its value is always 1).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    name: String,
    backend: String,
}

/// Latencies from a millisecond to about 2 minutes (the default request timeout is 120 s).
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    /// Sampling rounds run.
    pub rounds: Counter,
    /// Requests sampled in a round (answered or not).
    pub requests: Counter,
    /// Requests refused because the queue was full.
    pub rejected: Counter,
    /// Pictures sampled (before reranking keeps some).
    samples: Counter,
    answers: Family<Status, Counter>,
    answer_seconds: Family<Status, Histogram, fn() -> Histogram>,
    queue_seconds: Histogram,
    round_seconds: Histogram,
    round_requests: Histogram,
    round_rows: Histogram,
    queued: Gauge,
}

impl Metrics {
    pub fn new(model_name: &str, backend: &str) -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("parti"),
            rounds: Counter::default(),
            requests: Counter::default(),
            rejected: Counter::default(),
            samples: Counter::default(),
            answers: Family::default(),
            answer_seconds: Family::new_with_constructor(seconds),
            queue_seconds: seconds(),
            round_seconds: seconds(),
            round_requests: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            round_rows: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            queued: Gauge::default(),
        };
        metrics.registered(model_name, backend)
    }

    /// `self` with every metric in its registry (the registry holds handles to the same values).
    fn registered(mut self, model_name: &str, backend: &str) -> Metrics {
        let registry = &mut self.registry;
        registry.register(
            "model",
            "The model served",
            Info::new(Model {
                name: model_name.to_string(),
                backend: backend.to_string(),
            }),
        );
        registry.register(
            "generate_requests",
            "Answers to POST /v1/generate by HTTP status",
            self.answers.clone(),
        );
        registry.register_with_unit(
            "generate_request_duration",
            "Time from a POST /v1/generate request's arrival to its answer, by HTTP status",
            Unit::Seconds,
            self.answer_seconds.clone(),
        );
        registry.register_with_unit(
            "queue_wait",
            "Time a request waited in the queue before its round started",
            Unit::Seconds,
            self.queue_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting in the queue",
            self.queued.clone(),
        );
        registry.register(
            "queue_rejected",
            "Requests refused because the queue was full",
            self.rejected.clone(),
        );
        registry.register("rounds", "Sampling rounds run", self.rounds.clone());
        registry.register_with_unit(
            "round_duration",
            "Time a round took: sampling, decoding, reranking and enlarging",
            Unit::Seconds,
            self.round_seconds.clone(),
        );
        registry.register(
            "round_requests",
            "Requests sampled together in a round",
            self.round_requests.clone(),
        );
        registry.register(
            "round_rows",
            "Decoder rows of a round (a picture is one row, two with guidance; --max-rows bounds them)",
            self.round_rows.clone(),
        );
        registry.register(
            "sampled_requests",
            "Requests sampled in a round, answered or not",
            self.requests.clone(),
        );
        registry.register(
            "samples",
            "Pictures sampled, before reranking keeps some",
            self.samples.clone(),
        );
        self
    }

    /// A `/v1/generate` answer with HTTP status `code`, `seconds` after its body arrived.
    pub fn answered(&self, code: u16, seconds: f64) {
        let status = Status { code };
        self.answers.get_or_create(&status).inc();
        self.answer_seconds.get_or_create(&status).observe(seconds);
    }

    /// A round of `rows` decoder rows starts, with requests that waited `waits` seconds in the
    /// queue.
    pub fn round_started(&self, waits: impl Iterator<Item = f64>, rows: usize) {
        let mut requests = 0;
        for wait in waits {
            self.queue_seconds.observe(wait);
            requests += 1;
        }
        self.rounds.inc();
        self.requests.inc_by(requests);
        self.round_requests.observe(requests as f64);
        self.round_rows.observe(rows as f64);
    }

    /// A round sampled `pictures`.
    pub fn sampled(&self, pictures: usize) {
        self.samples.inc_by(pictures as u64);
    }

    /// A round ended (well or not) `seconds` after it started.
    pub fn round_ended(&self, seconds: f64) {
        self.round_seconds.observe(seconds);
    }

    /// Everything in the text format, with `queued` requests waiting now.
    pub fn encode(&self, queued: usize) -> Result<String, std::fmt::Error> {
        self.queued.set(i64::try_from(queued).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
