//! Manifests and storage: the contract that connects parti's stage binaries.
//!
//! Every stage run writes one manifest (`parti.manifest/v2`) recording its effective config and
//! hash, the inputs it read (by content identity, see [`sources`]), the artifacts it wrote (with sizes,
//! digests and row counts) and its metrics. [`StageRun`] implements the behaviour every stage
//! shares: skip when unchanged, write artifacts before the manifest, resume finished artifacts
//! after a crash, and refuse inputs whose digests do not match. [`shards`] holds the formats of
//! the data shards the stages hand each other, each with its one reader and writer.

pub mod cli;
pub mod config;
pub mod diff;
pub mod lineage;
pub mod manifest;
pub mod merge;
pub mod progress;
pub mod shards;
pub mod sources;
pub mod stage;
pub mod status;
pub mod storage;
pub mod table;
#[doc(hidden)]
pub mod testing;

pub use manifest::{
    Artifact, Input, MANIFEST_FILE, Manifest, Problem, SCHEMA, SCHEMA_V1, ShardSpec, Tool,
    job_range, manifest_location,
};
pub use stage::{Finished, Freshness, OtherCheckpoint, StageRun, Upstream};
pub use storage::{Location, ObjectInfo};

/// `blake3:<hex>`: the digest used for artifacts, manifests and configs.
pub fn digest_bytes(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid location '{uri}': {reason}")]
    InvalidLocation { uri: String, reason: String },
    #[error("{uri}: not found")]
    NotFound { uri: String },
    #[error("cannot {op} {uri}: {message}")]
    Storage {
        op: &'static str,
        uri: String,
        message: String,
    },
    #[error("{uri}: not a valid parti manifest: {reason}")]
    InvalidManifest { uri: String, reason: String },
    #[error("{uri}: size is {actual} bytes but the manifest says {expected}")]
    SizeMismatch {
        uri: String,
        expected: u64,
        actual: u64,
    },
    #[error("{uri}: digest is {actual} but the manifest says {expected} (modified or corrupt)")]
    DigestMismatch {
        uri: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{uri} is not what this run's identity of it was taken from ({recorded}): reading it \
         found {now}; {why}. Run the stage again"
    )]
    SourceChanged {
        uri: String,
        recorded: String,
        now: String,
        why: &'static str,
    },
    #[error("config {source_name}: {reason}")]
    Config { source_name: String, reason: String },
    #[error("cannot merge manifests: {0}")]
    Merge(String),
    #[error("{uri}: {reason}")]
    Table { uri: String, reason: String },
    #[error("{0}")]
    Usage(String),
}
