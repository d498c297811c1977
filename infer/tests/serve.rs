//! `infer serve` in process on a small trained model: health, metrics, model and page, PNGs
//! back, JSON errors for bad requests, concurrent requests with mixed settings batched into
//! shared sampling rounds (a request's images the same alone and in the crowd), 64 clients at
//! once all answered, 503 on a full queue, 504 past the timeout, and the page generating in a
//! headless browser.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::future::join_all;
use infer::sample::{Generator, SamplingSettings};
use infer::serve::{ServeConfig, WorkerHandle, router, serve, spawn_worker};
use serde_json::{Value, json};
use tokio::sync::oneshot;

mod common;

/// A few-step pipeline up to `train parti`; returns the parti manifest's directory.
fn trained() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::trained(false).join("parti"))
}

/// A 2-step super-resolution model (64 -> 256 px) on the trained model's tokenizer.
fn superres() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::superres(trained().parent().unwrap()))
}

/// A server on a free local port, stopped when dropped.
struct Server {
    url: String,
    worker: WorkerHandle,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server with the defaults `infer serve` has, sampling with the model's own settings.
async fn start_default() -> Server {
    start(ServeConfig::new).await
}

/// A server whose config is made from the model's recommended sampling settings.
async fn start(config: impl FnOnce(SamplingSettings) -> ServeConfig) -> Server {
    start_with_upscaler(None, config).await
}

/// [`start`], enlarging with the super-resolution model of `upscale` (a manifest folder).
async fn start_with_upscaler(
    upscale: Option<PathBuf>,
    config: impl FnOnce(SamplingSettings) -> ServeConfig,
) -> Server {
    let generator = tokio::task::spawn_blocking(move || {
        let parti = trained().to_str().unwrap().to_string();
        let generator = Generator::load(&parti, None, None, "cpu").unwrap();
        match upscale {
            Some(superres) => generator.with_upscaler(superres.to_str().unwrap()).unwrap(),
            None => generator,
        }
    })
    .await
    .unwrap();
    let config = config(generator.recommended.clone());
    let worker = spawn_worker(generator, &config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let limits = config.connection_limits();
    let served = tokio::spawn(serve(
        listener,
        router(worker.clone(), config),
        async {
            let _ = stopped.await;
        },
        limits,
    ));
    Server {
        url,
        worker,
        stop: Some(stop),
        served: Some(served),
        client: reqwest::Client::new(),
    }
}

/// A response: status, content type and body.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `{"error": ...}` message of a refusal.
    fn error(&self) -> String {
        let message = self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !message.is_empty(),
            "no error message (HTTP {})",
            self.status
        );
        message
    }
}

impl Server {
    /// A raw connection that has sent `start` of a request and sends nothing more.
    async fn stalled(&self, start: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let address = self.url.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(start.as_bytes()).await.unwrap();
        stream
    }

    async fn answer(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = response.bytes().await.unwrap().to_vec();
        Answer {
            status,
            content_type,
            body,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.answer(self.client.get(format!("{}{path}", self.url)))
            .await
    }

    async fn post_raw(&self, body: &str, content_type: Option<&str>) -> Answer {
        let mut request = self
            .client
            .post(format!("{}/v1/generate", self.url))
            .body(body.to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        self.answer(request).await
    }

    async fn generate(&self, body: Value) -> Answer {
        self.post_raw(&body.to_string(), Some("application/json"))
            .await
    }

    async fn health(&self) -> Value {
        let answer = self.get("/healthz").await;
        assert_eq!(answer.status, 200);
        answer.json()
    }
}

fn decode_png(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap()
}

fn decode_base64_png(text: &str) -> image::DynamicImage {
    decode_png(
        &base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_page_are_served() {
    let server = start_default().await;
    let health = server.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(
        (health["rounds"].as_u64(), health["requests"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(health["image_size"], 64);
    assert_eq!(
        (health["max_batch"].as_u64(), health["queue"].as_u64()),
        (Some(64), Some(256))
    );
    // The model says what it is and what it samples with: the tiny preset's recommendation.
    let model = server.get("/v1/model").await;
    assert_eq!(model.status, 200);
    let model = model.json();
    assert_eq!(model["name"], "tiny");
    let parti = &model["manifests"][0];
    assert!(
        parti["uri"]
            .as_str()
            .unwrap()
            .ends_with("parti/manifest.json")
    );
    let digest = parti["digest"].as_str().unwrap();
    assert_eq!(
        digest.strip_prefix("blake3:").map(str::len),
        Some(64),
        "{digest}"
    );
    assert_eq!(
        (
            model["sampling"]["temperature"].as_f64(),
            model["sampling"]["guidance_scale"].as_f64(),
            model["sampling"]["samples"].as_u64(),
        ),
        (Some(0.1), Some(1.1), Some(4))
    );
    assert!(
        model["sampling_from"]
            .as_str()
            .unwrap()
            .starts_with("train.parti recommendation"),
        "{}",
        model["sampling_from"]
    );
    let page = server.get("/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains(r#"<textarea id="prompt""#));
    assert!(html.contains(r#"id="generate""#) && html.contains("/v1/generate"));
    let missing = server.get("/nowhere").await;
    assert_eq!(missing.status, 404);
    missing.error();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_returns_decodable_pngs() {
    let server = start_default().await;
    let request =
        json!({"prompt": "a red circle at the top left", "samples": 2, "keep": 2, "seed": 7});
    let answer = server.generate(request.clone()).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(answer.content_type.starts_with("application/json"));
    let body = answer.json();
    assert_eq!(body["prompt"], "a red circle at the top left");
    assert_eq!(
        (body["seed"].as_u64(), body["batch"].as_u64()),
        (Some(7), Some(1))
    );
    assert!(body["seconds"].as_f64().unwrap() > 0.0);
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for image in images {
        let picture = decode_base64_png(image["png_base64"].as_str().unwrap());
        assert_eq!((picture.width(), picture.height()), (64, 64));
        assert!(image["score"].is_null(), "no text encoder, no scores");
    }
    // Alone in its round, the same request gives the same pictures.
    let again = server.generate(request).await.json();
    assert_eq!(again["images"], body["images"]);

    let raw = server
        .generate(json!({"prompt": "a blue square in the center", "format": "png"}))
        .await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.content_type, "image/png");
    let picture = decode_png(&raw.body);
    assert_eq!((picture.width(), picture.height()), (64, 64));
    let health = server.health().await;
    assert_eq!(
        (health["rounds"].as_u64(), health["requests"].as_u64()),
        (Some(3), Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_the_server_lives_on() {
    let server = start_default().await;
    let long = "a".repeat(501);
    let invalid = [
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "   "}), "prompt"),
        (json!({"prompt": long}), "500"),
        (json!({"prompt": "a red circle", "samples": 0}), "samples"),
        (json!({"prompt": "a red circle", "samples": 17}), "samples"),
        (
            json!({"prompt": "a red circle", "samples": 2, "keep": 3}),
            "keep",
        ),
        (
            json!({"prompt": "a red circle", "temperature": 0.0}),
            "temperature",
        ),
        (
            json!({"prompt": "a red circle", "guidance_scale": 50.0}),
            "guidance_scale",
        ),
        (json!({"prompt": "a red circle", "top_p": 1.5}), "top_p"),
        // Rounds to 0 in f32, where the sampler divides by it.
        (
            json!({"prompt": "a red circle", "temperature": 1e-50}),
            "temperature",
        ),
        (
            json!({"prompt": "a red circle", "top_k": 1_000_000_000}),
            "top_k",
        ),
        (
            json!({"prompt": "a red circle", "samples": "two"}),
            "samples",
        ),
        (json!({"prompt": "a red circle", "format": "gif"}), "format"),
        (json!({"prompt": "a red circle", "steps": 3}), "steps"),
        (json!({"samples": 1}), "prompt"),
        (json!(["a red circle"]), "GenerateRequest"),
    ];
    for (body, mentions) in invalid {
        let answer = server.generate(body.clone()).await;
        assert!(
            (400..500).contains(&answer.status),
            "{body}: HTTP {}",
            answer.status
        );
        let message = answer.error();
        assert!(
            message.contains(mentions),
            "{body}: {message:?} does not mention {mentions}"
        );
    }
    for malformed in [r#"{"prompt": "#, "", "not json", "{\"prompt\": \"\\x\"}"] {
        let answer = server.post_raw(malformed, Some("application/json")).await;
        assert_eq!(answer.status, 400, "{malformed:?}");
        assert!(
            answer.error().to_lowercase().contains("json"),
            "{malformed:?}"
        );
    }
    let untyped = server.post_raw(r#"{"prompt": "a red circle"}"#, None).await;
    assert_eq!(untyped.status, 415);
    assert!(untyped.error().contains("application/json"));
    let wrong_method = server.get("/v1/generate").await;
    assert_eq!(wrong_method.status, 405);

    let health = server.health().await;
    assert_eq!(health["requests"], 0, "nothing invalid reached the sampler");
    let fine = server
        .generate(json!({"prompt": "a green triangle", "samples": 1}))
        .await;
    assert_eq!(fine.status, 200);
}

/// The kept images of a 200 answer, as base64 PNGs.
fn images_of(answer: &Answer) -> Vec<Value> {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["images"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_mixed_settings_share_rounds_and_keep_their_images() {
    let server = start(|sampling| ServeConfig {
        batch_wait: Duration::from_millis(500),
        batch_wait_limit: Duration::from_millis(500),
        ..ServeConfig::new(sampling)
    })
    .await;
    // Warm, hot and guided, greedy-ish and nucleus: all in one batched decode.
    let mine = json!({"prompt": "a red circle at the top left", "seed": 11, "samples": 3,
        "keep": 3, "temperature": 1.0, "top_k": 50});
    let others = [
        json!({"prompt": "a blue square in the center", "seed": 1}),
        json!({"prompt": "a green triangle at the bottom right", "seed": 2, "temperature": 2.0,
            "guidance_scale": 1.0}),
        json!({"prompt": "a yellow circle at the top right", "seed": 3, "top_p": 0.5,
            "samples": 2}),
        json!({"prompt": "a purple square", "seed": 4, "guidance_scale": 3.0, "top_k": 5}),
        json!({"prompt": "a red circle at the top left", "seed": 12, "samples": 3, "keep": 3,
            "temperature": 1.0, "top_k": 50}),
    ];
    let alone = server.generate(mine.clone()).await;
    assert_eq!(alone.json()["batch"], 1);
    let alone = images_of(&alone);
    assert_eq!(alone.len(), 3);

    let crowd: Vec<_> = others
        .iter()
        .cloned()
        .chain([mine.clone()])
        .map(|body| server.generate(body))
        .collect();
    let crowd = join_all(crowd).await;
    for answer in &crowd {
        assert!(
            answer.json()["batch"].as_u64().unwrap() >= 2,
            "sampled alone: {}",
            answer.json()["prompt"]
        );
        let picture = decode_base64_png(images_of(answer)[0]["png_base64"].as_str().unwrap());
        assert_eq!(picture.width(), 64);
    }
    assert_eq!(
        images_of(&crowd[5]),
        alone,
        "the same request gave other images inside a batch of mixed settings"
    );
    assert_ne!(
        images_of(&crowd[4]),
        alone,
        "another seed, the same images: the seed is not the request's own"
    );
    let health = server.health().await;
    let (rounds, requests) = (
        health["rounds"].as_u64().unwrap(),
        health["requests"].as_u64().unwrap(),
    );
    assert_eq!(requests, 7);
    assert!(
        rounds < requests,
        "{rounds} rounds for {requests} requests: nothing was batched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_with_their_own_seeds_are_all_answered() {
    let server = start_default().await;
    let clients: Vec<_> = (0..64u64)
        .map(|seed| {
            server.generate(json!({"prompt": format!("a red circle number {seed}"), "seed": seed}))
        })
        .collect();
    let answers = join_all(clients).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(
        statuses.iter().all(|&status| status == 200),
        "not 64 x 200: {statuses:?}"
    );
    let health = server.health().await;
    assert_eq!(health["requests"], 64);
    assert_eq!(health["rejected"], 0);
    assert!(
        health["rounds"].as_u64().unwrap() < 64,
        "{} rounds: distinct seeds were not batched",
        health["rounds"]
    );
}

/// Requests that trickle in, each well within `batch_wait` of the one before but together over
/// more than `batch_wait`, still share one round: the worker waits for a quiet gap, not a fixed
/// time after the first. With a `batch_wait_limit` shorter than the trickle, the first round
/// starts without the last ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_in_a_trickle_share_a_round_up_to_the_wait_limit() {
    async fn trickle(server: &Server) -> Vec<u64> {
        // Spaced by 300 ms: each arrival restarts a 1 s wait (so a request may come 700 ms late
        // on a busy machine); the five span 1.2 s.
        let sent = (0..5u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(300 * i)).await;
            server
                .generate(json!({"prompt": "a red circle", "seed": i}))
                .await
        });
        let mut batches = Vec::new();
        for answer in join_all(sent).await {
            assert_eq!(
                answer.status,
                200,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            batches.push(answer.json()["batch"].as_u64().unwrap());
        }
        batches
    }
    let patient = start(|sampling| ServeConfig {
        batch_wait: Duration::from_secs(1),
        batch_wait_limit: Duration::from_secs(30),
        ..ServeConfig::new(sampling)
    })
    .await;
    assert_eq!(trickle(&patient).await, vec![5; 5]);
    assert_eq!(patient.health().await["rounds"], 1);

    let limited = start(|sampling| ServeConfig {
        batch_wait: Duration::from_secs(1),
        batch_wait_limit: Duration::from_millis(300),
        ..ServeConfig::new(sampling)
    })
    .await;
    let batches = trickle(&limited).await;
    assert!(
        batches[0] < 5,
        "the limit did not cut the first round: {batches:?}"
    );
}

/// The value of the sample `series` (name and labels, as written) in a `/metrics` text.
fn metric(text: &str, series: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
        .collect();
    assert_eq!(values.len(), 1, "{series} once in:\n{text}");
    values[0]
}

/// `/metrics` counts what the server did, by kind: every answer of `/v1/generate` by status
/// (the refusals before the handler included) with its latency, rounds and their sizes, queue
/// waits and samples, in agreement with `/healthz` and with the answers the clients got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_answers_rounds_and_samples() {
    let server = start_default().await;
    let good = (1..=3).map(|samples| {
        server.generate(json!({
            "prompt": "a red circle", "samples": samples, "keep": 1, "guidance_scale": 1.5
        }))
    });
    let answers = join_all(good).await;
    for answer in &answers {
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let refusals = [
        server
            .generate(json!({"prompt": "a red circle", "temperature": 0.0}))
            .await,
        server
            .post_raw("{\"prompt\": ", Some("application/json"))
            .await,
        server
            .post_raw(&"x".repeat(100_000), Some("application/json"))
            .await,
    ];
    let codes: Vec<u16> = refusals.iter().map(|answer| answer.status).collect();
    assert_eq!(codes, [422, 400, 413]);

    let scraped = server.get("/metrics").await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        scraped.content_type
    );
    let text = String::from_utf8(scraped.body).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let health = server.health().await;
    let rounds = health["rounds"].as_f64().unwrap();
    assert!(rounds >= 1.0);
    for (series, value) in [
        ("parti_generate_requests_total{code=\"200\"}", 3.0),
        ("parti_generate_requests_total{code=\"422\"}", 1.0),
        ("parti_generate_requests_total{code=\"400\"}", 1.0),
        ("parti_generate_requests_total{code=\"413\"}", 1.0),
        (
            "parti_generate_request_duration_seconds_count{code=\"200\"}",
            3.0,
        ),
        (
            "parti_generate_request_duration_seconds_count{code=\"413\"}",
            1.0,
        ),
        ("parti_sampled_requests_total", 3.0),
        ("parti_sampled_pictures_total", 6.0),
        ("parti_generate_requests_total{code=\"504\"}", 0.0),
        ("parti_rounds_total", rounds),
        ("parti_round_requests_count", rounds),
        ("parti_round_requests_sum", 3.0),
        ("parti_round_duration_seconds_count", rounds),
        ("parti_queue_wait_seconds_count", 3.0),
        ("parti_queue_depth", 0.0),
        ("parti_queue_rejected_total", 0.0),
    ] {
        assert_eq!(metric(&text, series), value, "{series}");
    }
    assert_eq!(health["requests"], 3);
    // Six pictures with guidance: two decoder rows each.
    assert_eq!(metric(&text, "parti_round_rows_sum"), 12.0);
    // Each answer took at least its wait in the queue and its whole round, and every round had
    // one of them at least.
    let answered = metric(
        &text,
        "parti_generate_request_duration_seconds_sum{code=\"200\"}",
    );
    let waited = metric(&text, "parti_queue_wait_seconds_sum");
    let rounds_took = metric(&text, "parti_round_duration_seconds_sum");
    assert!(
        answered >= waited + rounds_took,
        "answers took {answered} s, waits {waited} s, rounds {rounds_took} s"
    );
    assert!(waited > 0.0 && rounds_took > 0.0);
    let model = server.get("/v1/model").await.json();
    let info = format!(
        "parti_model_info{{name=\"{}\",backend=\"{}\"}}",
        model["name"].as_str().unwrap(),
        model["backend"].as_str().unwrap()
    );
    assert_eq!(metric(&text, &info), 1.0);
}

/// A request whose client closes its connection before the answer is counted as 499 (and
/// not sampled: its place in the queue is given up), and so is one whose body is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_leaves_is_counted_as_closed() {
    // A long wait for more requests keeps this one queued while its client leaves.
    let server = start(|sampling| ServeConfig {
        batch_wait: Duration::from_secs(2),
        batch_wait_limit: Duration::from_secs(2),
        ..ServeConfig::new(sampling)
    })
    .await;
    let closed = "parti_generate_requests_total{code=\"499\"}";
    // Sends `start` of a request, hangs up, and waits (10 s at most) for the metrics to count
    // `count` closed requests.
    let hang_up = |start: String, count: f64| {
        let server = &server;
        async move {
            let stream = server.stalled(&start).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(stream);
            let mut text = String::new();
            for _ in 0..100 {
                text = String::from_utf8(server.get("/metrics").await.body).unwrap();
                if metric(&text, closed) == count {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(metric(&text, closed), count, "{text}");
            text
        }
    };
    let body = json!({"prompt": "a red circle"}).to_string();
    let text = hang_up(
        format!(
            "POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            "parti_generate_request_duration_seconds_count{code=\"499\"}"
        ),
        1.0
    );
    // Once the wait is over, nothing was sampled for it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let text = String::from_utf8(server.get("/metrics").await.body).unwrap();
    assert_eq!(metric(&text, "parti_sampled_requests_total"), 0.0, "{text}");

    // A body cut off mid-upload is a closed connection too, not a body over the limit.
    let text = hang_up(
        "POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{\"prompt\": "
            .to_string(),
        2.0,
    )
    .await;
    assert_eq!(
        metric(&text, "parti_generate_requests_total{code=\"413\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503() {
    let server = start(|sampling| ServeConfig {
        queue: 1,
        max_batch: 1,
        ..ServeConfig::new(sampling)
    })
    .await;
    let requests: Vec<_> = (0..8)
        .map(|i| server.generate(json!({"prompt": format!("a red circle number {i}")})))
        .collect();
    let answers = join_all(requests).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(ok + refused.len(), answers.len(), "only 200 or 503");
    assert!(
        ok >= 1 && !refused.is_empty(),
        "{ok} answered, {} refused",
        refused.len()
    );
    for answer in &refused {
        assert!(answer.error().contains("queue is full"));
    }
    let health = server.health().await;
    assert_eq!(health["rejected"].as_u64(), Some(refused.len() as u64));
    let text = String::from_utf8(server.get("/metrics").await.body).unwrap();
    for series in [
        "parti_queue_rejected_total",
        "parti_generate_requests_total{code=\"503\"}",
    ] {
        assert_eq!(metric(&text, series), refused.len() as f64, "{series}");
    }
    assert_eq!(health["requests"].as_u64(), Some(ok as u64));
    assert_eq!(health["rounds"], health["requests"], "max batch 1");
    let later = server.generate(json!({"prompt": "a blue square"})).await;
    assert_eq!(later.status, 200, "the queue drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_answers_504() {
    let server = start(|sampling| ServeConfig {
        timeout: Duration::from_millis(1),
        ..ServeConfig::new(sampling)
    })
    .await;
    let answer = server
        .generate(json!({"prompt": "a red circle", "samples": 4}))
        .await;
    assert_eq!(answer.status, 504);
    assert!(answer.error().contains("no images within"));
    assert_eq!(server.health().await["status"], "ok");
    // The worker outlives it and is stopped cleanly.
    server.worker.shutdown();
    let stopped = server.generate(json!({"prompt": "a red circle"})).await;
    assert_eq!(stopped.status, 503);
    assert!(stopped.error().contains("shutting down"));
}

/// What a stalled connection gets within `within`: its bytes (empty when the server closed it),
/// or `None` when it is still waiting.
async fn read_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

/// Clients that stall or send too much do not hold the server: a body over the limit gets 413,
/// a body that stops arriving 408 after the read timeout, headers that stop arriving a closed
/// connection; and a shutdown with such a client still connected ends within its grace time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_oversized_requests_are_cut_off_and_shutdown_is_bounded() {
    let server = start(|sampling| ServeConfig {
        read_timeout: Duration::from_millis(500),
        ..ServeConfig::new(sampling)
    })
    .await;
    let padding = "x".repeat(100_000);
    let oversized = server
        .post_raw(
            &json!({"prompt": "a red circle", "padding": padding}).to_string(),
            Some("application/json"),
        )
        .await;
    assert_eq!(oversized.status, 413);
    assert!(oversized.error().contains("bytes"));

    let mut slow_body = server
        .stalled(
            "POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{\"prompt\": ",
        )
        .await;
    let answer = read_within(&mut slow_body, Duration::from_secs(10))
        .await
        .expect("a body that stopped arriving held its connection");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive"), "{answer}");

    let mut slow_headers = server
        .stalled("POST /v1/generate HTTP/1.1\r\nHost: test\r\n")
        .await;
    read_within(&mut slow_headers, Duration::from_secs(10))
        .await
        .expect("headers that stopped arriving held their connection");
    assert_eq!(server.health().await["requests"], 0);

    // Patient with headers, so only the shutdown's grace (the request timeout, 2 s: time
    // enough for the one request below on a busy machine) can end the stalled connection.
    let mut server = start(|sampling| ServeConfig {
        read_timeout: Duration::from_secs(600),
        timeout: Duration::from_secs(2),
        ..ServeConfig::new(sampling)
    })
    .await;
    let _stalled = server
        .stalled("POST /v1/generate HTTP/1.1\r\nHost: test\r\n")
        .await;
    let fine = server
        .generate(json!({"prompt": "a green triangle", "samples": 1}))
        .await;
    assert_eq!(fine.status, 200);
    let served = server.served.take().unwrap();
    let _ = server.stop.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the shutdown waited on a stalled client")
        .unwrap()
        .unwrap();
}

/// At `max_connections`, a further client waits to be accepted (no task, no buffers) until a
/// connection closes, and is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_connection_limit_waits_for_a_place() {
    let server = start(|sampling| ServeConfig {
        max_connections: 1,
        read_timeout: Duration::from_secs(600),
        ..ServeConfig::new(sampling)
    })
    .await;
    let stalled = server
        .stalled("POST /v1/generate HTTP/1.1\r\nHost: test\r\n")
        .await;
    let waiting = server.generate(json!({"prompt": "a red circle"}));
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut waiting)
            .await
            .is_err(),
        "served past the connection limit"
    );
    drop(stalled);
    let answer = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("not served once the place was free");
    assert_eq!(answer.status, 200);
}

/// `chromium --dump-dom` of `url`, or `None` without a chromium.
fn browser_dom(url: &str) -> Option<String> {
    let browser = [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|path| Path::new(path).exists())?;
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("dom.html");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", dir.path().join("profile").display()),
            "--virtual-time-budget=60000",
            "--dump-dom",
            url,
        ])
        .stdout(std::fs::File::create(&dom).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(180) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{browser} did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(std::fs::read_to_string(&dom).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_generates_in_a_headless_browser() {
    let server = start_default().await;
    let url = format!(
        "{}/?prompt=a%20red%20circle&samples=2&seed=3&autorun=1",
        server.url
    );
    let Some(dom) = tokio::task::spawn_blocking(move || browser_dom(&url))
        .await
        .unwrap()
    else {
        let message = "no chromium at /usr/bin/chromium: the browser test did not run \
                       (apt-get install chromium)";
        assert!(
            std::env::var("PARTI_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "{message}"
        );
        eprintln!("SKIPPED: {message}");
        return;
    };
    let marker = r#"<img class="result""#;
    let images: Vec<&str> = dom
        .match_indices(marker)
        .map(|(at, _)| &dom[at..])
        .collect();
    assert_eq!(images.len(), 2, "no result images in the page:\n{dom}");
    for tag in images {
        let tag = &tag[..tag.find('>').unwrap()];
        let data = tag
            .split(r#"src="data:image/png;base64,"#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no PNG data in {tag}"));
        let picture = decode_base64_png(data);
        assert_eq!((picture.width(), picture.height()), (64, 64));
    }
    assert!(
        dom.contains("image(s) in") && dom.contains(" s, 64 px"),
        "the status line did not report success and the pictures' size"
    );
    // No super-resolution model on this server: its enlarge box stays hidden.
    assert!(dom.contains(r#"id="upscale-option" hidden"#), "{dom}");
    // A download link per image, the model's name and manifest digest, and where the
    // defaults came from.
    assert_eq!(dom.matches(r#"class="download""#).count(), 2, "{dom}");
    assert!(dom.contains(r#"download="parti-seed-3-sample-"#), "{dom}");
    let model = server.get("/v1/model").await.json();
    let digest = model["manifests"][0]["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("blake3:").unwrap();
    assert!(
        dom.contains("<code title=") && dom.contains(&format!(">{}</code>", &hex[..12])),
        "no manifest digest in the page:\n{dom}"
    );
    assert!(
        dom.contains("<strong>tiny</strong>"),
        "no model name:\n{dom}"
    );
    assert!(
        dom.contains("defaults: train.parti recommendation"),
        "{dom}"
    );
    assert_eq!(server.health().await["requests"], 1);
}

#[test]
fn requests_sample_with_the_servers_cache_choice() {
    // `infer serve --no-cache` recomputes every step for every request (a request cannot ask).
    let mut defaults = SamplingSettings {
        settings: infer::sample::SamplingConfig::default(),
        source: "test".into(),
    };
    let request: infer::serve::GenerateRequest =
        serde_json::from_value(json!({"prompt": "a red circle"})).unwrap();
    let cached = request
        .sampling(&ServeConfig::new(defaults.clone()))
        .unwrap();
    assert!(cached.use_cache);
    defaults.settings.use_cache = false;
    let uncached = request.sampling(&ServeConfig::new(defaults)).unwrap();
    assert!(!uncached.use_cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_super_resolution_model_enlarges_unless_asked_not_to() {
    let superres = tokio::task::spawn_blocking(superres).await.unwrap();
    // Rounds of two, started once two requests wait (a lone one after a quiet second), so two
    // requests sent together share a round however late one of them arrives.
    let server = start_with_upscaler(Some(superres.clone()), |sampling| ServeConfig {
        max_batch: 2,
        batch_wait: Duration::from_secs(1),
        batch_wait_limit: Duration::from_secs(30),
        ..ServeConfig::new(sampling)
    })
    .await;
    let model = server.get("/v1/model").await.json();
    assert_eq!(model["upscale"]["from"], 64, "{model}");
    assert_eq!(model["upscale"]["to"], 256, "{model}");
    assert_eq!(model["upscaled_size"], 256, "{model}");
    let manifests: Vec<&str> = model["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uri"].as_str().unwrap())
        .collect();
    assert!(
        manifests.iter().any(|uri| uri.contains("superres")),
        "{manifests:?}"
    );
    let side = |png_base64: &Value| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png_base64.as_str().unwrap())
            .unwrap();
        let picture = image::load_from_memory(&bytes).unwrap();
        (picture.width(), picture.height())
    };
    let prompt = "a red circle at the top left";
    // Enlarged by default on a server that can; two requests sampled in one round are
    // enlarged together, each picture its own.
    let prompts = [prompt, "a blue square at the bottom right"];
    let enlarged: Vec<Value> = join_all(
        prompts.map(|prompt| server.generate(json!({"prompt": prompt, "samples": 2, "keep": 2}))),
    )
    .await
    .iter()
    .map(|answer| {
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        answer.json()
    })
    .collect();
    for body in &enlarged {
        assert_eq!(body["upscaled"], true);
        assert_eq!(body["image_size"], 256);
        assert_eq!(body["batch"], 2, "both requests in one round");
        for image in body["images"].as_array().unwrap() {
            assert_eq!(side(&image["png_base64"]), (256, 256));
        }
    }
    // Asked not to: the tokenizer's size, the same pictures (a request's pictures do not depend
    // on its round).
    let small: Vec<Value> = join_all(prompts.map(|prompt| {
        server.generate(json!({"prompt": prompt, "samples": 2, "keep": 2, "upscale": false}))
    }))
    .await
    .iter()
    .map(Answer::json)
    .collect();
    assert_eq!(small[0]["upscaled"], false);
    assert_eq!(side(&small[0]["images"][0]["png_base64"]), (64, 64));
    // Each enlarged picture is its own sample enlarged: close to that sample's bicubic
    // enlargement (the model adds detail to bicubic, little after two steps), far from the
    // other prompt's.
    let bicubic = |png_base64: &Value| {
        decode_base64_png(png_base64.as_str().unwrap()).resize_exact(
            256,
            256,
            image::imageops::FilterType::CatmullRom,
        )
    };
    for (request, body) in enlarged.iter().enumerate() {
        let other = bicubic(&small[1 - request]["images"][0]["png_base64"]);
        for image in body["images"].as_array().unwrap() {
            let picture = decode_base64_png(image["png_base64"].as_str().unwrap());
            let own = small[request]["images"]
                .as_array()
                .unwrap()
                .iter()
                .find(|small| small["sample"] == image["sample"])
                .unwrap();
            let (own, unrelated) = (
                common::mean_abs_difference(&picture, &bicubic(&own["png_base64"])),
                common::mean_abs_difference(&picture, &other),
            );
            assert!(
                own < 0.02 && own * 4.0 < unrelated,
                "request {request}, sample {}: {own} from its own picture enlarged, {unrelated} \
                 from the other prompt's",
                image["sample"]
            );
        }
    }
    // The PNG answer is the best picture, enlarged.
    let png = server
        .generate(json!({"prompt": prompt, "samples": 1, "format": "png"}))
        .await;
    assert_eq!(png.content_type, "image/png");
    let picture = image::load_from_memory(&png.body).unwrap();
    assert_eq!((picture.width(), picture.height()), (256, 256));

    // A server without one refuses the request, saying how to start one that can.
    let plain = start_default().await;
    let refused = plain
        .generate(json!({"prompt": prompt, "upscale": true}))
        .await;
    assert_eq!(refused.status, 422);
    assert!(refused.error().contains("--upscale"), "{}", refused.error());
    assert!(plain.get("/v1/model").await.json()["upscale"].is_null());
}
