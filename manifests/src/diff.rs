//! `manifests diff A B`: what differs between two runs, stage by stage: which stages each has,
//! their configs, the raw data and other runs' stages they read, the artifacts they wrote and
//! their metrics, timings left out. Run the pipeline before and after an upgrade or a refactor, and
//! this says whether any result changed, and in which stage first.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::Error;
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::stage::value_differences;
use crate::status::stage_manifests;
use crate::storage::Location;

/// How one stage found in both runs differs; `differences` is empty when it does not.
#[derive(Debug, Clone)]
pub struct StageDiff {
    /// The manifest's path below the run, e.g. `parti/manifest.json`.
    pub manifest: String,
    pub stage: String,
    pub differences: Vec<String>,
}

/// What [`diff`] found.
#[derive(Debug, Clone, Default)]
pub struct RunDiff {
    /// Stage manifests of the first run that the second lacks, and the other way round.
    pub only_in_first: Vec<String>,
    pub only_in_second: Vec<String>,
    /// Every manifest both runs have, in path order.
    pub stages: Vec<StageDiff>,
}

impl RunDiff {
    pub fn is_same(&self) -> bool {
        self.only_in_first.is_empty()
            && self.only_in_second.is_empty()
            && self.stages.iter().all(|stage| stage.differences.is_empty())
    }
}

/// A run's stage manifests by their path below it; an error naming the run when it has none
/// (a mistyped folder is not a run whose every stage is missing).
fn manifests_below(run: &Location) -> Result<BTreeMap<String, Manifest>, Error> {
    let found = stage_manifests(run)?;
    if found.is_empty() {
        return Err(Error::Usage(format!("{run}: no stage manifests below it")));
    }
    // A batch array's partial manifests beside their merged one say nothing the merged one does
    // not, and their number depends on how many jobs ran.
    let is_merged = |location: &Location| location.file_name() == MANIFEST_FILE;
    let merged_folders: BTreeSet<String> = found
        .iter()
        .filter(|(location, _, _)| is_merged(location))
        .map(|(location, _, _)| location.parent().uri())
        .collect();
    Ok(found
        .into_iter()
        .filter(|(location, _, _)| {
            is_merged(location) || !merged_folders.contains(&location.parent().uri())
        })
        .map(|(location, manifest, _)| {
            let path = location.relative_to(run).unwrap_or_else(|| location.uri());
            (path, manifest)
        })
        .collect())
}

/// Compares the stage manifests below `first` and `second`, matched by their path below each.
pub fn diff(first: &Location, second: &Location) -> Result<RunDiff, Error> {
    let (firsts, seconds) = (manifests_below(first)?, manifests_below(second)?);
    let identities = |run: &BTreeMap<String, Manifest>| -> BTreeSet<String> {
        run.values().map(Manifest::identity).collect()
    };
    let (first_run, second_run) = (identities(&firsts), identities(&seconds));
    let only = |these: &BTreeMap<String, Manifest>, those: &BTreeMap<String, Manifest>| {
        these
            .keys()
            .filter(|path| !those.contains_key(*path))
            .cloned()
            .collect()
    };
    Ok(RunDiff {
        only_in_first: only(&firsts, &seconds),
        only_in_second: only(&seconds, &firsts),
        stages: firsts
            .iter()
            .filter_map(|(path, before)| {
                let after = seconds.get(path)?;
                Some(StageDiff {
                    manifest: path.clone(),
                    stage: before.stage.clone(),
                    differences: stage_differences((&first_run, before), (&second_run, after)),
                })
            })
            .collect(),
    })
}

/// Metrics that time the run rather than say what it computed.
fn is_timing(key: &str) -> bool {
    key == "seconds" || key.ends_with("_seconds") || key.contains("per_second")
}

/// `metrics` without its timings, at any depth.
fn untimed(metrics: &Value) -> Value {
    match metrics {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(key, _)| !is_timing(key))
                .map(|(key, value)| (key.clone(), untimed(value)))
                .collect(),
        ),
        Value::Array(values) => Value::Array(values.iter().map(untimed).collect()),
        other => other.clone(),
    }
}

/// The identities of what a stage read from outside its run, by input name: raw data by
/// content, and upstream stages of other runs. An upstream stage of the run itself (`run`: the
/// identities of its stages) is compared where it is; its identity changes whenever any of its
/// artifacts does, so comparing it here too would only echo that stage's difference down the
/// chain. Told by identity, not path: a run moved or named through a link still records its
/// upstream stages by the path it was run with.
fn outside_inputs(run: &BTreeSet<String>, manifest: &Manifest) -> BTreeMap<String, String> {
    manifest
        .inputs
        .iter()
        .filter(|input| input.kind != "manifest" || !run.contains(&input.digest))
        .map(|input| (input.name.clone(), input.digest.clone()))
        .collect()
}

/// How the stage `after` differs from `before`, in words, as `what: BEFORE -> AFTER`; `first`
/// and `second` are the identities of the stages of their runs.
fn stage_differences(
    (first, before): (&BTreeSet<String>, &Manifest),
    (second, after): (&BTreeSet<String>, &Manifest),
) -> Vec<String> {
    let mut out = Vec::new();
    if before.stage != after.stage {
        out.push(format!("stage: {} -> {}", before.stage, after.stage));
    }
    // Manifests of two schema versions identify configs and raw data by different rules, so
    // their hashes and source digests say nothing about each other.
    let comparable = before.schema == after.schema;
    if !comparable {
        out.push(format!(
            "schema: {} -> {} (config hashes and raw data are identified differently)",
            before.schema, after.schema
        ));
    }
    if comparable && before.config_hash != after.config_hash {
        out.push(format!(
            "config hash: {} -> {}",
            before.config_hash, after.config_hash
        ));
    }
    if !comparable || before.config_hash != after.config_hash {
        // Every field as recorded, those the hash leaves out (where data is, how often to
        // checkpoint) included.
        let mut fields = Vec::new();
        value_differences("", &before.config, &after.config, &mut fields);
        out.extend(
            fields
                .into_iter()
                .map(|(path, was, is)| format!("config {path}: {was} -> {is}")),
        );
    }
    if comparable {
        digest_differences(
            "input",
            &outside_inputs(first, before),
            &outside_inputs(second, after),
            &mut out,
        );
    }
    let artifacts = |manifest: &Manifest| -> BTreeMap<String, String> {
        manifest
            .artifacts
            .iter()
            .map(|artifact| (artifact.uri.clone(), artifact.digest.clone()))
            .collect()
    };
    digest_differences("artifact", &artifacts(before), &artifacts(after), &mut out);
    let mut metrics = Vec::new();
    value_differences(
        "",
        &untimed(&Value::Object(before.metrics.clone())),
        &untimed(&Value::Object(after.metrics.clone())),
        &mut metrics,
    );
    out.extend(
        metrics
            .into_iter()
            .map(|(path, was, is)| format!("metric {path}: {was} -> {is}")),
    );
    out
}

/// The names whose digests differ between `before` and `after`, or that only one has, as
/// `what NAME: ...`.
fn digest_differences(
    what: &str,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    out: &mut Vec<String>,
) {
    for name in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        match (before.get(name), after.get(name)) {
            (Some(was), Some(is)) if was == is => {}
            (Some(_), Some(_)) => out.push(format!("{what} {name}: other contents")),
            (Some(_), None) => out.push(format!("{what} {name}: only in the first")),
            (None, _) => out.push(format!("{what} {name}: only in the second")),
        }
    }
}
