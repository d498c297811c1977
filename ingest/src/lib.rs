//! Ingest: image-text pairs and text corpora into Parquet shards, locally or on buckets, as one
//! job or as a cloud batch array.
//!
//! - [`pairs`]: folders, MS-COCO, CSV/TSV/JSONL, img2dataset parquet and webdataset tars.
//! - [`text`]: C4-style `json.gz`, JSONL and plain text corpora.
//! - [`dedup`]: duplicates across the jobs of a batch array, after `manifests merge`.
//! - [`synth`]: the embedded default data (captioned shapes), so the pipeline needs no download.

pub mod bench;
pub mod bench_urls;
pub mod dedup;
pub mod download;
pub mod jpeg;
pub mod pairs;
pub mod process;
pub mod reading;
pub mod sources;
pub mod synth;
pub mod text;

pub use manifests::job_range;
use manifests::shards::Rejected;
use manifests::sources::{ReadWhole, SourceSet};
use manifests::{Location, Manifest, ShardSpec, StageRun, Tool};
use serde_json::{Map, Value};
use sources::FolderReads;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] manifests::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
}

pub fn tool() -> Tool {
    Tool {
        name: "ingest".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Why a sample was not ingested; the names are the keys of `metrics.rejected`.
pub type Reason = &'static str;

/// How a stage runs, as opposed to what it computes (which is its config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: String,
    pub force: bool,
    pub shard: ShardSpec,
    /// Draw a progress bar (on a terminal only; otherwise progress is logged per shard).
    pub progress: bool,
    /// How images named by URL are fetched (not part of the config).
    pub download: download::DownloadOptions,
}

/// How a `parti.manifest/v1` manifest identified raw source data: by its listing (names, sizes,
/// change markers). Computed only to judge a manifest written under that rule.
fn v1_listing_digest(locations: &[Location]) -> Result<String, Error> {
    let mut listing = String::new();
    for location in locations {
        let objects = if location.exists()? {
            vec![manifests::ObjectInfo {
                location: location.clone(),
                size: location.size()?,
                e_tag: None,
                version: None,
            }]
        } else {
            location.list()?
        };
        for object in objects {
            let name = object.location.relative_to(location).unwrap_or_default();
            listing.push_str(&format!(
                "{}\t{name}\t{}\t{}\n",
                location.uri(),
                object.size,
                object.e_tag.unwrap_or_default()
            ));
        }
    }
    Ok(manifests::digest_bytes(listing.as_bytes()))
}

/// Records where the input came from and decides whether the stage runs (as
/// [`StageRun::begin`]). When the input is the output of another parti stage (a
/// `manifest.json` in the input folder or the one above it), that manifest becomes the
/// upstream input and every artifact it lists is digest-checked first; otherwise the input
/// file or folder is identified by content ([`SourceSet`]). `named` are the files a list in
/// the input names (images of a CSV or COCO file), under the names the list gives them: they
/// are inputs too. `reads` (a job of many over a folder) picks the folder's files the job
/// reads: only those are identified by content. `list_read`: the input is a local list the
/// stage has read whole, as it read it: its identity. `image_roots` only matter to
/// judge a v1 manifest, which listed them; such a manifest is judged before the sources are
/// digested, so a skip does not read every file.
pub fn begin_with_input(
    run: &mut StageRun,
    input: &Location,
    named: &[(String, Location)],
    reads: Option<&FolderReads>,
    list_read: Option<ReadWhole>,
    image_roots: &[Location],
    force: bool,
) -> Result<Option<Manifest>, Error> {
    let candidates = [
        input.join(manifests::MANIFEST_FILE),
        input.parent().join(manifests::MANIFEST_FILE),
    ];
    let mut upstream = None;
    for candidate in candidates {
        if !candidate.exists()? {
            continue;
        }
        if let Ok((manifest, _)) = Manifest::read(&candidate)
            && describes(&manifest, &candidate, input)
        {
            upstream = Some(candidate);
            break;
        }
    }
    if let Some(manifest) = &upstream {
        let upstream = run.upstream("source", &manifest.uri())?;
        if let Some(problem) = upstream.manifest.verify(&upstream.location, true).first() {
            return Err(Error::Usage(format!(
                "upstream stage {} has a bad artifact: {problem}",
                upstream.manifest.stage
            )));
        }
    }
    if run.judged_as_v1() {
        match upstream {
            Some(_) if !image_roots.is_empty() => {
                let digest = v1_listing_digest(image_roots)?;
                run.record_v1_source("extra", &image_roots[0].uri(), digest);
            }
            Some(_) => {}
            None => {
                let all: Vec<Location> = std::iter::once(input.clone())
                    .chain(image_roots.iter().cloned())
                    .collect();
                run.record_v1_source("source", &input.uri(), v1_listing_digest(&all)?);
            }
        }
        if let Some(existing) = run.begin(force)? {
            return Ok(Some(existing));
        }
    }
    let (name, mut set) = match upstream {
        Some(_) if named.is_empty() => return finish_begin(run, force),
        Some(_) => ("images", SourceSet::new(run.previous_input("images"))),
        None => {
            let mut set = SourceSet::new(run.previous_input("source"));
            match (reads, list_read) {
                (Some(reads), _) => listed_as_before(&mut set, input, reads)?,
                (None, Some(read)) => set.list_read_whole(input, read),
                (None, None) => set.list(input)?,
            }
            ("source", set)
        }
    };
    for (file, location) in named {
        set.name(file.clone(), location)?;
    }
    run.record_source(set.into_input(name, &input.uri())?);
    finish_begin(run, force)
}

/// Lists the input folder into `set`, identifying by content the files the job reads, and
/// checks that the folder holds the files the listing its share came from held: a file added
/// or removed in between would be in the identity and not the work, or the other way round, and
/// the next run would find the stage up to date without it.
fn listed_as_before(
    set: &mut SourceSet,
    input: &Location,
    reads: &FolderReads,
) -> Result<(), Error> {
    let (known, unknown) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    set.list_reading(input, &|uri| {
        let count = if reads.was_listed(uri) {
            &known
        } else {
            &unknown
        };
        count.set(count.get() + 1);
        reads.reads(uri)
    })?;
    let same = unknown.get() == 0 && reads.listed_count().is_none_or(|n| n == known.get());
    match same {
        true => Ok(()),
        false => Err(Error::Io(format!(
            "{input} changed while this job listed it (files added or removed): run the job again"
        ))),
    }
}

/// Whether the manifest at `location` lists an artifact at or below `input`: only then is the
/// input that stage's output. A manifest in the folder above (a run's folder holding other
/// stages' outputs beside the input) says nothing about the input's files, which must then be
/// listed, or edits to them would leave the stage "up to date".
fn describes(manifest: &Manifest, location: &Location, input: &Location) -> bool {
    manifest.artifacts.iter().any(|artifact| {
        Manifest::artifact_location(location, artifact)
            .is_ok_and(|file| file == *input || file.relative_to(input).is_some())
    })
}

/// `error` as it is, after discarding the run's resume records when it says that a file was
/// not what the run's identity holds: what was finished was made from other bytes than that
/// identity says, and a later run with that identity (the file put back) must not keep it.
pub(crate) fn discarding_work_if_changed(run: &StageRun, error: Error) -> Error {
    if matches!(
        error,
        Error::Manifest(manifests::Error::SourceChanged { .. })
    ) && let Err(e) = run.discard_work()
    {
        tracing::warn!("could not discard the resume records of this run: {e}");
    }
    error
}

/// `begin` once every input is recorded; a v1 manifest was judged (and withdrawn) already.
fn finish_begin(run: &StageRun, force: bool) -> Result<Option<Manifest>, Error> {
    if run.judged_as_v1() {
        return Ok(None);
    }
    Ok(run.begin(force)?)
}

/// The shards of one job: each is kept from an interrupted run or written now, and counted.
pub struct ShardSet<'a> {
    run: &'a StageRun,
    kind: &'static str,
    pub tally: Tally,
    pub artifacts: Vec<manifests::Artifact>,
}

impl<'a> ShardSet<'a> {
    pub fn new(run: &'a StageRun, kind: &'static str) -> ShardSet<'a> {
        ShardSet {
            run,
            kind,
            tally: Tally::default(),
            artifacts: Vec::new(),
        }
    }

    pub fn uri(&self, name: &str) -> String {
        self.location(name).uri()
    }

    pub fn location(&self, name: &str) -> Location {
        self.run.out().join(name)
    }

    /// The contents of shard `name` if an interrupted run finished it (digest-checked); it is
    /// then counted and listed, and the caller only rebuilds its dedup state from the bytes.
    pub fn resume(&mut self, name: &str) -> Result<Option<bytes::Bytes>, Error> {
        Ok(self.resume_noted(name)?.map(|(bytes, _)| bytes))
    }

    /// Like [`ShardSet::resume`], with the note the shard was written with.
    pub fn resume_noted(&mut self, name: &str) -> Result<Option<(bytes::Bytes, Value)>, Error> {
        Ok(self.finished(name)?.map(|finished| self.keep(finished)))
    }

    /// Shard `name` if an interrupted run finished it (digest-checked), not yet counted: a
    /// caller that looks ahead keeps it with [`ShardSet::keep`] when its turn comes, so the
    /// shards are listed in the same order as in an uninterrupted run.
    pub fn finished(&self, name: &str) -> Result<Option<manifests::Finished>, Error> {
        Ok(self.run.finished_artifact_noted(name)?)
    }

    /// Counts and lists a shard found by [`ShardSet::finished`]; its contents and note.
    pub fn keep(&mut self, finished: manifests::Finished) -> (bytes::Bytes, Value) {
        self.tally
            .add_note(&finished.note, finished.artifact.rows.unwrap_or(0));
        self.artifacts.push(finished.artifact);
        (finished.bytes, finished.note)
    }

    /// Writes shard `name`; `rejected` is kept with it so a resumed run counts it again.
    pub fn write(
        &mut self,
        name: &str,
        bytes: bytes::Bytes,
        rows: u64,
        rejected: &Rejected,
    ) -> Result<(), Error> {
        self.write_noted(
            name,
            bytes,
            rows,
            serde_json::json!({ "rejected": rejected }),
        )
    }

    /// Writes shard `name` with `note` (which holds its `rejected` counts, and whatever else a
    /// resumed run needs to finish what belongs with the shard).
    pub fn write_noted(
        &mut self,
        name: &str,
        bytes: bytes::Bytes,
        rows: u64,
        note: Value,
    ) -> Result<(), Error> {
        let artifact =
            self.run
                .write_artifact_noted(name, self.kind, bytes, Some(rows), note.clone())?;
        self.tally.add_note(&note, rows);
        self.artifacts.push(artifact);
        Ok(())
    }
}

/// Rows and rejections, counted across shards.
#[derive(Debug, Default)]
pub struct Tally {
    pub rows: u64,
    pub rejected: Rejected,
}

impl Tally {
    /// Adds a shard's rows and the rejection counts kept in its note.
    pub fn add_note(&mut self, note: &Value, rows: u64) {
        self.rows += rows;
        manifests::shards::add_rejected_note(&mut self.rejected, note);
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// `rows` and `rejected` (`{reason: count}`), as every data stage reports them.
    pub fn metrics(&self) -> Map<String, Value> {
        let mut metrics = Map::new();
        metrics.insert("rows".into(), Value::from(self.rows));
        metrics.insert("rejected".into(), serde_json::json!(self.rejected));
        metrics
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A file added to (or removed from) a folder between the listing that decided a job's
    /// share and the one its identity comes from stops the job, which would otherwise record it
    /// as read while its work lacks it.
    #[test]
    fn a_folder_that_changed_between_its_two_listings_stops_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input");
        std::fs::create_dir(&input).unwrap();
        for name in ["a.txt", "b.txt"] {
            std::fs::write(input.join(name), name).unwrap();
        }
        let input = Location::parse(input.to_str().unwrap()).unwrap();
        let uri = |name: &str| input.join(name).uri();
        let out = dir.path().join("out");
        let begin = |listed: &[&str]| {
            let mut run = StageRun::new(
                "test",
                tool(),
                out.to_str().unwrap(),
                &serde_json::json!({}),
                ShardSpec::single(),
            )
            .unwrap();
            let listed: HashSet<String> = listed.iter().map(|name| uri(name)).collect();
            let reads = FolderReads::new(
                HashSet::new(),
                HashSet::new(),
                Some(listed),
                ShardSpec::single(),
            );
            begin_with_input(&mut run, &input, &[], Some(&reads), None, &[], false).map(|_| ())
        };
        assert!(begin(&["a.txt", "b.txt"]).is_ok());
        for listed in [&["a.txt"][..], &["a.txt", "b.txt", "c.txt"]] {
            let err = begin(listed).unwrap_err().to_string();
            assert!(
                err.contains("changed while this job listed it"),
                "{listed:?}: {err}"
            );
        }
    }
}
