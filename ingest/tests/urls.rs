//! `ingest pairs` over URL lists, against an HTTP server on loopback that serves good images
//! and every fault a crawl meets: each failure is counted by reason, exactly, and nothing hangs
//! past the timeouts given on the command line.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A loopback HTTP/1.1 server, one thread per connection, counting requests per path and
/// `User-Agent` (so a rerun's requests are told from a killed run's late ones).
struct FaultServer {
    port: u16,
    requests: Arc<Mutex<HashMap<(String, String), usize>>>,
    /// Makes `/flaky500.jpg` answer with its image (a server that recovered).
    recovered: Arc<AtomicBool>,
    /// Called with each request's path before it is answered: a test's way to act at a known
    /// point of a run.
    on_request: RequestHook,
}

type RequestHook = Arc<Mutex<Option<Box<dyn FnMut(&str) + Send>>>>;

impl FaultServer {
    fn start() -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let recovered = Arc::new(AtomicBool::new(false));
        let on_request: RequestHook = Arc::new(Mutex::new(None));
        let (counts, flag, hook) = (requests.clone(), recovered.clone(), on_request.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (counts, flag, hook) = (counts.clone(), flag.clone(), hook.clone());
                std::thread::spawn(move || serve(stream, &counts, &flag, &hook));
            }
        });
        FaultServer {
            port,
            requests,
            recovered,
            on_request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests whose (User-Agent, path) pass `keep`.
    fn requests_where(&self, keep: impl Fn(&str, &str) -> bool) -> usize {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|((agent, path), _)| keep(agent, path))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests for `path`, from any client.
    /// `(url, caption)` rows: `good` numbered images, then one row per fault path.
    fn images_then_faults(&self, good: usize, faults: &[&str]) -> Vec<(String, String)> {
        let images =
            (0..good).map(|n| (self.url(&format!("/img/{n}.jpg")), format!("picture {n}")));
        let faults = faults
            .iter()
            .map(|fault| (self.url(fault), format!("fault {fault}")));
        images.chain(faults).collect()
    }

    fn count(&self, path: &str) -> usize {
        self.requests_where(|_, p| p == path)
    }

    /// Requests (for any path) sent with this `User-Agent`.
    fn total_from(&self, agent: &str) -> usize {
        self.requests_where(|a, _| a == agent)
    }

    fn count_from(&self, agent: &str, path: &str) -> usize {
        let key = (agent.to_string(), path.to_string());
        self.requests
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    fn reset(&self) {
        self.requests.lock().unwrap().clear();
    }
}

/// The picture behind `/img/N.jpg` and `/slow/N.jpg`: distinct bytes per N.
fn image_number(n: usize) -> Vec<u8> {
    jpeg(48 + (n % 7) as u32, 40, n as u8)
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(
    mut stream: TcpStream,
    counts: &Mutex<HashMap<(String, String), usize>>,
    recovered: &AtomicBool,
    on_request: &RequestHook,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut agent = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("user-agent")
                {
                    agent = value.trim().to_string();
                }
            }
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_string();
    let seen_before = {
        let mut counts = counts.lock().unwrap();
        let before: usize = counts
            .iter()
            .filter(|((_, p), _)| *p == path)
            .map(|(_, n)| n)
            .sum();
        *counts.entry((agent, path.clone())).or_default() += 1;
        before
    };
    if let Some(hook) = on_request.lock().unwrap().as_mut() {
        hook(&path);
    }
    let jpeg_type = [("Content-Type", "image/jpeg".to_string())];
    let numbered = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(".jpg"))
            .and_then(|n| n.parse::<usize>().ok())
    };
    if let Some(n) = numbered("/img/") {
        return respond(&mut stream, "200 OK", &jpeg_type, &image_number(n));
    }
    // Busy until the server recovers, then a distinct picture each.
    if let Some(n) = numbered("/flaky/") {
        return match recovered.load(Ordering::SeqCst) {
            true => respond(&mut stream, "200 OK", &jpeg_type, &image_number(100 + n)),
            false => respond(&mut stream, "503 Service Unavailable", &[], b"busy"),
        };
    }
    if let Some(n) = numbered("/slow/") {
        std::thread::sleep(Duration::from_millis(25));
        return respond(&mut stream, "200 OK", &jpeg_type, &image_number(n));
    }
    match path.as_str() {
        "/404.jpg" => respond(&mut stream, "404 Not Found", &[], b"gone"),
        "/500.jpg" => respond(&mut stream, "500 Internal Server Error", &[], b"oops"),
        "/flaky500.jpg" if recovered.load(Ordering::SeqCst) => {
            respond(&mut stream, "200 OK", &jpeg_type, &image_number(200))
        }
        "/flaky500.jpg" => respond(&mut stream, "503 Service Unavailable", &[], b"busy"),
        // Busy once, with a Retry-After the retry honours.
        "/429-once.jpg" if seen_before == 0 => respond(
            &mut stream,
            "429 Too Many Requests",
            &[("Retry-After", "1".into())],
            b"slow down",
        ),
        "/429-once.jpg" => respond(&mut stream, "200 OK", &jpeg_type, &image_number(201)),
        "/429.jpg" => respond(
            &mut stream,
            "429 Too Many Requests",
            &[("Retry-After", "0".into())],
            b"slow down",
        ),
        "/truncated.jpg" => {
            let body = image_number(202);
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = stream.write_all(&body[..body.len() / 2]);
        }
        "/html.jpg" => respond(
            &mut stream,
            "200 OK",
            &jpeg_type,
            b"<!doctype html><html><body>Not here</body></html>",
        ),
        // The header lies the other way: an image served as text is still an image.
        "/jpeg-as-text" => respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "text/plain".into())],
            &image_number(203),
        ),
        "/loop.jpg" => respond(
            &mut stream,
            "302 Found",
            &[("Location", "/loop.jpg".into())],
            b"",
        ),
        "/noai.jpg" => respond(
            &mut stream,
            "200 OK",
            &[
                ("Content-Type", "image/jpeg".into()),
                ("X-Robots-Tag", "noindex, noai".into()),
            ],
            &image_number(204),
        ),
        "/anim.gif" => respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "image/gif".into())],
            b"GIF89a\x01\0\x01\0\x80\0\0\xff\xff\xff\0\0\0,\0\0\0\0\x01\0\x01\0\0\x02\x02D\x01\0;",
        ),
        "/huge.jpg" => respond(&mut stream, "200 OK", &jpeg_type, &vec![0xFF; 200_000]),
        "/endless.jpg" => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n");
            let _ = stream.write_all(&[0xFF, 0xD8, 0xFF, 0xE0]);
            let block = vec![0u8; 16 * 1024];
            while stream.write_all(&block).is_ok() {}
        }
        // Headers, then a byte every 100 ms: only the per-request limit ends it.
        "/drip.jpg" => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n");
            let body = image_number(205);
            for byte in body {
                std::thread::sleep(Duration::from_millis(100));
                if stream.write_all(&[byte]).is_err() {
                    return;
                }
            }
        }
        // Reads the request and never answers (closes after the test is long done).
        "/never.jpg" => std::thread::sleep(Duration::from_secs(60)),
        _ => respond(&mut stream, "404 Not Found", &[], b""),
    }
}

/// Short limits, so every fault ends within seconds.
const FAST_LIMITS: [&str; 14] = [
    "--connect-timeout-ms",
    "1000",
    "--read-timeout-ms",
    "800",
    "--timeout-ms",
    "1500",
    "--retries",
    "1",
    "--retry-backoff-ms",
    "50",
    "--max-download-bytes",
    "100000",
    "--min-source-size",
    "8",
];

fn write_url_csv(path: &Path, urls: &[(String, String)]) {
    let mut csv = String::from("url,caption\n");
    for (url, caption) in urls {
        csv.push_str(&format!("{url},{caption}\n"));
    }
    std::fs::write(path, csv).unwrap();
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn every_fault_is_counted_by_reason_and_nothing_hangs() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let good = 12;
    let faults = [
        "/404.jpg",
        "/500.jpg",
        "/flaky500.jpg",
        "/429-once.jpg",
        "/429.jpg",
        "/truncated.jpg",
        "/html.jpg",
        "/jpeg-as-text",
        "/loop.jpg",
        "/noai.jpg",
        "/huge.jpg",
        "/endless.jpg",
        "/drip.jpg",
        "/never.jpg",
    ];
    let mut urls = server.images_then_faults(good, &faults);
    urls.push((
        format!("http://127.0.0.1:{}/refused.jpg", closed_port()),
        "nobody listens".into(),
    ));
    urls.push((
        "http://no-such-host.invalid/x.jpg".into(),
        "no such host".into(),
    ));
    // Same image from a second URL: a duplicate, as for local files.
    urls.push((server.url("/img/0.jpg?again"), "picture 0 again".into()));
    let list = dir.path().join("urls.csv");
    write_url_csv(&list, &urls);
    let out = dir.path().join("out");
    let args = |extra: &[&str]| {
        let mut args = pairs_args(&list, &out, &["--shard-rows", "8", "--size", "32"]);
        args.extend(FAST_LIMITS.iter().chain(extra).map(|s| s.to_string()));
        args
    };

    let started = Instant::now();
    let (code, text) = ingest_owned(&args(&[]));
    assert_eq!(code, 0, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "a fault held the run past its timeouts"
    );
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    // Good images, the 429 that succeeded after its Retry-After, and the image served as text.
    assert_eq!(rows.len(), good + 2);
    assert_eq!(
        rejected(&manifest),
        json!({
            "http_404": 1,
            "http_5xx": 2,
            "http_429": 1,
            "truncated": 1,
            "not_an_image": 1,
            "too_many_redirects": 1,
            "opted_out": 1,
            "too_large": 2,
            "timeout": 2,
            "connect_failed": 1,
            "dns": 1,
            "duplicate": 1,
        })
    );
    let total = manifest.metric_u64("rows").unwrap()
        + rejected(&manifest)
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>();
    assert_eq!(total as usize, urls.len(), "rows + rejected = rows read");
    let sources: Vec<&str> = rows.iter().map(|r| r.source.as_str()).collect();
    assert!(sources.contains(&server.url("/429-once.jpg").as_str()));
    assert!(sources.contains(&server.url("/jpeg-as-text").as_str()));
    let caption = rows.iter().find(|r| r.key == "000000003").unwrap();
    assert_eq!(caption.caption, "picture 3");
    // Transient failures were tried twice (--retries 1); the others once.
    for (path, requests) in [
        ("/500.jpg", 2),
        ("/flaky500.jpg", 2),
        ("/429-once.jpg", 2),
        ("/429.jpg", 2),
        ("/truncated.jpg", 2),
        ("/drip.jpg", 2),
        ("/never.jpg", 2),
        ("/404.jpg", 1),
        ("/html.jpg", 1),
        ("/noai.jpg", 1),
        ("/huge.jpg", 1),
        ("/img/5.jpg", 1),
    ] {
        assert_eq!(server.count(path), requests, "requests for {path}");
    }

    // --retry-failed fetches only rows whose failure was transient; a recovered server's
    // image joins its shard.
    server.reset();
    server.recovered.store(true, Ordering::SeqCst);
    let (code, text) = ingest_owned(&args(&["--retry-failed"]));
    assert_eq!(code, 0, "{text}");
    for (path, requests) in [
        ("/flaky500.jpg", 1),
        ("/500.jpg", 2),
        ("/429.jpg", 2),
        ("/truncated.jpg", 2),
        ("/404.jpg", 0),
        ("/html.jpg", 0),
        ("/noai.jpg", 0),
        ("/loop.jpg", 0),
        ("/img/5.jpg", 0),
        ("/429-once.jpg", 0),
    ] {
        assert_eq!(server.count(path), requests, "retry requests for {path}");
    }
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(rows.len(), good + 3);
    assert_eq!(manifest.metrics["rejected"]["http_5xx"], json!(1));
    assert_eq!(manifest.metrics["retried"], json!(8));
    assert!(rows.iter().any(|r| r.source == server.url("/flaky500.jpg")));

    // --ignore-opt-out is a different config: the noai image is then taken.
    let relaxed = dir.path().join("relaxed");
    let mut relaxed_args = pairs_args(&list, &relaxed, &["--shard-rows", "8", "--size", "32"]);
    relaxed_args.extend(
        FAST_LIMITS
            .iter()
            .chain(&["--ignore-opt-out"])
            .map(|s| s.to_string()),
    );
    let (code, text) = ingest_owned(&relaxed_args);
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(relaxed.to_str().unwrap());
    assert!(rows.iter().any(|r| r.source == server.url("/noai.jpg")));
    assert_eq!(manifest.metrics["rejected"].get("opted_out"), None);
}

/// `ingest pairs --input input --out dir/name` plus `extra`, which must succeed: its rows.
fn downloaded(
    input: &Path,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (manifests::Manifest, Vec<manifests::shards::pairs::PairRow>) {
    let out = dir.join(name);
    let mut args = pairs_args(input, &out, extra);
    args.extend(["--min-source-size".to_string(), "8".to_string()]);
    let (code, text) = ingest_owned(&args);
    assert_eq!(code, 0, "{text}");
    pairs_rows(out.to_str().unwrap())
}

#[test]
fn url_lists_in_tsv_jsonl_and_parquet() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    // CC3M layout: caption, then URL, no header.
    let tsv = dir.path().join("cc3m.tsv");
    let lines: String = (0..3)
        .map(|n| format!("caption {n}\t{}\n", server.url(&format!("/img/{n}.jpg"))))
        .collect();
    std::fs::write(&tsv, lines).unwrap();
    let (_, rows) = downloaded(
        &tsv,
        dir.path(),
        "tsv",
        &[
            "--no-header",
            "--caption-column",
            "0",
            "--image-column",
            "1",
        ],
    );
    assert_eq!(sorted_keys(&rows), ["000000000", "000000001", "000000002"]);

    let jsonl = dir.path().join("list.jsonl");
    let lines: String = (3..5)
        .map(|n| {
            json!({"url": server.url(&format!("/img/{n}.jpg")), "caption": format!("c{n}")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&jsonl, lines).unwrap();
    assert_eq!(downloaded(&jsonl, dir.path(), "jsonl", &[]).1.len(), 2);

    // MS-COCO captions with `coco_url`: the images are downloaded instead of read from disk.
    let coco = dir.path().join("captions.json");
    let coco_json = json!({
        "images": [{"id": 7, "file_name": "not-on-disk.jpg", "coco_url": server.url("/img/7.jpg")}],
        "annotations": [{"id": 70, "image_id": 7, "caption": "a coco caption"}],
    });
    std::fs::write(&coco, coco_json.to_string()).unwrap();
    let (_, rows) = downloaded(&coco, dir.path(), "coco", &["--url-column", "coco_url"]);
    assert_eq!(sorted_keys(&rows), ["000000000007-000000070"]);
    assert_eq!(rows[0].source, server.url("/img/7.jpg"));

    // LAION layout: URL and caption columns under other names, extra columns kept as metadata.
    let laion = dir.path().join("laion");
    let urls = [
        server.url("/img/5.jpg"),
        server.url("/img/6.jpg"),
        server.url("/404.jpg"),
        "not a url".to_string(),
    ];
    write_string_parquet(
        &laion.join("part-0.parquet"),
        &[
            ("URL", &urls),
            ("TEXT", &["a", "b", "c", "d"].map(String::from)),
            ("LICENSE", &["cc-by", "?", "?", "?"].map(String::from)),
        ],
    );
    let (manifest, rows) = downloaded(
        &laion,
        dir.path(),
        "laion",
        &["--url-column", "URL", "--caption-column", "TEXT"],
    );
    assert_eq!(sorted_keys(&rows), ["part-0-000000000", "part-0-000000001"]);
    assert_eq!(rows[0].metadata.as_deref(), Some(r#"{"LICENSE":"cc-by"}"#));
    assert_eq!(rejected(&manifest), json!({"http_404": 1, "bad_url": 1}));

    // DataComp/img2dataset-input layout: `url` and `caption` need no flags.
    let datacomp = dir.path().join("datacomp.parquet");
    write_string_parquet(
        &datacomp,
        &[
            ("url", &[server.url("/img/8.jpg")]),
            ("caption", &["eight".to_string()]),
        ],
    );
    let (_, rows) = downloaded(&datacomp, dir.path(), "datacomp", &[]);
    assert_eq!(sorted_keys(&rows), ["datacomp-000000000"]);
    assert_eq!(rows[0].caption, "eight");
}

/// A parquet file of string columns.
fn write_string_parquet(path: &Path, columns: &[(&str, &[String])]) {
    let batch = arrow_array::RecordBatch::try_from_iter(columns.iter().map(|(name, values)| {
        let array = arrow_array::StringArray::from(values.to_vec());
        (*name, Arc::new(array) as arrow_array::ArrayRef)
    }))
    .unwrap();
    write_batch_parquet(path, &batch);
}

fn write_batch_parquet(path: &Path, batch: &arrow_array::RecordBatch) {
    let mut buffer = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut buffer, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, buffer).unwrap();
}

/// A parquet URL list read under the wrong column names would reject each of its rows, so it
/// is refused naming the file, the column and the columns it has; a column of numbers where
/// text belongs is refused naming its type. Dictionary-encoded strings (pandas categoricals,
/// `pa.dictionary`) read like plain ones.
#[test]
fn parquet_url_lists_name_a_missing_or_mistyped_column_and_read_dictionary_strings() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let urls = [server.url("/img/1.jpg"), server.url("/img/2.jpg")];
    let laion = dir.path().join("laion.parquet");
    write_string_parquet(
        &laion,
        &[("URL", &urls), ("TEXT", &["a", "b"].map(String::from))],
    );
    let refused = |input: &Path, extra: &[&str], expected: &str| {
        let out = dir.path().join("refused");
        let (code, text) = ingest_owned(&pairs_args(input, &out, extra));
        assert_ne!(code, 0, "{extra:?} was accepted: {text}");
        assert!(text.contains(expected), "{text}");
        assert!(!out.join("manifest.json").exists());
    };
    refused(
        &laion,
        &[],
        "laion.parquet: neither an image column of bytes (jpg, jpeg, png, webp, image) nor the \
         URL column 'url' (its columns: URL, TEXT; --url-column names another)",
    );
    refused(
        &laion,
        &["--url-column", "URL"],
        "laion.parquet: no caption column 'caption' (its columns: URL, TEXT; --caption-column \
         names another)",
    );

    let numbers = dir.path().join("numbers.parquet");
    let batch = arrow_array::RecordBatch::try_from_iter([
        (
            "url",
            Arc::new(arrow_array::Int64Array::from(vec![1, 2])) as arrow_array::ArrayRef,
        ),
        (
            "caption",
            Arc::new(arrow_array::StringArray::from(vec!["a", "b"])),
        ),
    ])
    .unwrap();
    write_batch_parquet(&numbers, &batch);
    refused(
        &numbers,
        &[],
        "numbers.parquet: column 'url' holds Int64, not text",
    );

    let categorical = dir.path().join("categorical.parquet");
    let dictionary = |values: Vec<&str>| {
        Arc::new(
            values
                .into_iter()
                .collect::<arrow_array::DictionaryArray<arrow_array::types::Int32Type>>(),
        ) as arrow_array::ArrayRef
    };
    let batch = arrow_array::RecordBatch::try_from_iter([
        ("url", dictionary(urls.iter().map(String::as_str).collect())),
        ("caption", dictionary(vec!["same", "same"])),
        ("licence", dictionary(vec!["cc-by", "cc-by"])),
    ])
    .unwrap();
    write_batch_parquet(&categorical, &batch);
    let (_, rows) = downloaded(&categorical, dir.path(), "categorical", &[]);
    assert_eq!(
        sorted_keys(&rows),
        ["categorical-000000000", "categorical-000000001"]
    );
    assert!(rows.iter().all(|row| row.caption == "same"), "{rows:?}");
    assert_eq!(rows[0].metadata.as_deref(), Some(r#"{"licence":"cc-by"}"#));

    // A caption column of nothing but nulls (pyarrow types it `null`): each row without one.
    let no_captions = dir.path().join("no-captions.parquet");
    let batch = arrow_array::RecordBatch::try_from_iter_with_nullable([
        (
            "url",
            Arc::new(arrow_array::StringArray::from(urls.to_vec())) as arrow_array::ArrayRef,
            false,
        ),
        ("caption", Arc::new(arrow_array::NullArray::new(2)), true),
    ])
    .unwrap();
    write_batch_parquet(&no_captions, &batch);
    let (manifest, rows) = downloaded(&no_captions, dir.path(), "no-captions", &[]);
    assert!(rows.is_empty());
    assert_eq!(rejected(&manifest), json!({"no_caption": 2}));
}

/// Killed (SIGKILL) after its first shard, a URL run resumes: finished shards are kept and not
/// downloaded again, and the result equals an uninterrupted run.
#[test]
fn killed_download_resumes_without_fetching_finished_shards_again() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let samples = 48;
    let shard_rows = 8;
    let urls: Vec<(String, String)> = (0..samples)
        .map(|n| (server.url(&format!("/slow/{n}.jpg")), format!("slow {n}")))
        .collect();
    let list = dir.path().join("urls.csv");
    write_url_csv(&list, &urls);
    // Each run names itself in its User-Agent (not part of the config, so resume still works).
    let args = |out: &Path, agent: &str| {
        let mut args = pairs_args(
            &list,
            out,
            &[
                "--shard-rows",
                "8",
                "--size",
                "32",
                "--concurrency",
                "2",
                "--per-host-concurrency",
                "2",
                "--user-agent",
                agent,
            ],
        );
        args.extend(FAST_LIMITS.iter().map(|s| s.to_string()));
        args
    };
    let reference = dir.path().join("reference");
    let (code, text) = ingest_owned(&args(&reference, "reference"));
    assert_eq!(code, 0, "{text}");
    assert_eq!(server.total_from("reference"), samples);

    let out = dir.path().join("killed");
    let shards = out.join("pairs");
    // Killed once the first shard's resume record is written (the shard itself is written just
    // before it), so at least that shard is finished for the rerun.
    let work = out.join("_work");
    kill_mid_run(&args(&out, "killed"), &out, || {
        manifests::testing::files_below(&work).iter().any(|file| {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("pairs__") && name.ends_with(".parquet.json")
        })
    });
    let modified = |path: &Path| std::fs::metadata(path).unwrap().modified().unwrap();
    let before: Vec<(std::path::PathBuf, std::time::SystemTime)> = std::fs::read_dir(&shards)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .map(|p| (p.clone(), modified(&p)))
        .collect();

    let (code, text) = ingest_owned(&args(&out, "rerun"));
    assert_eq!(code, 0, "{text}");
    let kept: Vec<usize> = before
        .iter()
        .filter(|(path, time)| modified(path) == *time)
        .map(|(path, _)| {
            let name = path.file_stem().unwrap().to_str().unwrap();
            name.rsplit('-').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(
        kept.contains(&0),
        "the first finished shard is kept, not redone"
    );
    for shard in &kept {
        for n in shard * shard_rows..(shard + 1) * shard_rows {
            assert_eq!(
                server.count_from("rerun", &format!("/slow/{n}.jpg")),
                0,
                "row {n} of kept shard {shard} was downloaded again"
            );
        }
    }
    assert_eq!(
        server.total_from("rerun"),
        samples - kept.len() * shard_rows
    );

    assert_same_as_reference(&out, &reference, samples, pairs_rows);
}

/// Two stages over one URL list at two sizes (as `make pipeline` ingests own data for the
/// tokenizer and for super-resolution) sharing `--download-cache`: the second requests nothing
/// but the transient failure, counts the same rejections, and stores what a stage without the
/// cache stores.
#[test]
fn a_download_cache_serves_a_second_stage_of_the_same_list() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let good = 6;
    // Permanent failures are kept; a 500 is transient and asked again.
    let urls = server.images_then_faults(good, &["/404.jpg", "/html.jpg", "/noai.jpg", "/500.jpg"]);
    let list = dir.path().join("urls.csv");
    write_url_csv(&list, &urls);
    let cache = dir.path().join("downloads");
    let stage = |name: &str, size: &str, cached: bool| {
        let out = dir.path().join(name);
        let mut extra = vec!["--size", size];
        if cached {
            extra.extend(["--download-cache", cache.to_str().unwrap()]);
        }
        let mut args = pairs_args(&list, &out, &extra);
        args.extend(FAST_LIMITS.iter().map(|s| s.to_string()));
        let (code, text) = ingest_owned(&args);
        assert_eq!(code, 0, "{text}");
        pairs_rows(out.to_str().unwrap())
    };

    let (small, small_rows) = stage("small", "32", true);
    assert_eq!(small_rows.len(), good);
    let first_requests = server.requests_where(|_, _| true);
    server.reset();
    let (large, large_rows) = stage("large", "48", true);
    assert_eq!(
        server.requests_where(|_, path| path != "/500.jpg"),
        0,
        "the second stage downloaded again what the cache keeps"
    );
    assert!(
        server.count("/500.jpg") >= 1,
        "a transient failure is not kept"
    );
    assert_eq!(large.metrics["rejected"], small.metrics["rejected"]);
    assert_eq!(sorted_keys(&large_rows), sorted_keys(&small_rows));
    assert!(large_rows.iter().all(|row| row.width == 48));

    server.reset();
    let (uncached, uncached_rows) = stage("uncached", "48", false);
    assert_eq!(server.requests_where(|_, _| true), first_requests);
    assert_eq!(uncached.metrics["rejected"], large.metrics["rejected"]);
    let by_key = |rows: &[manifests::shards::pairs::PairRow]| {
        let mut rows: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| (r.key.clone(), r.caption.clone(), r.sha256.clone()))
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(by_key(&large_rows), by_key(&uncached_rows));

    // A bucket is refused for the cache, by name.
    let mut args = pairs_args(&list, &dir.path().join("bucket"), &[]);
    args.extend(["--download-cache".into(), "s3://bucket/downloads".into()]);
    let (code, text) = ingest_owned(&args);
    assert_ne!(code, 0);
    assert!(text.contains("s3://bucket/downloads"), "{text}");
}

/// `--retry-failed` rewrites shards in place: it withdraws the manifest first, so no reader
/// trusts digests that no longer hold, and writes each shard's failure record after the shard,
/// so the two agree. A retry stopped between a shard and its record (here: the record's path is
/// blocked) loses no row: the next retry ends with every row the server now serves.
#[test]
fn a_retry_stopped_between_a_shard_and_its_failure_record_loses_no_row() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut urls = Vec::new();
    for shard in 0..2 {
        for n in shard * 3..shard * 3 + 3 {
            urls.push((server.url(&format!("/img/{n}.jpg")), format!("picture {n}")));
        }
        urls.push((
            server.url(&format!("/flaky/{shard}.jpg")),
            format!("flaky {shard}"),
        ));
    }
    let list = dir.path().join("urls.csv");
    write_url_csv(&list, &urls);
    let out = dir.path().join("out");
    let args = |extra: &[&str]| {
        let mut args = pairs_args(&list, &out, &["--shard-rows", "4", "--size", "32"]);
        args.extend(FAST_LIMITS.iter().chain(extra).map(|s| s.to_string()));
        args
    };
    let (code, text) = ingest_owned(&args(&[]));
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(rows.len(), 6);
    assert_eq!(rejected(&manifest), json!({"http_5xx": 2}));

    // Once the retry has read the failure records and fetches the second shard's row, that
    // shard's record is blocked (a folder where the file goes), so the retry stops after writing
    // the shard but before its record.
    server.recovered.store(true, Ordering::SeqCst);
    let record = out.join("failed/part-00000-00001.jsonl");
    let blocked = record.clone();
    *server.on_request.lock().unwrap() = Some(Box::new(move |path| {
        if path == "/flaky/1.jpg" && blocked.is_file() {
            std::fs::remove_file(&blocked).unwrap();
            std::fs::create_dir(&blocked).unwrap();
        }
    }));
    let (code, text) = ingest_owned(&args(&["--retry-failed"]));
    assert_ne!(code, 0, "the blocked record fails the retry: {text}");
    let manifest_file = out.join("manifest.json");
    if manifest_file.exists() {
        let (upstream, _) = manifests::Upstream::read(out.to_str().unwrap()).unwrap();
        let problems = upstream.manifest.verify(&upstream.location, true);
        assert!(
            problems.is_empty(),
            "a manifest left in place must still hold: {problems:?}"
        );
    }

    *server.on_request.lock().unwrap() = None;
    std::fs::remove_dir(&record).unwrap();
    let (code, text) = ingest_owned(&args(&["--retry-failed"]));
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(
        sorted_keys(&rows).len(),
        8,
        "every row the server now serves"
    );
    assert_eq!(rejected(&manifest), json!({}));
    for shard in ["part-00000-00000", "part-00000-00001"] {
        let record = std::fs::read_to_string(out.join(format!("failed/{shard}.jsonl"))).unwrap();
        assert_eq!(
            record, "",
            "the failure record of {shard} agrees with its shard"
        );
    }
}

/// A URL list beside an img2dataset container, stopped after the URL list's shard (its failure
/// record's path is blocked) and run again: the resumed run keeps both, and lists its shards
/// in the uninterrupted run's order, with the same rows and metrics.
#[test]
fn a_resumed_run_of_urls_and_a_container_equals_the_uninterrupted_one() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let samples: Vec<(String, Vec<u8>)> = (0..3)
        .map(|n| (format!("c{n}"), png(40, 40, 60 + n as u8)))
        .collect();
    write(&input, "a.parquet", img2dataset_parquet(&samples, 2));
    let urls = [server.url("/img/0.jpg"), server.url("/img/1.jpg")];
    let captions = ["zero", "one"].map(String::from);
    write_string_parquet(
        &input.join("b.parquet"),
        &[("url", &urls), ("caption", &captions)],
    );
    let args = |out: &Path| {
        let mut args = pairs_args(&input, out, &["--shard-rows", "2", "--size", "32"]);
        args.extend(FAST_LIMITS.iter().map(|s| s.to_string()));
        args
    };
    let reference = dir.path().join("reference");
    let (code, text) = ingest_owned(&args(&reference));
    assert_eq!(code, 0, "{text}");

    let out = dir.path().join("out");
    let record = out.join("failed/part-00000-00001.jsonl");
    let blocked = record.clone();
    *server.on_request.lock().unwrap() = Some(Box::new(move |_| {
        let _ = std::fs::create_dir_all(&blocked);
    }));
    let (code, text) = ingest_owned(&args(&out));
    assert_ne!(code, 0, "the blocked record stops the run: {text}");
    assert!(out.join("pairs/part-00000-00001.parquet").exists());
    *server.on_request.lock().unwrap() = None;
    std::fs::remove_dir(&record).unwrap();

    server.reset();
    let (code, text) = ingest_owned(&args(&out));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        server.requests_where(|_, _| true),
        0,
        "the URL list's finished shard was downloaded again"
    );
    assert_same_as_reference(&out, &reference, 5, pairs_rows);
}

/// A URL carrying credentials (user name and password, a presigned signature in its query)
/// is fetched as given, but neither the shard's `source` column, the manifest, the failure
/// records nor the logs (at debug level, with a retry to log) hold them.
#[test]
fn credentials_in_urls_stay_out_of_shards_manifests_and_logs() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let with_secrets = |path: &str| {
        format!(
            "http://reader:hunter2@127.0.0.1:{}{path}?X-Amz-Signature=f00dfeed&sig=s3cr3t",
            server.port
        )
    };
    let urls = [
        (with_secrets("/img/9.jpg"), "nine".to_string()),
        (with_secrets("/429-once.jpg"), "busy once".to_string()),
        (with_secrets("/404.jpg"), "gone".to_string()),
    ];
    let list = dir.path().join("urls.csv");
    write_url_csv(&list, &urls);
    let out = dir.path().join("out");
    let mut args = pairs_args(&list, &out, &["--size", "32"]);
    args.extend(FAST_LIMITS.iter().map(|s| s.to_string()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(&args)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{logs}");
    assert!(logs.contains("retrying"), "the retry is logged: {logs}");

    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(rows.len(), 2);
    let mut written: Vec<String> = rows.iter().map(|r| r.source.clone()).collect();
    written.push(logs);
    written.push(serde_json::to_string(&manifest).unwrap());
    for file in manifests::testing::files_below(&out) {
        written.push(String::from_utf8_lossy(&std::fs::read(file).unwrap()).into_owned());
    }
    for text in &written {
        for secret in ["hunter2", "f00dfeed", "s3cr3t", "X-Amz-Signature"] {
            assert!(!text.contains(secret), "'{secret}' was kept");
        }
    }
    assert!(rows.iter().all(|r| r.source.starts_with(&server.url("/"))));
    assert_ne!(rows[0].source, rows[1].source);
}

/// Parquet URL lists are found recursively: `2023/urls.parquet` and `2024/urls.parquet` key
/// their rows by their path (without `.parquet`), so no two rows share a key, while a list
/// whose file name is its own keeps the plain `{name}-{row}` keys.
#[test]
fn parquet_url_lists_in_subfolders_key_their_rows_apart() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lists");
    for (n, path) in ["2023/urls.parquet", "2024/urls.parquet", "extra.parquet"]
        .iter()
        .enumerate()
    {
        write_string_parquet(
            &input.join(path),
            &[
                ("url", &[server.url(&format!("/img/{n}.jpg"))]),
                ("caption", &[format!("caption {n}")]),
            ],
        );
    }
    let (_, rows) = downloaded(&input, dir.path(), "out", &[]);
    assert_eq!(
        sorted_keys(&rows),
        [
            "2023/urls-000000000",
            "2024/urls-000000000",
            "extra-000000000"
        ]
    );
}

/// A GIF is a picture this build does not decode: refused at its first bytes as
/// `unsupported_format`, neither downloaded whole nor counted as a decode error, and kept as
/// such in the download cache.
#[test]
fn a_downloaded_gif_is_an_unsupported_format() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("urls.csv");
    write_url_csv(&list, &server.images_then_faults(2, &["/anim.gif"]));
    let cache = dir.path().join("downloads");
    for name in ["first", "cached"] {
        let (manifest, rows) = downloaded(
            &list,
            dir.path(),
            name,
            &["--size", "32", "--download-cache", cache.to_str().unwrap()],
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rejected(&manifest), json!({"unsupported_format": 1}));
    }
    assert_eq!(server.count("/anim.gif"), 1, "the cache keeps the refusal");
    let kept = |extension: &str| {
        manifests::testing::files_below(&cache)
            .iter()
            .filter(|file| file.extension().is_some_and(|e| e == extension))
            .count()
    };
    assert_eq!(
        (kept("image"), kept("failed")),
        (2, 1),
        "the GIF is refused before it is kept as an image"
    );
}
