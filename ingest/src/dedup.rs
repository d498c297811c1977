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
use manifests::{Artifact, Manifest, StageRun};

pub const STAGE: &str = "ingest.dedup";

/// Nothing to configure: the rule is the one `ingest pairs` applies within a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {}

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
    let mut seen: HashMap<String, String> = HashMap::new();
    let (mut artifacts, mut rows_kept, mut duplicates) = (Vec::new(), 0u64, 0u64);
    for (index, artifact) in upstream
        .artifacts_of_kind(pairs::KIND)
        .into_iter()
        .enumerate()
    {
        let location = upstream.artifact_location(artifact)?;
        let rows = pairs::from_parquet(&location.uri(), upstream.read_artifact(artifact)?)?;
        let total = rows.len();
        let mut kept = Vec::with_capacity(total);
        for row in rows {
            match seen.get(&row.sha256) {
                Some(origin) if *origin != row.source => duplicates += 1,
                _ => {
                    seen.insert(row.sha256.clone(), row.source.clone());
                    kept.push(row);
                }
            }
        }
        rows_kept += kept.len() as u64;
        if kept.len() == total {
            artifacts.push(Artifact {
                uri: location.uri(),
                ..artifact.clone()
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
