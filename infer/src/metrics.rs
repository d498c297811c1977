//! `GET /metrics` of `infer serve`: what the server has done since it started, in the
//! OpenMetrics text format that Prometheus scrapes.
//!
//! The counters behind `/healthz` live here too, so the two never disagree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
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

/// Histograms of seconds: buckets doubling from a millisecond up to the first past `top`.
#[derive(Clone, Debug)]
struct LatencyBuckets {
    top: f64,
}

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        let doublings = (self.top / 0.001).max(1.0).log2().ceil() as u16;
        Histogram::new(exponential_buckets(0.001, 2.0, doublings.clamp(1, 40) + 1))
    }
}

/// The HTTP status a `/v1/generate` request is counted under when its connection closed before
/// its answer (the client left, or the shutdown's grace ran out): nginx's "client closed
/// request".
pub const CLOSED_BEFORE_ANSWER: u16 = 499;

/// The statuses `/v1/generate` answers with, counted from the start so that the first of each
/// after a restart shows in a rate.
const STATUSES: [u16; 10] = [
    200,
    400,
    408,
    413,
    415,
    422,
    CLOSED_BEFORE_ANSWER,
    500,
    503,
    504,
];

/// What the server has done since it started: the counters of `/healthz` and `/metrics`.
pub struct Metrics {
    registry: Registry,
    rounds: Counter,
    sampled_requests: Counter,
    queue_rejected: Counter,
    sampled_pictures: Counter,
    answers: Family<Status, Counter>,
    answer_seconds: Family<Status, Histogram, LatencyBuckets>,
    queue_wait_seconds: Histogram,
    round_seconds: Histogram,
    round_requests: Histogram,
    round_rows: Histogram,
    queue_depth: Gauge,
}

impl Metrics {
    /// Metrics of a server of `model_name` on `backend` whose requests time out after
    /// `timeout` (the top of its latency histograms).
    pub fn new(model_name: &str, backend: &str, timeout: std::time::Duration) -> Metrics {
        let buckets = LatencyBuckets {
            top: timeout.as_secs_f64(),
        };
        let metrics = Metrics {
            registry: Registry::with_prefix("parti"),
            rounds: Counter::default(),
            sampled_requests: Counter::default(),
            queue_rejected: Counter::default(),
            sampled_pictures: Counter::default(),
            answers: Family::default(),
            answer_seconds: Family::new_with_constructor(buckets.clone()),
            queue_wait_seconds: buckets.new_metric(),
            round_seconds: buckets.new_metric(),
            round_requests: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            round_rows: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            queue_depth: Gauge::default(),
        };
        for code in STATUSES {
            let status = Status { code };
            let _ = metrics.answers.get_or_create(&status);
            let _ = metrics.answer_seconds.get_or_create(&status);
        }
        metrics.registered(model_name, backend)
    }

    /// Sampling rounds started.
    pub fn rounds(&self) -> u64 {
        self.rounds.get()
    }

    /// Requests taken into a round (answered or not).
    pub fn sampled_requests(&self) -> u64 {
        self.sampled_requests.get()
    }

    /// Requests refused because the queue was full.
    pub fn queue_rejected(&self) -> u64 {
        self.queue_rejected.get()
    }

    /// A request refused because the queue was full.
    pub fn rejected(&self) {
        self.queue_rejected.inc();
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
            "Time from a POST /v1/generate request's headers to its answer (its body's arrival included), by HTTP status",
            Unit::Seconds,
            self.answer_seconds.clone(),
        );
        registry.register_with_unit(
            "queue_wait",
            "Time a request waited in the queue before its round started",
            Unit::Seconds,
            self.queue_wait_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting in the queue",
            self.queue_depth.clone(),
        );
        registry.register(
            "queue_rejected",
            "Requests refused because the queue was full",
            self.queue_rejected.clone(),
        );
        registry.register("rounds", "Sampling rounds started", self.rounds.clone());
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
            "Requests taken into a sampling round, answered or not",
            self.sampled_requests.clone(),
        );
        registry.register(
            "sampled_pictures",
            "Pictures sampled, before reranking keeps some",
            self.sampled_pictures.clone(),
        );
        self
    }

    /// A `/v1/generate` answer with HTTP status `code`, `seconds` after the request's headers
    /// were read.
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
            self.queue_wait_seconds.observe(wait);
            requests += 1;
        }
        self.rounds.inc();
        self.sampled_requests.inc_by(requests);
        self.round_requests.observe(requests as f64);
        self.round_rows.observe(rows as f64);
    }

    /// A round sampled `pictures`.
    pub fn sampled(&self, pictures: usize) {
        self.sampled_pictures.inc_by(pictures as u64);
    }

    /// A round ended (well or not) `seconds` after it started.
    pub fn round_ended(&self, seconds: f64) {
        self.round_seconds.observe(seconds);
    }

    /// Everything in the text format, with `queued` requests waiting now.
    pub fn encode(&self, queued: usize) -> Result<String, std::fmt::Error> {
        self.queue_depth
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
