//! One place where every user-supplied location becomes an object store.
//!
//! A location is a local path, `file://`, `s3://`, `gs://`, `az://`/`azure://`/`abfs://`, or
//! `memory://NAME/...` (a process-wide in-memory bucket, for tests). Credentials and endpoints
//! come from the environment through object_store's `from_env` builders; nothing here stores,
//! logs or formats them, so they cannot leak into manifests or messages.
//!
//! The API is blocking on purpose: stages are CPU-bound batch programs driven by rayon, and a
//! private tokio runtime keeps async out of every caller.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::Error;

/// Bodies above this size are uploaded in parts, so large shards work on every provider.
const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("parti-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the I/O runtime: {e}"))
    })
}

fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// Stores are cached per scheme and bucket so that every location in a bucket shares one client
/// (connection pool, credential cache).
fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>, Error> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let scheme = url.scheme();
    let cache_key = format!("{scheme}://{}", bucket_of(url));
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(store) = stores.get(&cache_key) {
        return Ok(store.clone());
    }
    let invalid = |reason: String| Error::InvalidLocation {
        uri: url.to_string(),
        reason,
    };
    let store: Arc<dyn ObjectStore> = match scheme {
        "file" => Arc::new(LocalFileSystem::new()),
        "memory" => Arc::new(InMemory::new()),
        "s3" | "s3a" => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(|e| invalid(e.to_string()))?,
        ),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(|e| invalid(e.to_string()))?,
        ),
        "az" | "azure" | "abfs" | "abfss" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(|e| invalid(e.to_string()))?,
        ),
        other => {
            return Err(invalid(format!(
                "unsupported scheme '{other}' (use a local path, file://, s3://, gs://, az:// or memory://)"
            )));
        }
    };
    stores.insert(cache_key, store.clone());
    Ok(store)
}

/// The part of `url` that names its bucket: the host, and in Azure's
/// `abfss://container@account.dfs.core.windows.net` form the container too (object_store reads
/// it there). Without it two containers of one account would share a store, and the URI a
/// manifest records would lose the container. Only a user name can be a container: a password
/// is never kept.
fn bucket_of(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match (url.scheme(), url.username()) {
        ("az" | "azure" | "abfs" | "abfss", container) if !container.is_empty() => {
            format!("{container}@{host}")
        }
        _ => host.to_string(),
    }
}

/// Reads an object front to back, `RANGE_BYTES` per request.
struct RangedReader {
    location: Location,
    position: u64,
    end: u64,
    buffer: Bytes,
}

const RANGE_BYTES: u64 = 8 << 20;

impl std::io::Read for RangedReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buffer.is_empty() && self.position < self.end {
            let next = (self.position + RANGE_BYTES).min(self.end);
            self.buffer = self
                .location
                .get_range(self.position..next)
                .map_err(std::io::Error::other)?;
            self.position += self.buffer.len() as u64;
        }
        let n = out.len().min(self.buffer.len());
        out[..n].copy_from_slice(&self.buffer.split_to(n));
        Ok(n)
    }
}

/// Size and identity of an object, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub location: Location,
    pub size: u64,
    /// Provider change marker (ETag, or inode/mtime/size for local files).
    pub e_tag: Option<String>,
    /// Object version, where the bucket keeps versions.
    pub version: Option<String>,
}

/// A file or a folder in some object store.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    /// Scheme and bucket, e.g. `s3://bucket` or `file://`.
    root_uri: String,
    path: ObjectPath,
    /// True when the user gave a local path: messages then show plain paths.
    local: bool,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

impl PartialEq for Location {
    fn eq(&self, other: &Self) -> bool {
        self.root_uri == other.root_uri && self.path == other.path
    }
}
impl Eq for Location {}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

fn looks_like_url(uri: &str) -> bool {
    match uri.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
        }
        None => false,
    }
}

impl Location {
    /// Resolves a user-supplied location. Relative local paths are made absolute against the
    /// current directory.
    pub fn parse(uri: &str) -> Result<Location, Error> {
        let invalid = |reason: &str| Error::InvalidLocation {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if uri.trim().is_empty() {
            return Err(invalid("empty location"));
        }
        if !looks_like_url(uri) {
            let absolute =
                lexically_normal(&std::path::absolute(uri).map_err(|e| invalid(&e.to_string()))?);
            let url =
                Url::from_file_path(&absolute).map_err(|()| invalid("not a valid local path"))?;
            let mut location = Self::from_url(&url, uri)?;
            location.local = true;
            return Ok(location);
        }
        let url = Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
        Self::from_url(&url, uri)
    }

    fn from_url(url: &Url, original: &str) -> Result<Location, Error> {
        let store = store_for(url)?;
        let (root_uri, raw_path) = match url.scheme() {
            "file" => (
                "file://".to_string(),
                url.to_file_path()
                    .map_err(|()| Error::InvalidLocation {
                        uri: original.to_string(),
                        reason: "not a valid local path".into(),
                    })?
                    .to_string_lossy()
                    .into_owned(),
            ),
            scheme => (
                format!("{scheme}://{}", bucket_of(url)),
                percent_decode(url.path()),
            ),
        };
        let path =
            ObjectPath::parse(raw_path.trim_matches('/')).map_err(|e| Error::InvalidLocation {
                uri: original.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Location {
            store,
            root_uri,
            path,
            local: false,
        })
    }

    /// The canonical URI (`file:///abs/path`, `s3://bucket/key`, ...) that manifests record.
    pub fn uri(&self) -> String {
        if self.local {
            return format!("/{}", self.path);
        }
        if self.root_uri == "file://" {
            return format!("file:///{}", self.path);
        }
        if self.path.as_ref().is_empty() {
            self.root_uri.clone()
        } else {
            format!("{}/{}", self.root_uri, self.path)
        }
    }

    pub fn is_local(&self) -> bool {
        self.root_uri == "file://"
    }

    /// The local filesystem path, for local locations.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        self.is_local()
            .then(|| std::path::PathBuf::from(format!("/{}", self.path)))
    }

    /// The last path segment.
    pub fn file_name(&self) -> &str {
        self.path.filename().unwrap_or_default()
    }

    /// A location below this one; `relative` may contain `/` and `..` segments.
    pub fn join(&self, relative: &str) -> Location {
        let mut parts: Vec<String> = self.path.parts().map(|p| p.as_ref().to_string()).collect();
        for segment in relative.split('/') {
            match segment {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                s => parts.push(s.to_string()),
            }
        }
        Location {
            store: self.store.clone(),
            root_uri: self.root_uri.clone(),
            path: ObjectPath::from_iter(parts),
            local: self.local,
        }
    }

    /// The folder that holds this location.
    pub fn parent(&self) -> Location {
        self.join("..")
    }

    /// This location's path relative to `base`, when it lies below it in the same store.
    pub fn relative_to(&self, base: &Location) -> Option<String> {
        if self.root_uri != base.root_uri {
            return None;
        }
        let parts = self.path.prefix_match(&base.path)?;
        let rel: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
        (!rel.is_empty()).then(|| rel.join("/"))
    }

    fn store_error(&self, op: &'static str, source: object_store::Error) -> Error {
        match source {
            object_store::Error::NotFound { .. } => Error::NotFound { uri: self.uri() },
            source => Error::Storage {
                op,
                uri: self.uri(),
                message: source.to_string(),
            },
        }
    }

    pub fn get(&self) -> Result<Bytes, Error> {
        block_on(async {
            let result = self.store.get(&self.path).await?;
            result.bytes().await
        })
        .map_err(|e| self.store_error("read", e))
    }

    /// The whole object, or `None` when there is none (any other failure is an error).
    pub fn get_if_present(&self) -> Result<Option<Bytes>, Error> {
        match self.get() {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The whole object if it is at most `max_bytes` long, else `Err(its size)` without its
    /// body read; `None` when there is none (any other failure is an error).
    pub fn get_at_most(&self, max_bytes: u64) -> Result<Option<Result<Bytes, u64>>, Error> {
        let got = block_on(async {
            let result = self.store.get(&self.path).await?;
            match result.meta.size {
                size if size > max_bytes => Ok(Err(size)),
                _ => result.bytes().await.map(Ok),
            }
        })
        .map_err(|e| self.store_error("read", e));
        match got {
            Ok(got) => Ok(Some(got)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn get_range(&self, range: Range<u64>) -> Result<Bytes, Error> {
        block_on(self.store.get_range(&self.path, range)).map_err(|e| self.store_error("read", e))
    }

    /// A sequential reader from byte `start`: a local file is read directly, an object in a
    /// bucket through ranged requests of a few MiB, so an object of any size streams through a
    /// fixed buffer.
    pub fn reader_from(&self, start: u64) -> Result<Box<dyn std::io::Read + Send>, Error> {
        if let Some(path) = self.local_path() {
            use std::io::{Seek, SeekFrom};
            let mut file = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound { uri: self.uri() },
                _ => self.io_error("read", e),
            })?;
            file.seek(SeekFrom::Start(start))
                .map_err(|e| self.io_error("read", e))?;
            return Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, file)));
        }
        Ok(self.ranged_reader(start, self.size()?))
    }

    /// Reads `start..end` of an object in a bucket, a few MiB per request, for a caller that
    /// already knows the object's size (no second `HEAD`).
    pub fn ranged_reader(&self, start: u64, end: u64) -> Box<dyn std::io::Read + Send> {
        Box::new(RangedReader {
            location: self.clone(),
            position: start,
            end,
            buffer: Bytes::new(),
        })
    }

    fn io_error(&self, op: &'static str, error: std::io::Error) -> Error {
        Error::Storage {
            op,
            uri: self.uri(),
            message: error.to_string(),
        }
    }

    pub fn size(&self) -> Result<u64, Error> {
        block_on(self.store.head(&self.path))
            .map(|meta| meta.size)
            .map_err(|e| self.store_error("stat", e))
    }

    /// Size and change markers of the object here, as the store reports them.
    pub fn info(&self) -> Result<ObjectInfo, Error> {
        let meta =
            block_on(self.store.head(&self.path)).map_err(|e| self.store_error("stat", e))?;
        Ok(ObjectInfo {
            location: self.clone(),
            size: meta.size,
            e_tag: meta.e_tag,
            version: meta.version,
        })
    }

    /// Whether an object (a file, not a folder) is here.
    pub fn exists(&self) -> Result<bool, Error> {
        // Locally a path below a file is an error for object_store ("not a directory");
        // for a caller asking "is there a file here", it is simply "no".
        if let Some(path) = self.local_path() {
            return Ok(path.is_file());
        }
        match block_on(self.store.head(&self.path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_error("stat", e)),
        }
    }

    /// Writes the whole object. Readers see the old object or the new one, never a part:
    /// local files are staged and renamed by object_store, S3/GCS/Azure commit on completion.
    pub fn put(&self, bytes: Bytes) -> Result<(), Error> {
        block_on(async {
            if bytes.len() <= MULTIPART_THRESHOLD {
                self.store
                    .put(&self.path, PutPayload::from_bytes(bytes))
                    .await
                    .map(|_| ())
            } else {
                let upload = self.store.put_multipart(&self.path).await?;
                let mut writer = object_store::WriteMultipart::new(upload);
                writer.write(&bytes);
                writer.finish().await.map(|_| ())
            }
        })
        .map_err(|e| self.store_error("write", e))
    }

    pub fn delete(&self) -> Result<(), Error> {
        match block_on(self.store.delete(&self.path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error("delete", e)),
        }
    }

    /// An object listed below this location, in the same store and spelling.
    fn listed(&self, meta: object_store::ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            location: Location {
                store: self.store.clone(),
                root_uri: self.root_uri.clone(),
                path: meta.location,
                local: self.local,
            },
            size: meta.size,
            e_tag: meta.e_tag,
            version: meta.version,
        }
    }

    /// The objects directly in this folder (not below its subfolders). A missing folder is
    /// empty.
    pub fn list_folder(&self) -> Result<Vec<ObjectInfo>, Error> {
        let prefix = (!self.path.as_ref().is_empty()).then_some(&self.path);
        let listed = match block_on(self.store.list_with_delimiter(prefix)) {
            Ok(listed) => listed.objects,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.store_error("list", e)),
        };
        Ok(listed.into_iter().map(|meta| self.listed(meta)).collect())
    }

    /// Every object below this folder, recursively, sorted by path. A missing folder is empty.
    pub fn list(&self) -> Result<Vec<ObjectInfo>, Error> {
        let prefix = (!self.path.as_ref().is_empty()).then_some(&self.path);
        let listed: Result<Vec<_>, _> = block_on(self.store.list(prefix).try_collect());
        let metas = match listed {
            Ok(metas) => metas,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.store_error("list", e)),
        };
        let mut objects: Vec<ObjectInfo> =
            metas.into_iter().map(|meta| self.listed(meta)).collect();
        objects.sort_by(|a, b| a.location.path.cmp(&b.location.path));
        Ok(objects)
    }
}

/// `a/./b/../c` as `a/c`, without touching the filesystem (`std::path::absolute` keeps `..`,
/// which object_store refuses).
fn lexically_normal(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut normal = std::path::PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

fn percent_decode(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_and_urls_resolve_to_the_same_place() {
        let dir = tempfile::tempdir().unwrap();
        let plain = Location::parse(dir.path().to_str().unwrap()).unwrap();
        let url = Location::parse(&format!("file://{}", dir.path().display())).unwrap();
        assert_eq!(plain, url);
        let name = dir.path().file_name().unwrap().to_str().unwrap();
        let dotted = dir.path().join("x/./..").join(format!("../{name}"));
        assert_eq!(Location::parse(dotted.to_str().unwrap()).unwrap(), plain);
        assert_eq!(plain.uri(), dir.path().display().to_string());
    }

    /// Two containers of one Azure account are two stores, and the URI keeps its container
    /// (it used to come back as `abfss://acct.dfs.core.windows.net/...`, which does not parse).
    #[test]
    fn azure_container_at_account_urls_keep_their_container() {
        let raw = Url::parse("abfss://raw@acct.dfs.core.windows.net/images/a.jpg").unwrap();
        let runs = Url::parse("abfss://runs@acct.dfs.core.windows.net/out").unwrap();
        assert_eq!(bucket_of(&raw), "raw@acct.dfs.core.windows.net");
        assert_ne!(bucket_of(&raw), bucket_of(&runs));
        let secret = Url::parse("abfss://runs:key@acct.dfs.core.windows.net/out").unwrap();
        assert_eq!(bucket_of(&secret), "runs@acct.dfs.core.windows.net");
        let s3 = Url::parse("s3://bucket/key").unwrap();
        assert_eq!(bucket_of(&s3), "bucket");
    }

    #[test]
    fn join_and_relative_to_are_inverse() {
        let base = Location::parse("memory://join/runs/a").unwrap();
        let child = base.join("shards/x.parquet");
        assert_eq!(child.uri(), "memory://join/runs/a/shards/x.parquet");
        assert_eq!(
            child.relative_to(&base).as_deref(),
            Some("shards/x.parquet")
        );
        assert_eq!(base.join("../b").uri(), "memory://join/runs/b");
        assert_eq!(child.parent().file_name(), "shards");
    }

    #[test]
    fn put_get_list_delete_in_memory() {
        let base = Location::parse("memory://crud/prefix").unwrap();
        base.join("b.txt").put(Bytes::from_static(b"bee")).unwrap();
        base.join("a/c.txt")
            .put(Bytes::from_static(b"sea"))
            .unwrap();
        let listed: Vec<String> = base
            .list()
            .unwrap()
            .iter()
            .map(|o| o.location.uri())
            .collect();
        assert_eq!(
            listed,
            ["memory://crud/prefix/a/c.txt", "memory://crud/prefix/b.txt"]
        );
        assert_eq!(base.join("b.txt").get().unwrap().as_ref(), b"bee");
        assert_eq!(
            base.join("a/c.txt").get_range(1..3).unwrap().as_ref(),
            b"ea"
        );
        base.join("b.txt").delete().unwrap();
        assert!(!base.join("b.txt").exists().unwrap());
        assert!(matches!(
            base.join("b.txt").get(),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn unknown_scheme_is_a_clear_error() {
        let err = Location::parse("ftp://host/x").unwrap_err().to_string();
        assert!(
            err.contains("ftp://host/x") && err.contains("unsupported scheme"),
            "{err}"
        );
    }
}
