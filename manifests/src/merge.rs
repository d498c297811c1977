//! Joins the partial manifests written by the jobs of a cloud batch array into one.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::Error;
use crate::manifest::{self, Artifact, Input, Manifest, SourceFile};
use crate::sources;
use crate::storage::Location;

/// Merges job manifests (each with `shard = {index, count}`) into the manifest of the whole run,
/// as if one job had done everything. Every job of the array must be present exactly once and
/// all must share stage, config and inputs, except for each job's share of a source: each job
/// looks only at the files its own rows name or it reads, and the run's input holds them all
/// (see [`merge_inputs`]). Integer metrics
/// (row and rejection counts) are summed, except those that describe the artifacts
/// ([`SAME_IN_EVERY_JOB`]); other numbers are averaged over jobs.
pub fn merge(out: &Location, parts: &[(Location, Manifest)]) -> Result<Manifest, Error> {
    let Some((_, first)) = parts.first() else {
        return Err(Error::Merge("no partial manifests given".into()));
    };
    let count = first
        .shard
        .ok_or_else(|| {
            Error::Merge(format!(
                "{} is not a partial manifest (no shard)",
                parts[0].0
            ))
        })?
        .count;
    // A job whose rows name no file of a list that is an upstream stage's artifact records no
    // input of named files, where its neighbours do: the job with the most inputs has them all.
    let (all_location, all_inputs) = parts
        .iter()
        .map(|(location, part)| (location, &part.inputs))
        .fold((&parts[0].0, &first.inputs), |most, (location, inputs)| {
            if inputs.len() > most.1.len() {
                (location, inputs)
            } else {
                most
            }
        });
    let mut seen = BTreeSet::new();
    for (location, part) in parts {
        let shard = part.shard.ok_or_else(|| {
            Error::Merge(format!("{location} is not a partial manifest (no shard)"))
        })?;
        let differs = |what: &str| {
            Error::Merge(format!(
                "{location} has a different {what} than {}",
                parts[0].0
            ))
        };
        if part.stage != first.stage {
            return Err(differs("stage"));
        }
        if part.config_hash != first.config_hash {
            return Err(differs("config"));
        }
        if let Some(why) = inputs_differ(&part.inputs, all_inputs) {
            return Err(Error::Merge(format!(
                "{location} has a different set of inputs than {all_location} ({why})"
            )));
        }
        if shard.count != count {
            return Err(differs("number of jobs"));
        }
        if !seen.insert(shard.index) {
            return Err(Error::Merge(format!(
                "job {} appears twice ({location})",
                shard.index
            )));
        }
    }
    let missing: Vec<u32> = (0..count).filter(|i| !seen.contains(i)).collect();
    if !missing.is_empty() {
        return Err(Error::Merge(format!(
            "jobs {missing:?} of {count} are missing; merge once every job has finished"
        )));
    }

    let out_dir = out.parent();
    let mut artifacts: Vec<Artifact> = Vec::new();
    for (location, part) in parts {
        for artifact in &part.artifacts {
            let absolute = Manifest::artifact_location(location, artifact)?;
            let uri = absolute
                .relative_to(&out_dir)
                .unwrap_or_else(|| absolute.uri());
            artifacts.push(Artifact {
                uri,
                ..artifact.clone()
            });
        }
    }
    artifacts.sort_by(|a, b| a.uri.cmp(&b.uri));
    if let Some(pair) = artifacts.windows(2).find(|w| w[0].uri == w[1].uri) {
        return Err(Error::Merge(format!(
            "artifact {} is listed by two jobs",
            pair[0].uri
        )));
    }

    let metrics: Vec<&Map<String, Value>> = parts.iter().map(|(_, m)| &m.metrics).collect();
    let mut merged_metrics = merge_metrics(&metrics);
    for key in SAME_IN_EVERY_JOB {
        let mut values = parts
            .iter()
            .filter_map(|(location, part)| part.metrics.get(key).map(|value| (location, value)));
        let Some((first_location, value)) = values.next() else {
            continue;
        };
        if let Some((location, other)) = values.find(|(_, other)| *other != value) {
            return Err(Error::Merge(format!(
                "metric {key} is {value} in {first_location} and {other} in {location}: the \
                 jobs wrote artifacts of different kinds"
            )));
        }
        merged_metrics.insert(key.to_string(), value.clone());
    }
    Ok(Manifest {
        // Parts written by an older parti keep their rule: their inputs are v1 records.
        schema: first.schema.clone(),
        stage: first.stage.clone(),
        created_at: manifest::now_rfc3339(),
        tool: first.tool.clone(),
        config: first.config.clone(),
        config_hash: first.config_hash.clone(),
        shard: None,
        inputs: merge_inputs(all_inputs, parts)?,
        artifacts,
        metrics: merged_metrics,
    })
}

/// Why a job's inputs are not the run's `all` inputs: each must be one of them, the same but
/// for the job's share ([`sources::same_apart_from_named`]), and the job may lack only an
/// input of named files alone (its rows named none).
fn inputs_differ(inputs: &[Input], all: &[Input]) -> Option<String> {
    for input in inputs {
        let same = all.iter().find(|other| other.name == input.name);
        match same {
            None => return Some(format!("'{}' is not in every job", input.name)),
            Some(other) if !sources::same_apart_from_named(input, other) => {
                return Some(format!("'{}' differs", input.name));
            }
            Some(_) => {}
        }
    }
    all.iter()
        .find(|other| {
            !inputs.iter().any(|input| input.name == other.name)
                && !sources::names_files_only(other)
        })
        .map(|other| format!("'{}' is not in every job", other.name))
}

/// The run's inputs (`all`, in their order) from its jobs'. A job looks only at its share of a
/// source: the files its own rows of a list name (images in a CSV or COCO file), and the files
/// of a folder it reads (the others listed by name, [`sources::UNREAD`]). The run names every
/// file with the content the job that read it recorded, so its identity is the one a single
/// job over the whole input records. A file that two jobs saw with different contents changed
/// between the two jobs' runs.
fn merge_inputs(all: &[Input], parts: &[(Location, Manifest)]) -> Result<Vec<Input>, Error> {
    let mut inputs = Vec::with_capacity(all.len());
    for input in all {
        let in_parts: Vec<(&Location, &Input)> = parts
            .iter()
            .filter_map(|(location, part)| {
                let same = part.inputs.iter().find(|other| other.name == input.name);
                same.map(|same| (location, same))
            })
            .collect();
        if !in_parts
            .iter()
            .any(|(_, input)| sources::looks_at_a_share(input))
        {
            inputs.push(input.clone());
            continue;
        }
        // Listed files first, then named ones, each by name: the order a single job records.
        let mut files: BTreeMap<(bool, &str), (&Location, &SourceFile)> = BTreeMap::new();
        for (location, part_input) in in_parts {
            for file in &part_input.files {
                let key = (file.named, file.name.as_str());
                match files.get(&key) {
                    Some((_, seen)) if seen.digest == sources::UNREAD => {
                        files.insert(key, (location, file));
                    }
                    Some((seen_in, seen))
                        if file.digest != sources::UNREAD && seen.digest != file.digest =>
                    {
                        return Err(Error::Merge(format!(
                            "input '{}' holds {}, which {seen_in} records as {} and {location} \
                             as {}: it changed between those jobs' runs (`manifests status` \
                             names the job that is out of date; run it again)",
                            input.name, file.name, seen.digest, file.digest
                        )));
                    }
                    Some(_) => {}
                    None => {
                        files.insert(key, (location, file));
                    }
                }
            }
        }
        if let Some((_, file)) = files.values().find(|(_, f)| f.digest == sources::UNREAD) {
            return Err(Error::Merge(format!(
                "input '{}' lists {}, which no job read: run again the job whose share holds it \
                 (the first job, for a file of no job's share)",
                input.name, file.name
            )));
        }
        let files: Vec<SourceFile> = files.into_values().map(|(_, file)| file.clone()).collect();
        inputs.push(Input {
            digest: sources::identity(&files),
            files,
            ..input.clone()
        });
    }
    Ok(inputs)
}

/// Metrics that say what each job's artifacts are (a token grid's side, its codebook's size, the
/// pictures' size), not how much a job did: every job must record the same value, which the run
/// keeps, where counts are summed.
const SAME_IN_EVERY_JOB: [&str; 3] = ["grid", "codebook_size", "image_size"];

fn merge_metrics(parts: &[&Map<String, Value>]) -> Map<String, Value> {
    let keys: BTreeSet<&String> = parts.iter().flat_map(|m| m.keys()).collect();
    let mut merged = Map::new();
    for key in keys {
        let values: Vec<&Value> = parts.iter().filter_map(|m| m.get(key)).collect();
        let value = if values.iter().all(|v| v.is_object()) {
            let maps: Vec<&Map<String, Value>> =
                values.iter().filter_map(|v| v.as_object()).collect();
            Value::Object(merge_metrics(&maps))
        } else if values.iter().all(|v| v.is_u64()) {
            Value::from(values.iter().filter_map(|v| v.as_u64()).sum::<u64>())
        } else if values.iter().all(|v| v.is_number()) {
            let sum: f64 = values.iter().filter_map(|v| v.as_f64()).sum();
            Value::from(sum / values.len() as f64)
        } else {
            // Not a count: keep it only when every job agrees.
            let first = values[0];
            if values.iter().all(|v| *v == first) {
                first.clone()
            } else {
                continue;
            }
        };
        merged.insert(key.clone(), value);
    }
    merged
}
