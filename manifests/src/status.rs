//! `manifests status RUN`: for each stage under a run, up to date or stale and why, without
//! running anything (think `make -n` or `dvc status`). A stage's own settings come from the
//! command that runs it, so status judges what the manifests recorded: whether the artifacts
//! are intact, the raw sources unchanged, and each upstream stage still the one that was read.

use std::collections::BTreeMap;

use crate::Error;
use crate::manifest::{MANIFEST_FILE, Manifest, is_part_manifest};
use crate::sources::recheck;
use crate::stage::{Upstream, changed_input};
use crate::storage::Location;

/// One stage's manifest under the run and its verdict.
#[derive(Debug, Clone)]
pub struct StageStatus {
    pub location: Location,
    pub stage: String,
    /// Why it would rerun; `None` when up to date.
    pub stale: Option<String>,
}

/// A manifest read once: where it is, what it says, and the digest of its bytes (how a v1
/// manifest identified it).
pub type FoundManifest = (Location, Manifest, String);

/// The stage manifests below `run` (a batch job's partial ones included, a running stage's
/// work folders left out), read, in the order of their URIs.
pub fn stage_manifests(run: &Location) -> Result<Vec<FoundManifest>, Error> {
    let mut manifests = Vec::new();
    for object in run.list()? {
        let name = object.location.file_name();
        let is_manifest = name == MANIFEST_FILE || is_part_manifest(name);
        let in_work_folder = object
            .location
            .relative_to(run)
            .is_some_and(|relative| relative.split('/').any(|part| part == "_work"));
        if is_manifest && !in_work_folder {
            let (manifest, digest) = Manifest::read(&object.location)?;
            manifests.push((object.location, manifest, digest));
        }
    }
    manifests.sort_by_key(|(location, _, _)| location.uri());
    Ok(manifests)
}

/// Every manifest below `run`, upstream stages before the stages that read them.
pub fn status(run: &Location) -> Result<Vec<StageStatus>, Error> {
    let manifests: BTreeMap<String, FoundManifest> = stage_manifests(run)?
        .into_iter()
        .map(|read| (read.0.uri(), read))
        .collect();
    let mut judged: BTreeMap<String, StageStatus> = BTreeMap::new();
    let mut statuses = Vec::new();
    for uri in ordering(&manifests)? {
        let (location, manifest, _) = &manifests[&uri];
        let status = StageStatus {
            location: location.clone(),
            stage: manifest.stage.clone(),
            stale: judge(location, manifest, &manifests, &judged)?,
        };
        judged.insert(uri, status.clone());
        statuses.push(status);
    }
    Ok(statuses)
}

fn ordering(manifests: &BTreeMap<String, FoundManifest>) -> Result<Vec<String>, Error> {
    let mut order = Vec::new();
    for uri in manifests.keys() {
        visit(uri, manifests, &mut order, 0)?;
    }
    Ok(order)
}

/// Depth first over upstream links that stay inside the run.
fn visit(
    uri: &str,
    manifests: &BTreeMap<String, FoundManifest>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<(), Error> {
    if order.iter().any(|done| done == uri) {
        return Ok(());
    }
    // Manifests form a DAG written forwards in time; the bound only guards a hand-edited cycle.
    if depth > 64 {
        return Err(Error::Usage(format!(
            "{uri}: upstream chain deeper than 64 stages: is there a cycle?"
        )));
    }
    if let Some((_, manifest, _)) = manifests.get(uri) {
        for input in manifest.inputs.iter().filter(|i| i.kind == "manifest") {
            if manifests.contains_key(&input.uri) {
                visit(&input.uri, manifests, order, depth + 1)?;
            }
        }
        order.push(uri.to_string());
    }
    Ok(())
}

/// Why the stage of `manifest` is stale, if it is; upstream manifests under the run come from
/// `read`, the others are read now.
fn judge(
    location: &Location,
    manifest: &Manifest,
    read: &BTreeMap<String, FoundManifest>,
    judged: &BTreeMap<String, StageStatus>,
) -> Result<Option<String>, Error> {
    if let Some(problem) = manifest.verify(location, true).first() {
        return Ok(Some(format!("artifact changed: {problem}")));
    }
    for input in &manifest.inputs {
        if input.kind == "manifest" {
            if let Some(upstream) = judged.get(&input.uri)
                && upstream.stale.is_some()
            {
                return Ok(Some(format!("upstream {} is stale", upstream.stage)));
            }
            let (upstream, bytes_digest) = match read.get(&input.uri) {
                Some((location, manifest, digest)) => {
                    let upstream = Upstream {
                        manifest: manifest.clone(),
                        location: location.clone(),
                    };
                    (upstream, digest.clone())
                }
                None => match Upstream::read(&input.uri) {
                    Ok(read) => read,
                    Err(Error::NotFound { .. }) => {
                        return Ok(Some(format!("upstream manifest {} is gone", input.uri)));
                    }
                    Err(e) => return Err(e),
                },
            };
            let changed = if manifest.is_v1() {
                (bytes_digest != input.digest).then(|| {
                    format!(
                        "upstream {} ({}) was rewritten",
                        upstream.manifest.stage, input.uri
                    )
                })
            } else {
                let now = upstream.as_input(&input.name);
                changed_input(std::slice::from_ref(input), &[now])
            };
            if changed.is_some() {
                return Ok(changed);
            }
        } else if manifest.is_v1() || (input.listed.is_none() && input.files.is_empty()) {
            return Ok(Some(format!(
                "source '{}' was recorded by {} without its files; the stage's next run decides",
                input.name, manifest.schema
            )));
        } else {
            let now = recheck(input)?;
            if let Some(changed) = changed_input(std::slice::from_ref(input), &[now]) {
                return Ok(Some(changed));
            }
        }
    }
    Ok(None)
}
