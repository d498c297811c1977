//! The manifest: one versioned JSON document per stage run, the only contract between stages.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::storage::Location;
use crate::{Error, digest_bytes};

/// What every run writes. v2 records inputs by content identity (see [`Input`]).
pub const SCHEMA: &str = "parti.manifest/v2";
/// Written before inputs were identified by content: an input's `digest` is the bytes of the
/// upstream manifest, or a listing of names, sizes and change markers of the raw source. Still
/// read and verified; a stage judges its own v1 manifest by the v1 rule (see `StageRun`).
pub const SCHEMA_V1: &str = "parti.manifest/v1";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

/// Which slice of the input a cloud batch job handled; absent on a whole or merged run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: u32,
    pub count: u32,
}

impl ShardSpec {
    pub fn single() -> ShardSpec {
        ShardSpec { index: 0, count: 1 }
    }

    pub fn is_single(&self) -> bool {
        self.count == 1
    }
}

/// The contiguous slice of `n` units that job `shard.index` of `shard.count` handles.
pub fn job_range(n: usize, shard: ShardSpec) -> std::ops::Range<usize> {
    // In u128: `index * n` overflows a usize for a count a file's footer can claim.
    debug_assert!(shard.index < shard.count.max(1), "{shard:?}");
    let (count, n) = (u128::from(shard.count.max(1)), n as u128);
    let bound = |index: u128| (index * n / count) as usize;
    bound(u128::from(shard.index))..bound(u128::from(shard.index) + 1)
}

/// Something a stage read: an upstream manifest (`kind = "manifest"`) or raw source data
/// (`kind = "source"`). `digest` is its identity, never its location: for an upstream stage
/// [`Manifest::identity`] (its config hash and artifact digests), for raw data a digest over its
/// files' names and contents (see the `sources` module). `uri` records where it was read this time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    /// The role this input plays, e.g. `pairs`, `tokens`, `source`.
    pub name: String,
    pub uri: String,
    pub kind: String,
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// An upstream stage's config hash, to tell a changed setting from changed data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Raw data: the file or folder listed whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listed: Option<String>,
    /// Raw data: every file read, with its content digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<SourceFile>,
}

impl Input {
    /// Same role, kind and identity: where it was read from does not matter.
    pub fn same_identity(&self, other: &Input) -> bool {
        self.name == other.name
            && self.kind == other.kind
            && self.digest == other.digest
            && self.stage == other.stage
    }
}

/// One file a stage read, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Relative to the listed folder (empty for a listed single file), or as the list names it.
    pub name: String,
    pub uri: String,
    pub bytes: u64,
    /// Local files: modification time in nanoseconds since 1970, the fast check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<u64>,
    /// `blake3:...` of the bytes (local files), `etag:...`/`version:...` (bucket objects), or
    /// `missing` (named by a list, not there).
    pub digest: String,
    /// Named by a list rather than found by listing `Input::listed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub named: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Relative to the manifest's folder, or absolute.
    pub uri: String,
    /// e.g. `parquet/pairs`, `parquet/text`, `parquet/tokens`, `checkpoint`, `tokenizer`.
    pub kind: String,
    pub bytes: u64,
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub stage: String,
    pub created_at: String,
    pub tool: Tool,
    pub config: Value,
    pub config_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardSpec>,
    pub inputs: Vec<Input>,
    pub artifacts: Vec<Artifact>,
    pub metrics: Map<String, Value>,
}

/// The manifest of one job of a batch array: `manifest.part-IIIII-of-NNNNN.json`.
pub fn is_part_manifest(file_name: &str) -> bool {
    file_name.starts_with("manifest.part-") && file_name.ends_with(".json")
}

/// A folder URI means the `manifest.json` inside it.
pub fn manifest_location(uri: &str) -> Result<Location, Error> {
    let location = Location::parse(uri)?;
    Ok(if uri.ends_with(".json") {
        location
    } else {
        location.join(MANIFEST_FILE)
    })
}

/// Serialises a config canonically (object keys sorted) and hashes it, so the same effective
/// config always has the same hash whatever order it was written in.
pub fn config_hash(config: &Value) -> String {
    // serde_json's Map is a BTreeMap (no `preserve_order`), so serialisation is key-sorted.
    digest_bytes(config.to_string().as_bytes())
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// A problem found while verifying a manifest's artifacts.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub uri: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.uri, self.what)
    }
}

impl Manifest {
    /// Reads a manifest and returns it with the digest of its bytes (what downstream stages
    /// record as their input digest).
    pub fn read(location: &Location) -> Result<(Manifest, String), Error> {
        let bytes = location.get()?;
        let manifest = Self::from_slice(&bytes, location)?;
        Ok((manifest, digest_bytes(&bytes)))
    }

    pub fn from_slice(bytes: &[u8], location: &Location) -> Result<Manifest, Error> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::InvalidManifest {
                uri: location.uri(),
                reason: e.to_string(),
            })?;
        if manifest.schema != SCHEMA && manifest.schema != SCHEMA_V1 {
            return Err(Error::InvalidManifest {
                uri: location.uri(),
                reason: format!(
                    "schema '{}' is neither '{SCHEMA}' nor '{SCHEMA_V1}' (written by a newer parti?)",
                    manifest.schema
                ),
            });
        }
        Ok(manifest)
    }

    pub fn is_v1(&self) -> bool {
        self.schema == SCHEMA_V1
    }

    /// What a downstream stage records as this stage's identity: its stage, config hash, shard
    /// and artifact digests, not when it ran or what it measured. A rerun that writes the same
    /// artifacts under the same config leaves every stage below it up to date (early cutoff).
    pub fn identity(&self) -> String {
        let mut artifacts: Vec<(&str, &str)> = self
            .artifacts
            .iter()
            .map(|a| (a.uri.as_str(), a.digest.as_str()))
            .collect();
        artifacts.sort_unstable();
        let identity = serde_json::json!({
            "stage": self.stage,
            "config_hash": self.config_hash,
            "shard": self.shard,
            "artifacts": artifacts,
        });
        digest_bytes(identity.to_string().as_bytes())
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        Bytes::from(text)
    }

    /// Writes the manifest in one atomic put; returns the digest of what was written.
    pub fn write(&self, location: &Location) -> Result<String, Error> {
        let bytes = self.to_bytes();
        let digest = digest_bytes(&bytes);
        location.put(bytes)?;
        Ok(digest)
    }

    /// Where an artifact lives, given the location of this manifest.
    pub fn artifact_location(
        manifest_location: &Location,
        artifact: &Artifact,
    ) -> Result<Location, Error> {
        if artifact.uri.contains("://") || artifact.uri.starts_with('/') {
            Location::parse(&artifact.uri)
        } else {
            Ok(manifest_location.parent().join(&artifact.uri))
        }
    }

    pub fn artifacts_of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Artifact> {
        self.artifacts.iter().filter(move |a| a.kind == kind)
    }

    pub fn metric_u64(&self, name: &str) -> Option<u64> {
        self.metrics.get(name).and_then(Value::as_u64)
    }

    /// A numeric metric, NaN when missing (for summaries printed by the stage binaries).
    pub fn metric_f64(&self, name: &str) -> f64 {
        self.metrics
            .get(name)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }

    /// Checks every artifact: existence and size always, content digest when `full`.
    pub fn verify(&self, manifest_location: &Location, full: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        for artifact in &self.artifacts {
            let location = match Self::artifact_location(manifest_location, artifact) {
                Ok(location) => location,
                Err(e) => {
                    problems.push(Problem {
                        uri: artifact.uri.clone(),
                        what: e.to_string(),
                    });
                    continue;
                }
            };
            let check = if full {
                read_verified(&location, artifact).map(|_| ())
            } else {
                location
                    .size()
                    .and_then(|size| check_size(&location, artifact, size))
            };
            if let Err(e) = check {
                problems.push(Problem {
                    uri: location.uri(),
                    what: e.to_string(),
                });
            }
        }
        problems
    }
}

fn check_size(location: &Location, artifact: &Artifact, size: u64) -> Result<(), Error> {
    if size != artifact.bytes {
        return Err(Error::SizeMismatch {
            uri: location.uri(),
            expected: artifact.bytes,
            actual: size,
        });
    }
    Ok(())
}

/// Reads an artifact and refuses it unless its size and digest match the manifest.
pub fn read_verified(location: &Location, artifact: &Artifact) -> Result<Bytes, Error> {
    let bytes = location.get()?;
    check_size(location, artifact, bytes.len() as u64)?;
    let actual = digest_bytes(&bytes);
    if actual != artifact.digest {
        return Err(Error::DigestMismatch {
            uri: location.uri(),
            expected: artifact.digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ranges_tile_any_count_without_overflow() {
        for n in [0, 1, 7, 1000, usize::MAX / 3, usize::MAX] {
            for count in [1u32, 2, 3, 1000, u32::MAX] {
                let range = |index| job_range(n, ShardSpec { index, count });
                assert_eq!(range(0).start, 0, "{n} in {count}");
                assert_eq!(range(count - 1).end, n, "{n} in {count}");
                for index in [1, count / 2, count - 1].into_iter().filter(|i| *i > 0) {
                    assert_eq!(range(index - 1).end, range(index).start, "{n} in {count}");
                }
            }
        }
    }
}
