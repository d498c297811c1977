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
    /// `ok`, `changed` (the upstream manifest's digest differs from the recorded one),
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
            Ok((upstream, digest)) => {
                entry.status = if digest == input.digest {
                    "ok"
                } else {
                    "changed"
                }
                .into();
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
