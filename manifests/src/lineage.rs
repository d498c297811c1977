//! The chain of stages behind a manifest, with a check that each link is still what was read.

use crate::Error;
use crate::manifest::{Manifest, manifest_location};

#[derive(Debug, Clone, PartialEq)]
pub struct LineageEntry {
    pub depth: usize,
    pub name: String,
    pub uri: String,
    pub stage: Option<String>,
    pub digest: String,
    /// `ok`, `changed` (the upstream stage's identity differs from the recorded one, or for a
    /// v1 manifest the upstream manifest's bytes),
    /// `missing`, or `source` (raw data, not a stage).
    pub status: String,
}

/// Walks the inputs of the manifest at `uri`, depth first.
pub fn lineage(uri: &str) -> Result<Vec<LineageEntry>, Error> {
    let location = manifest_location(uri)?;
    let (root, digest) = Manifest::read(&location)?;
    let mut entries = vec![LineageEntry {
        depth: 0,
        name: "self".into(),
        uri: location.uri(),
        stage: Some(root.stage.clone()),
        digest,
        status: "ok".into(),
    }];
    walk(&root, 1, &mut entries)?;
    Ok(entries)
}

fn walk(manifest: &Manifest, depth: usize, entries: &mut Vec<LineageEntry>) -> Result<(), Error> {
    // Manifests form a DAG written forwards in time; the bound only guards a hand-edited cycle.
    if depth > 64 {
        return Err(Error::Usage(
            "lineage deeper than 64 stages: is there a cycle?".into(),
        ));
    }
    for input in &manifest.inputs {
        let mut entry = LineageEntry {
            depth,
            name: input.name.clone(),
            uri: input.uri.clone(),
            stage: input.stage.clone(),
            digest: input.digest.clone(),
            status: "source".into(),
        };
        if input.kind != "manifest" {
            entries.push(entry);
            continue;
        }
        match manifest_location(&input.uri).and_then(|l| Manifest::read(&l)) {
            Ok((upstream, bytes_digest)) => {
                let now = if manifest.is_v1() {
                    bytes_digest
                } else {
                    upstream.identity()
                };
                entry.status = if now == input.digest { "ok" } else { "changed" }.into();
                entries.push(entry);
                walk(&upstream, depth + 1, entries)?;
            }
            Err(Error::NotFound { .. }) => {
                entry.status = "missing".into();
                entries.push(entry);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
