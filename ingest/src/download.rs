//! Images named by URL: fetched with async I/O under bounded concurrency (overall and per
//! host), timeouts, a size cap enforced while streaming, content sniffing, retries with backoff
//! for transient failures only, a DNS cache and the `X-Robots-Tag: noai` opt-out. With a
//! download cache (`--download-cache DIR`), each URL's outcome is kept in a local folder, so a
//! second stage over the same list (`make pipeline`'s larger copy for super-resolution) or a
//! killed run's rerun downloads nothing it already has.
//!
//! Every failure is a [`Reason`] (`http_404`, `timeout`, `dns`, ...), never an error of the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, Semaphore};

use crate::Reason;

/// What decides which downloads succeed; part of the stage's config (and so of its identity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadRules {
    /// Bodies longer than this are abandoned while streaming (`too_large`).
    pub max_bytes: u64,
    /// Refuse images whose response carries `X-Robots-Tag: noai` or `noimageai` (`opted_out`),
    /// as img2dataset does by default.
    pub honor_opt_out: bool,
}

impl Default for DownloadRules {
    fn default() -> DownloadRules {
        DownloadRules {
            max_bytes: 32 * 1024 * 1024,
            honor_opt_out: true,
        }
    }
}

impl DownloadRules {
    pub fn is_default(&self) -> bool {
        *self == DownloadRules::default()
    }
}

/// How downloads run; not part of the config, so changing them never redoes finished shards.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Requests in flight at once (a downloaded image holds its slot until it is decoded, which
    /// bounds the raw bytes in memory).
    pub concurrency: usize,
    pub per_host: usize,
    pub connect_timeout: Duration,
    /// The longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// The longest one attempt may take, however steadily its bytes drip in.
    pub request_timeout: Duration,
    pub max_redirects: usize,
    /// Further attempts after a transient failure (timeout, DNS, connection, 429, 5xx, cut short).
    pub retries: u32,
    /// First backoff; doubled per attempt, unless the server's `Retry-After` says otherwise.
    pub backoff: Duration,
    pub user_agent: String,
    /// Only rows whose earlier failure was transient are fetched again (`--retry-failed`).
    pub retry_failed: bool,
    /// A local folder keeping each URL's outcome under the [`DownloadRules`] it was fetched
    /// with: the body, or a failure another attempt would not change (transient ones are not
    /// kept). Another stage over the same list reads it instead of the network.
    pub cache: Option<PathBuf>,
}

impl Default for DownloadOptions {
    fn default() -> DownloadOptions {
        DownloadOptions {
            concurrency: 64,
            per_host: 16,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_redirects: 5,
            retries: 2,
            backoff: Duration::from_millis(500),
            user_agent: format!(
                "parti-ingest/{} (image-text dataset builder; honours X-Robots-Tag noai)",
                env!("CARGO_PKG_VERSION")
            ),
            retry_failed: false,
            cache: None,
        }
    }
}

/// `url` as logs and shards keep it: without the user name, password, query and fragment,
/// which may carry credentials (a presigned URL's `X-Amz-Signature`, an Azure `sig=`, a token).
/// What is taken away is replaced by a digest of the whole URL (`#redacted-` and 16 hex
/// digits), so two URLs that differ only there are still two origins. A URL with none of these
/// is kept as given.
pub fn redacted(url: &str) -> String {
    let digest = blake3::hash(url.as_bytes()).to_hex();
    let mark = format!("redacted-{}", &digest[..16]);
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return format!("unparsable-url#{mark}");
    };
    let secret = !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some();
    if !secret {
        return url.to_string();
    }
    // Fails only for URLs that cannot have credentials (`data:`, `mailto:`): nothing to remove.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    parsed.set_query(None);
    parsed.set_fragment(Some(&mark));
    parsed.to_string()
}

/// Failure reasons worth another attempt, now or in a `--retry-failed` rerun.
pub const TRANSIENT: [Reason; 6] = [
    "timeout",
    "dns",
    "connect_failed",
    "http_429",
    "http_5xx",
    "truncated",
];

pub fn is_transient(reason: &str) -> bool {
    TRANSIENT.contains(&reason)
}

/// Failure reasons that the same request under the same rules would meet again: what the
/// download cache keeps besides bodies.
const PERMANENT: [Reason; 12] = [
    "bad_url",
    "http_3xx",
    "http_403",
    "http_404",
    "http_410",
    "http_4xx",
    "too_many_redirects",
    "opted_out",
    "too_large",
    "not_an_image",
    "unsupported_format",
    "empty_file",
];

/// Longest backoff honoured from a `Retry-After` header; a server asking for more gets a
/// transient failure (retried by a later `--retry-failed` run) rather than a stalled job.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("no address for {0}")]
struct NoAddress(String);

/// Resolves each host name once per run; concurrent lookups of one name share one query.
/// Failures are not kept, so a name that failed once is asked again by the next attempt.
#[derive(Default)]
struct CachingResolver {
    cache: Mutex<HashMap<String, Arc<OnceCell<Vec<SocketAddr>>>>>,
}

impl reqwest::dns::Resolve for CachingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let cell = match self.cache.lock() {
            Ok(mut cache) => cache.entry(host.clone()).or_default().clone(),
            Err(_) => Arc::new(OnceCell::new()),
        };
        Box::pin(async move {
            let addresses = cell
                .get_or_try_init(|| async {
                    let found: Vec<SocketAddr> =
                        tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
                    if found.is_empty() {
                        return Err(std::io::Error::other(NoAddress(host.clone())));
                    }
                    Ok(found)
                })
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                    Box::new(DnsFailure(e.to_string()))
                })?;
            let addrs: reqwest::dns::Addrs = Box::new(addresses.clone().into_iter());
            Ok(addrs)
        })
    }
}

/// Marks a failed lookup, so the request error it causes is counted as `dns`.
#[derive(Debug, thiserror::Error)]
#[error("DNS lookup failed: {0}")]
struct DnsFailure(String);

/// One failed attempt: why, and how long the server asked us to wait (429/503).
struct Failure {
    reason: Reason,
    retry_after: Option<Duration>,
}

impl From<Reason> for Failure {
    fn from(reason: Reason) -> Failure {
        Failure {
            reason,
            retry_after: None,
        }
    }
}

pub struct Downloader {
    client: reqwest::Client,
    options: DownloadOptions,
    rules: DownloadRules,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// The rules as the cache keys them (a change of rules is a different entry).
    rules_key: String,
    /// Numbers the cache's temporary files, so concurrent writes never share one.
    cache_writes: AtomicU64,
}

impl Downloader {
    pub fn new(options: DownloadOptions, rules: DownloadRules) -> Result<Downloader, String> {
        let client = reqwest::Client::builder()
            .user_agent(options.user_agent.clone())
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .timeout(options.request_timeout)
            .redirect(reqwest::redirect::Policy::limited(options.max_redirects))
            .dns_resolver(Arc::new(CachingResolver::default()))
            .pool_max_idle_per_host(options.per_host.max(1))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let rules_key =
            serde_json::to_string(&rules).map_err(|e| format!("download rules: {e}"))?;
        Ok(Downloader {
            client,
            options,
            rules,
            hosts: Mutex::new(HashMap::new()),
            rules_key,
            cache_writes: AtomicU64::new(0),
        })
    }

    fn host_slots(&self, host: &str) -> Arc<Semaphore> {
        match self.hosts.lock() {
            Ok(mut hosts) => hosts
                .entry(host.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.options.per_host.max(1))))
                .clone(),
            Err(_) => Arc::new(Semaphore::new(self.options.per_host.max(1))),
        }
    }

    /// The image bytes at `url`: from the download cache when it has the URL's outcome, else
    /// from the network (kept in the cache unless the failure was transient).
    pub async fn fetch(&self, url: &str) -> Result<Bytes, Reason> {
        let Some(entry) = self.cache_entry(url) else {
            return self.download(url).await;
        };
        if let Some(outcome) = read_cached(&entry).await {
            return outcome;
        }
        let outcome = self.download(url).await;
        if let Err(e) = self.keep(&entry, &outcome).await {
            tracing::warn!("download cache {}: {e}", entry.display());
        }
        outcome
    }

    /// Where the cache keeps `url`'s outcome under these rules (without an extension).
    fn cache_entry(&self, url: &str) -> Option<PathBuf> {
        let dir = self.options.cache.as_ref()?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.rules_key.as_bytes());
        hasher.update(b"\n");
        hasher.update(url.as_bytes());
        let name = hasher.finalize().to_hex();
        Some(dir.join(&name[..2]).join(name.as_str()))
    }

    /// Writes `outcome` to `entry` through a temporary file renamed into place, so a killed
    /// run leaves whole entries or none.
    async fn keep(&self, entry: &Path, outcome: &Result<Bytes, Reason>) -> std::io::Result<()> {
        let (extension, contents): (&str, &[u8]) = match outcome {
            Ok(bytes) => ("image", bytes),
            Err(reason) if PERMANENT.contains(reason) => ("failed", reason.as_bytes()),
            Err(_) => return Ok(()),
        };
        if let Some(folder) = entry.parent() {
            tokio::fs::create_dir_all(folder).await?;
        }
        let temporary = entry.with_extension(format!(
            "partial-{}-{}",
            std::process::id(),
            self.cache_writes.fetch_add(1, Ordering::Relaxed)
        ));
        tokio::fs::write(&temporary, contents).await?;
        let renamed = tokio::fs::rename(&temporary, entry.with_extension(extension)).await;
        if renamed.is_err() {
            let _ = tokio::fs::remove_file(&temporary).await;
        }
        renamed
    }

    /// The image bytes at `url` from the network, retrying transient failures with backoff.
    async fn download(&self, url: &str) -> Result<Bytes, Reason> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "bad_url")?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("bad_url");
        }
        let host = parsed.host_str().ok_or("bad_url")?.to_string();
        let slots = self.host_slots(&host);
        let mut attempt = 0u32;
        loop {
            let result = {
                let _slot = slots.acquire().await.map_err(|_| "cancelled")?;
                self.fetch_once(parsed.clone()).await
            };
            let failure = match result {
                Ok(bytes) => return Ok(bytes),
                Err(failure) => failure,
            };
            if !is_transient(failure.reason) || attempt >= self.options.retries {
                return Err(failure.reason);
            }
            let backoff = match failure.retry_after {
                Some(asked) if asked > MAX_BACKOFF => return Err(failure.reason),
                Some(asked) => asked,
                None => self.options.backoff.saturating_mul(1 << attempt.min(16)),
            };
            tracing::debug!(url = %redacted(url), reason = failure.reason, ?backoff, "retrying");
            tokio::time::sleep(backoff.min(MAX_BACKOFF)).await;
            attempt += 1;
        }
    }

    async fn fetch_once(&self, url: reqwest::Url) -> Result<Bytes, Failure> {
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| Failure::from(request_reason(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(Failure {
                reason: status_reason(status.as_u16()),
                retry_after,
            });
        }
        if self.rules.honor_opt_out && opted_out(response.headers(), &self.options.user_agent) {
            return Err("opted_out".into());
        }
        let cap = self.rules.max_bytes;
        if response.content_length().is_some_and(|length| length > cap) {
            return Err("too_large".into());
        }
        let mut body = BytesMut::new();
        let mut sniffed = false;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err("timeout".into()),
                Err(_) => return Err("truncated".into()),
            };
            if (body.len() + chunk.len()) as u64 > cap {
                return Err("too_large".into());
            }
            body.extend_from_slice(&chunk);
            // An HTML error page or an endless stream is abandoned at its first bytes.
            if !sniffed && body.len() >= SNIFF_BYTES {
                sniff(&body)?;
                sniffed = true;
            }
        }
        if body.is_empty() {
            return Err("empty_file".into());
        }
        sniff(&body)?;
        Ok(body.freeze())
    }
}

/// The outcome the cache keeps at `entry`, if it keeps one (an unreadable or unknown entry is
/// a miss: the URL is downloaded again).
async fn read_cached(entry: &Path) -> Option<Result<Bytes, Reason>> {
    if let Ok(body) = tokio::fs::read(entry.with_extension("image")).await {
        return Some(Ok(Bytes::from(body)));
    }
    let reason = tokio::fs::read(entry.with_extension("failed")).await.ok()?;
    PERMANENT
        .iter()
        .find(|known| known.as_bytes() == reason.as_slice())
        .map(|known| Err(*known))
}

fn request_reason(error: &reqwest::Error) -> Reason {
    if error.is_timeout() {
        return "timeout";
    }
    if error.is_redirect() {
        return "too_many_redirects";
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<DnsFailure>() {
            return "dns";
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return "timeout";
        }
        source = current.source();
    }
    if error.is_connect() {
        "connect_failed"
    } else if error.is_builder() {
        "bad_url"
    } else {
        // The peer closed or reset the connection before a whole response head arrived.
        "truncated"
    }
}

fn status_reason(status: u16) -> Reason {
    match status {
        404 => "http_404",
        403 => "http_403",
        410 => "http_410",
        429 => "http_429",
        300..=399 => "http_3xx",
        400..=499 => "http_4xx",
        _ => "http_5xx",
    }
}

/// img2dataset's rule: an `X-Robots-Tag` value carrying `noai` or `noimageai`, addressed to
/// every crawler or to this one (`name: directives` addresses a crawler by name).
fn opted_out(headers: &reqwest::header::HeaderMap, user_agent: &str) -> bool {
    let our_token = user_agent
        .split(['/', ' '])
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    headers
        .get_all("x-robots-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|value| {
            let value = value.to_ascii_lowercase();
            let directives = match value.split_once(':') {
                Some((agent, rest)) => {
                    let agent = agent.trim();
                    if agent != our_token && agent != "img2dataset" && agent != "*" {
                        return false;
                    }
                    rest.to_string()
                }
                None => value,
            };
            directives
                .split(',')
                .map(str::trim)
                .any(|d| d == "noai" || d == "noimageai")
        })
}

const SNIFF_BYTES: usize = 12;

/// Whether `bytes` start like a format the decoder reads (the header alone is not trusted).
pub fn looks_like_image(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        || bytes.starts_with(b"\x89PNG\r\n\x1a\n")
        || (bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP")
        || bytes.starts_with(b"BM")
}

/// A body's first bytes judged: an image the decoder reads, a picture in a format this build
/// does not decode (GIF: `unsupported_format`, refused before the rest is downloaded or kept
/// in the cache as an image), or no image at all.
fn sniff(bytes: &[u8]) -> Result<(), Reason> {
    let gif = bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a");
    if looks_like_image(bytes) || (gif && image::ImageFormat::Gif.reading_enabled()) {
        Ok(())
    } else if gif {
        Err("unsupported_format")
    } else {
        Err("not_an_image")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_out_directives_addressed_to_all_or_us() {
        let ua = "parti-ingest/0.1 (x)";
        let headers = |value: &str| {
            let mut map = reqwest::header::HeaderMap::new();
            map.insert(
                "x-robots-tag",
                reqwest::header::HeaderValue::from_str(value).unwrap(),
            );
            map
        };
        assert!(opted_out(&headers("noai"), ua));
        assert!(opted_out(&headers("noindex, NoImageAI"), ua));
        assert!(opted_out(&headers("parti-ingest: noai"), ua));
        assert!(!opted_out(&headers("otherbot: noai"), ua));
        assert!(!opted_out(&headers("noindex"), ua));
    }

    #[test]
    fn redaction_removes_credentials_and_keeps_origins_apart() {
        let plain = "https://example.com/a/b.jpg";
        assert_eq!(redacted(plain), plain);
        let signed = "https://user:pass@bucket.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc&sig=def";
        let shown = redacted(signed);
        assert!(
            shown.starts_with("https://bucket.s3.amazonaws.com/k.jpg#redacted-"),
            "{shown}"
        );
        for secret in ["user", "pass", "abc", "def", "Signature"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let other = redacted("https://bucket.s3.amazonaws.com/k.jpg?X-Amz-Signature=xyz");
        assert_ne!(shown, other);
    }

    #[test]
    fn sniffing_knows_decodable_formats_only() {
        assert!(looks_like_image(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(looks_like_image(b"\x89PNG\r\n\x1a\n...."));
        assert!(looks_like_image(b"RIFF\0\0\0\0WEBPVP8 "));
        assert!(!looks_like_image(b"<!doctype html>"));
        assert!(!looks_like_image(b"RIFF\0\0\0\0WAVEfmt "));
        let gif = if image::ImageFormat::Gif.reading_enabled() {
            Ok(())
        } else {
            Err("unsupported_format")
        };
        assert_eq!(sniff(b"GIF89a\x01\0\x01\0\0\0\0"), gif);
        assert_eq!(sniff(b"<!doctype html>"), Err("not_an_image"));
    }
}
