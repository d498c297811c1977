//! `manifests diff A B`: what differs between two runs, stage by stage: which stages each has,
//! their configs (the fields the config hash covers), the raw data they read, the artifacts
//! they wrote and their metrics, timings left out. Run the pipeline before and after an upgrade
//! or a refactor, and this says whether any result changed, and where first.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::Error;
use crate::manifest::Manifest;
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

/// Compares the stage manifests below `first` and `second`, matched by their path below each.
pub fn diff(first: &Location, second: &Location) -> Result<RunDiff, Error> {
    let below = |run: &Location| -> Result<BTreeMap<String, Manifest>, Error> {
        Ok(stage_manifests(run)?
            .into_iter()
            .map(|(location, manifest, _)| {
                let path = location.relative_to(run).unwrap_or_else(|| location.uri());
                (path, manifest)
            })
            .collect())
    };
    let (a, b) = (below(first)?, below(second)?);
    let only = |x: &BTreeMap<String, Manifest>, y: &BTreeMap<String, Manifest>| {
        x.keys()
            .filter(|path| !y.contains_key(*path))
            .cloned()
            .collect()
    };
    Ok(RunDiff {
        only_in_first: only(&a, &b),
        only_in_second: only(&b, &a),
        stages: a
            .iter()
            .filter_map(|(path, x)| {
                let y = b.get(path)?;
                Some(StageDiff {
                    manifest: path.clone(),
                    stage: x.stage.clone(),
                    differences: stage_differences(x, y),
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
        other => other.clone(),
    }
}

/// How `b` differs from `a`, in words, as `what: A -> B`.
fn stage_differences(a: &Manifest, b: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    if a.stage != b.stage {
        out.push(format!("stage: {} -> {}", a.stage, b.stage));
    }
    if a.config_hash != b.config_hash {
        let mut fields = Vec::new();
        value_differences("", &a.config, &b.config, &mut fields);
        if fields.is_empty() {
            // The same fields hashed by another rule (another version of the stage).
            out.push(format!(
                "config hash: {} -> {}",
                a.config_hash, b.config_hash
            ));
        }
        out.extend(
            fields
                .into_iter()
                .map(|(path, x, y)| format!("config {path}: {x} -> {y}")),
        );
    }
    // Raw data by content. Upstream stages are compared where they are themselves; their
    // identity changes whenever any of their artifacts does, so repeating it here would only
    // echo that stage's difference down the chain.
    let sources = |manifest: &Manifest| -> BTreeMap<String, String> {
        manifest
            .inputs
            .iter()
            .filter(|input| input.kind != "manifest")
            .map(|input| (input.name.clone(), input.digest.clone()))
            .collect()
    };
    digest_differences("source", &sources(a), &sources(b), &mut out);
    let artifacts = |manifest: &Manifest| -> BTreeMap<String, String> {
        manifest
            .artifacts
            .iter()
            .map(|artifact| (artifact.uri.clone(), artifact.digest.clone()))
            .collect()
    };
    digest_differences("artifact", &artifacts(a), &artifacts(b), &mut out);
    let mut metrics = Vec::new();
    value_differences(
        "",
        &untimed(&Value::Object(a.metrics.clone())),
        &untimed(&Value::Object(b.metrics.clone())),
        &mut metrics,
    );
    out.extend(
        metrics
            .into_iter()
            .map(|(path, x, y)| format!("metric {path}: {x} -> {y}")),
    );
    out
}

/// The names whose digests differ between `x` and `y`, or that only one has, as `what NAME: ...`.
fn digest_differences(
    what: &str,
    x: &BTreeMap<String, String>,
    y: &BTreeMap<String, String>,
    out: &mut Vec<String>,
) {
    for name in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
        match (x.get(name), y.get(name)) {
            (Some(p), Some(q)) if p == q => {}
            (Some(_), Some(_)) => out.push(format!("{what} {name}: other contents")),
            (Some(_), None) => out.push(format!("{what} {name}: only in the first")),
            (None, _) => out.push(format!("{what} {name}: only in the second")),
        }
    }
}
