//! `ingest dedup`: duplicates across the jobs of a batch array.
//!
//! Each job drops duplicates within its own slice, but cannot see the others'. After
//! `manifests merge`, this stage walks the merged shards in order (job, then shard) and keeps the
//! first copy of each image, exactly as a single job would have. Shards without duplicates are
//! referenced where they are (by absolute URI and digest), so only the few shards that change
//! are rewritten.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::{Error, RunOptions, Tally, tool};
use manifests::shards::pairs;
use manifests::{Artifact, Location, Manifest, StageRun};
use rayon::prelude::*;

pub const STAGE: &str = "ingest.dedup";

/// How many shards `ingest dedup` reads at once.
const SHARDS_IN_FLIGHT: usize = 16;

/// Nothing to configure: the rule is the one `ingest pairs` applies within a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {}

/// The images kept so far, by content, each with the origin it was first kept from: an image
/// kept before from another origin is a duplicate (a COCO image with five captions is one
/// origin, not five duplicates). Both are held as 128-bit BLAKE3 prefixes instead of the hex
/// digest and the origin's URL: about a quarter of the memory (BENCHMARKS.md), which is what
/// `ingest dedup` holds for a whole batch array's rows, and a job for its own.
#[derive(Default)]
pub struct SeenImages(HashMap<u128, u128>);

impl SeenImages {
    fn id(text: &str) -> u128 {
        let hash = blake3::hash(text.as_bytes());
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&hash.as_bytes()[..16]);
        u128::from_le_bytes(prefix)
    }

    /// Whether the image `sha256` from `source` is a duplicate; if not, it is kept, and its
    /// first origin recorded.
    pub fn is_duplicate(&mut self, sha256: &str, source: &str) -> bool {
        let source = Self::id(source);
        *self.0.entry(Self::id(sha256)).or_insert(source) != source
    }

    /// Records a row kept by an earlier run, as [`SeenImages::is_duplicate`] would have.
    pub fn kept(&mut self, sha256: &str, source: &str) {
        self.is_duplicate(sha256, source);
    }
}

pub fn dedup(pairs_uri: &str, options: &RunOptions) -> Result<Manifest, Error> {
    let mut run = StageRun::new(
        STAGE,
        tool(),
        &options.out,
        &DedupConfig::default(),
        options.shard,
    )?;
    let upstream = run.upstream("pairs", pairs_uri)?;
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }
    let mut seen = SeenImages::default();
    let (mut artifacts, mut rows_kept, mut duplicates) = (Vec::new(), 0u64, 0u64);
    let shards = upstream.artifacts_of_kind(pairs::KIND);
    // Fetching, digest-checking and parsing a shard is most of the work, and a bucket serves
    // many at once: they are read SHARDS_IN_FLIGHT at a time, then judged in order.
    let readers = rayon::ThreadPoolBuilder::new()
        .num_threads(SHARDS_IN_FLIGHT)
        .build()
        .map_err(|e| Error::Io(format!("cannot start threads to read shards: {e}")))?;
    let read = |artifact: &&Artifact| -> Result<(Location, Vec<pairs::PairRow>), Error> {
        let location = upstream.artifact_location(artifact)?;
        let rows = pairs::from_parquet(&location.uri(), upstream.read_artifact(artifact)?)?;
        Ok((location, rows))
    };
    let mut index = 0;
    for window in shards.chunks(SHARDS_IN_FLIGHT) {
        let window_rows: Vec<_> = readers.install(|| window.par_iter().map(read).collect());
        for (artifact, shard) in window.iter().zip(window_rows) {
            let (location, rows) = shard?;
            let total = rows.len();
            let mut kept = Vec::with_capacity(total);
            for row in rows {
                match seen.is_duplicate(&row.sha256, &row.source) {
                    true => duplicates += 1,
                    false => kept.push(row),
                }
            }
            rows_kept += kept.len() as u64;
            if kept.len() == total {
                artifacts.push(Artifact {
                    uri: location.uri(),
                    ..(*artifact).clone()
                });
            } else {
                let name = format!("pairs/dedup-{index:05}.parquet");
                let bytes = pairs::to_parquet(&run.out().join(&name).uri(), &kept)?;
                artifacts.push(run.write_artifact(
                    &name,
                    pairs::KIND,
                    bytes,
                    Some(kept.len() as u64),
                )?);
            }
            index += 1;
        }
    }
    // The upstream's rejection counts carry over; cross-job duplicates join its `duplicate`s.
    let mut tally = Tally::default();
    tally.add_note(&upstream.manifest.metrics.clone().into(), rows_kept);
    *tally.rejected.entry("duplicate".into()).or_default() += duplicates;
    let mut metrics = tally.metrics();
    metrics.insert("cross_job_duplicates".into(), json!(duplicates));
    let manifest = run.publish(artifacts, metrics)?;
    info!("ingest dedup: {rows_kept} rows, {duplicates} duplicates across jobs removed");
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_a_duplicate_only_from_another_origin_than_its_first() {
        let mut seen = SeenImages::default();
        let (a, b) = ("9f".repeat(32), "0e".repeat(32));
        assert!(!seen.is_duplicate(&a, "coco/1.jpg"));
        assert!(
            !seen.is_duplicate(&a, "coco/1.jpg"),
            "another caption of the same image"
        );
        assert!(seen.is_duplicate(&a, "https://x.org/copy.jpg"));
        assert!(!seen.is_duplicate(&b, "https://x.org/copy.jpg"));
        seen.kept(&"11".repeat(32), "first.jpg");
        assert!(seen.is_duplicate(&"11".repeat(32), "second.jpg"));
        assert!(!seen.is_duplicate(&"11".repeat(32), "first.jpg"));
        assert!(
            !seen.is_duplicate(&a, "coco/1.jpg"),
            "the first origin stays the one kept"
        );
    }
}
