//! What every stage does around its own work: decide whether to run, record inputs, write
//! artifacts, keep finished artifacts across a crash, and publish the manifest last.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use tracing::{debug, info};

use crate::manifest::{
    self, Artifact, Input, MANIFEST_FILE, Manifest, ShardSpec, Tool, config_hash,
    manifest_location, read_verified,
};
use crate::sources::{self, SourceSet, changed_file};
use crate::storage::Location;
use crate::{Error, digest_bytes};

/// Where finished artifacts are recorded before the manifest exists, so a killed run resumes.
const WORK_DIR: &str = "_work";
const CHECKPOINT_INDEX: &str = "checkpoint.json";
/// Beside a checkpoint: the config and input identities of the run that wrote it, so another
/// run can say why it does not resume it.
/// (Named apart from the artifacts' records, `<uri>.json`.)
const RUN_RECORD: &str = "_run.json";

/// A training checkpoint read back: the step it was taken after and its files by name.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: usize,
    pub files: Vec<(String, Bytes)>,
}

/// A checkpoint in a stage's output folder that another run left: a killed run of another
/// config or other inputs, which this run does not resume.
#[derive(Debug, Clone, PartialEq)]
pub struct OtherCheckpoint {
    /// Its work folder.
    pub folder: String,
    pub step: usize,
    /// How that run differs from this one, in words (`learning_rate: 0.0002 there, 0.0001
    /// here`; `input tokens: other contents`); `None` for a checkpoint written before runs
    /// recorded their config beside it.
    pub differences: Option<Vec<String>>,
}

/// An upstream stage's manifest, read and recorded as an input.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub manifest: Manifest,
    pub location: Location,
}

impl Upstream {
    pub fn read(uri: &str) -> Result<(Upstream, String), Error> {
        let location = manifest_location(uri)?;
        let (manifest, digest) = Manifest::read(&location)?;
        Ok((Upstream { manifest, location }, digest))
    }

    /// How a stage that reads this upstream records it as its input `name`.
    pub fn as_input(&self, name: &str) -> Input {
        Input {
            name: name.to_string(),
            uri: self.location.uri(),
            kind: "manifest".to_string(),
            digest: self.manifest.identity(),
            stage: Some(self.manifest.stage.clone()),
            config_hash: Some(self.manifest.config_hash.clone()),
            listed: None,
            files: Vec::new(),
        }
    }

    pub fn artifact_location(&self, artifact: &Artifact) -> Result<Location, Error> {
        Manifest::artifact_location(&self.location, artifact)
    }

    /// Reads an artifact, refusing it unless its size and digest match this manifest.
    pub fn read_artifact(&self, artifact: &Artifact) -> Result<Bytes, Error> {
        read_verified(&self.artifact_location(artifact)?, artifact)
    }

    pub fn artifacts_of_kind<'a>(&'a self, kind: &'a str) -> Vec<&'a Artifact> {
        self.manifest.artifacts_of_kind(kind).collect()
    }

    /// The first artifact of `kind` (a model's weights or config), or an error naming this
    /// manifest and the stage that wrote it.
    pub fn artifact_of_kind(&self, kind: &str) -> Result<&Artifact, Error> {
        let found = self.manifest.artifacts.iter().find(|a| a.kind == kind);
        found.ok_or_else(|| Error::InvalidManifest {
            uri: self.location.uri(),
            reason: format!(
                "no '{kind}' artifact (written by stage '{}')",
                self.manifest.stage
            ),
        })
    }

    /// Reads (digest-checked) the first artifact of `kind`.
    pub fn read_artifact_of_kind(&self, kind: &str) -> Result<Bytes, Error> {
        self.read_artifact(self.artifact_of_kind(kind)?)
    }
}

/// An artifact kept from an interrupted run.
pub struct Finished {
    pub artifact: Artifact,
    pub note: Value,
    pub bytes: Bytes,
}

/// Whether a stage needs to run.
#[derive(Debug)]
pub enum Freshness {
    UpToDate(Box<Manifest>),
    Stale(String),
}

pub struct StageRun {
    out: Location,
    stage: String,
    tool: Tool,
    config: Value,
    config_hash: String,
    /// JSON pointers of the config fields left out of `config_hash`: those naming where data
    /// is, and those saying only when the run saves its progress.
    location_fields: Vec<String>,
    checkpoint_fields: Vec<String>,
    shard: ShardSpec,
    inputs: Vec<Input>,
    /// How a `parti.manifest/v1` document would have recorded config and inputs, to judge a
    /// manifest written before content identities by its own rule (so upgrading reruns nothing).
    v1_config_hash: String,
    v1_inputs: Vec<Input>,
    /// This stage's manifest from an earlier run, if any: the fast check for source files.
    previous: Option<Manifest>,
}

impl StageRun {
    /// `config` is the stage's full effective config; it is recorded and hashed.
    pub fn new(
        stage: &str,
        tool: Tool,
        out_uri: &str,
        config: &impl Serialize,
        shard: ShardSpec,
    ) -> Result<StageRun, Error> {
        if shard.count == 0 || shard.index >= shard.count {
            return Err(Error::Usage(format!(
                "shard index {} is outside 0..{} (--shard-index must be below --num-shards)",
                shard.index, shard.count
            )));
        }
        let config = serde_json::to_value(config).map_err(|e| Error::Config {
            source_name: stage.to_string(),
            reason: e.to_string(),
        })?;
        let hash = config_hash(&config);
        let mut run = StageRun {
            out: Location::parse(out_uri)?,
            stage: stage.to_string(),
            tool,
            config_hash: hash.clone(),
            v1_config_hash: hash,
            location_fields: Vec::new(),
            checkpoint_fields: Vec::new(),
            config,
            shard,
            inputs: Vec::new(),
            v1_inputs: Vec::new(),
            previous: None,
        };
        run.previous = Manifest::read(&run.manifest_location())
            .ok()
            .map(|(manifest, _)| manifest);
        Ok(run)
    }

    /// Leaves the config fields at these JSON pointers (e.g. `/source/input`) out of the config
    /// hash: they name where data is, and the data is identified as an input by its content, so
    /// another spelling of the same place is not a changed config. The manifest still records
    /// them in `config`.
    pub fn with_locations(mut self, pointers: &[&str]) -> StageRun {
        self.location_fields
            .extend(pointers.iter().map(|p| p.to_string()));
        self.config_hash = config_hash(&self.hashed_config(&self.config));
        self
    }

    /// Leaves the config fields at these JSON pointers (e.g. `/checkpoint_every`) out of the
    /// config hash: they say only when a training run saves its progress, and a resumed run
    /// computes what an uninterrupted one does, so changing them neither makes a finished stage
    /// stale nor keeps a killed run from resuming. The manifest still records them in `config`.
    /// A manifest written while they were hashed still counts as this run's; so does a
    /// checkpoint written then, when the run resumes under the interval it was written with. A
    /// pointer that names no field is an error (it would leave the field hashed unnoticed).
    pub fn with_checkpoint_fields(mut self, pointers: &[&str]) -> Result<StageRun, Error> {
        if let Some(missing) = pointers.iter().find(|p| self.config.pointer(p).is_none()) {
            return Err(Error::Config {
                source_name: self.stage.clone(),
                reason: format!("the config has no field {missing}"),
            });
        }
        self.checkpoint_fields
            .extend(pointers.iter().map(|p| p.to_string()));
        self.config_hash = config_hash(&self.hashed_config(&self.config));
        Ok(self)
    }

    /// `config` without the fields left out of the hash.
    fn hashed_config(&self, config: &Value) -> Value {
        without_fields(
            config,
            self.location_fields.iter().chain(&self.checkpoint_fields),
        )
    }

    /// The hash of `config` with only the location fields left out: the rule before the
    /// checkpoint fields were left out too.
    fn hash_with_checkpoint_fields_of(&self, config: &Value) -> String {
        config_hash(&without_fields(config, &self.location_fields))
    }

    /// The hash this run's config had while its checkpoint fields were hashed (`None` when it
    /// has none): the identity its manifest and work folder had then.
    fn hash_with_checkpoint_fields(&self) -> Option<String> {
        (!self.checkpoint_fields.is_empty())
            .then(|| self.hash_with_checkpoint_fields_of(&self.config))
    }

    /// Whether `existing` was written for this run's config: the same hash, or written while the
    /// checkpoint fields were hashed, faithfully to the config it records, and the same config
    /// but for them.
    fn same_config(&self, existing: &Manifest) -> bool {
        if existing.config_hash == self.config_hash {
            return true;
        }
        !self.checkpoint_fields.is_empty()
            && existing.config_hash == self.hash_with_checkpoint_fields_of(&existing.config)
            && config_hash(&self.hashed_config(&existing.config)) == self.config_hash
    }

    pub fn out(&self) -> &Location {
        &self.out
    }

    /// The stage's name, e.g. `vqgan.train`.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }

    pub fn shard(&self) -> ShardSpec {
        self.shard
    }

    /// Reads an upstream manifest and records it as input `name`, identified by the upstream
    /// stage's config hash and artifact digests ([`Manifest::identity`]).
    pub fn upstream(&mut self, name: &str, uri: &str) -> Result<Upstream, Error> {
        let (upstream, bytes_digest) = Upstream::read(uri)?;
        let input = upstream.as_input(name);
        self.v1_inputs.push(Input {
            digest: bytes_digest,
            config_hash: None,
            ..input.clone()
        });
        self.inputs.push(input);
        Ok(upstream)
    }

    /// Records an upstream stage this stage reads through another one's inputs (the VQGAN
    /// behind a token shard): like [`StageRun::upstream`], so early cutoff cannot hide a change
    /// there, but not part of the v1 rule, which did not record these.
    pub fn read_through(&mut self, name: &str, uri: &str) -> Result<Upstream, Error> {
        let (upstream, _) = Upstream::read(uri)?;
        self.inputs.push(upstream.as_input(name));
        Ok(upstream)
    }

    /// This input as the stage's previous manifest recorded it (for [`SourceSet::new`]).
    pub fn previous_input(&self, name: &str) -> Option<&Input> {
        let previous = self.previous.as_ref()?;
        previous.inputs.iter().find(|input| input.name == name)
    }

    /// Records one raw source file whose bytes the stage has read (e.g. a weights file).
    pub fn source_bytes(&mut self, name: &str, uri: &str, bytes: &[u8]) -> Result<(), Error> {
        let mut set = SourceSet::new(None);
        set.list_read(&Location::parse(uri)?, bytes)?;
        self.record_source(set.into_input(name, uri)?);
        self.record_v1_source(name, uri, digest_bytes(bytes));
        Ok(())
    }

    /// The digests this run's identity holds for the local raw files it recorded, to check what
    /// the stage reads against.
    pub fn source_digests(&self) -> crate::sources::SourceDigests {
        crate::sources::SourceDigests::of(&self.inputs)
    }

    /// Records raw source data identified by content (built with [`SourceSet`]).
    pub fn record_source(&mut self, input: Input) {
        self.inputs.push(input);
    }

    /// Whether this stage's existing manifest predates content identities: only then does a
    /// stage need to say how v1 identified its raw sources ([`StageRun::record_v1_source`]).
    pub fn judged_as_v1(&self) -> bool {
        self.previous.as_ref().is_some_and(Manifest::is_v1)
    }

    /// A raw source as a v1 manifest recorded it (`digest` over its listing), to judge a v1
    /// manifest by the rule it was written under.
    pub fn record_v1_source(&mut self, name: &str, uri: &str, digest: String) {
        self.v1_inputs.push(Input {
            name: name.to_string(),
            uri: uri.to_string(),
            kind: "source".to_string(),
            digest,
            stage: None,
            config_hash: None,
            listed: None,
            files: Vec::new(),
        });
    }

    /// `OUT/manifest.json`, or `OUT/manifest.part-IIIII-of-NNNNN.json` for one job of many.
    pub fn manifest_location(&self) -> Location {
        if self.shard.is_single() {
            self.out.join(MANIFEST_FILE)
        } else {
            self.out.join(&format!(
                "manifest.part-{:05}-of-{:05}.json",
                self.shard.index, self.shard.count
            ))
        }
    }

    /// Up to date means: a manifest exists for this stage and shard, its config hash and input
    /// identities equal ours, and every artifact it lists verifies by digest. A v1 manifest is
    /// judged by the v1 rule: the whole config hashed, inputs equal in URI and v1 digest.
    pub fn freshness(&self) -> Result<Freshness, Error> {
        let location = self.manifest_location();
        let existing = match Manifest::read(&location) {
            Ok((manifest, _)) => manifest,
            Err(Error::NotFound { .. }) => return Ok(Freshness::Stale("no manifest yet".into())),
            Err(Error::InvalidManifest { reason, .. }) => {
                return Ok(Freshness::Stale(format!(
                    "existing manifest unreadable: {reason}"
                )));
            }
            Err(e) => return Err(e),
        };
        let expected_shard = (!self.shard.is_single()).then_some(self.shard);
        let (same_config, inputs_changed) = if existing.is_v1() {
            let changed = (existing.inputs != self.v1_inputs)
                .then(|| "inputs changed (judged as parti.manifest/v1 judged them)".to_string());
            (existing.config_hash == self.v1_config_hash, changed)
        } else {
            // A job's part from before jobs looked only at their own share looks at more.
            let narrowed =
                !self.shard.is_single() && sources::narrows(&existing.inputs, &self.inputs);
            (
                self.same_config(&existing),
                changed_input(&existing.inputs, &self.inputs).filter(|_| !narrowed),
            )
        };
        let stale = if existing.stage != self.stage {
            Some(format!("manifest is for stage '{}'", existing.stage))
        } else if !same_config {
            Some("config changed".to_string())
        } else if existing.shard != expected_shard {
            Some("shard changed".to_string())
        } else if inputs_changed.is_some() {
            inputs_changed
        } else {
            let problems = existing.verify(&location, true);
            (!problems.is_empty()).then(|| format!("artifact changed: {}", problems[0]))
        };
        Ok(match stale {
            Some(reason) => Freshness::Stale(reason),
            None => Freshness::UpToDate(Box::new(existing)),
        })
    }

    /// Returns the existing manifest when the stage can be skipped, after saying so; otherwise
    /// withdraws the old manifest (a job of many: its part and the merged one), so no reader
    /// trusts it while its artifacts are rewritten.
    pub fn begin(&self, force: bool) -> Result<Option<Manifest>, Error> {
        let manifest_uri = self.manifest_location().uri();
        if !force {
            match self.freshness()? {
                Freshness::UpToDate(manifest) => {
                    info!(stage = %self.stage, manifest = %manifest_uri, "up to date, skipping (use --force to rerun)");
                    return Ok(Some(self.with_current_inputs(*manifest)?));
                }
                Freshness::Stale(reason) => {
                    info!(stage = %self.stage, "running: {reason}");
                }
            }
        } else {
            info!(stage = %self.stage, "running: --force");
        }
        self.manifest_location().delete()?;
        if !self.shard.is_single() {
            // The merged manifest of an earlier run lists this job's artifacts, about to be
            // rewritten: withdrawn too, until the jobs are merged again.
            self.out.join(MANIFEST_FILE).delete()?;
        }
        Ok(None)
    }

    /// An up-to-date manifest whose inputs look at more files than this run's (a job's part
    /// from before jobs looked only at their own share, [`sources::narrows`]) is rewritten with
    /// this run's inputs, so that `manifests merge` joins what each job reads now. Its
    /// artifacts and metrics stay as they are; the merged manifest's identity does not change.
    fn with_current_inputs(&self, mut manifest: Manifest) -> Result<Manifest, Error> {
        let same = manifest.inputs.len() == self.inputs.len()
            && self
                .inputs
                .iter()
                .all(|input| manifest.inputs.iter().any(|old| old.same_identity(input)));
        if manifest.is_v1() || same {
            return Ok(manifest);
        }
        info!(stage = %self.stage, "recording the files of this job's own share only (its manifest looked at every file of the input)");
        manifest.inputs = self.inputs.clone();
        manifest.write(&self.manifest_location())?;
        Ok(manifest)
    }

    /// This job's resume records: keyed by config and inputs, so a changed run never reuses
    /// them, and by job, so the jobs of an array sharing one output never touch each other's.
    fn work_dir(&self) -> Location {
        self.work_dir_of(&self.config_hash)
    }

    /// The work folder a run with this config hash (and this run's inputs and job) uses.
    fn work_dir_of(&self, config_hash: &str) -> Location {
        let hash = config_hash.trim_start_matches("blake3:");
        let identities: Vec<(&str, &str, &str)> = self
            .inputs
            .iter()
            .map(|i| (i.name.as_str(), i.kind.as_str(), i.digest.as_str()))
            .collect();
        let inputs = digest_bytes(
            serde_json::to_string(&identities)
                .unwrap_or_default()
                .as_bytes(),
        );
        let run_id = format!("{}-{}", &hash[..16], &inputs["blake3:".len()..][..16]);
        self.out
            .join(WORK_DIR)
            .join(&run_id)
            .join(&self.job_folder())
    }

    /// This job's folder name within a run's work folder.
    fn job_folder(&self) -> String {
        format!("job-{:05}-of-{:05}", self.shard.index, self.shard.count)
    }

    /// Where this run's work folder was while its checkpoint fields were hashed, when that is
    /// elsewhere: a run killed then resumes from its checkpoint there.
    fn earlier_work_dir(&self) -> Option<Location> {
        self.hash_with_checkpoint_fields()
            .filter(|hash| *hash != self.config_hash)
            .map(|hash| self.work_dir_of(&hash))
    }

    fn work_record(&self, relative_uri: &str) -> Location {
        self.work_dir()
            .join(&format!("{}.json", relative_uri.replace('/', "__")))
    }

    /// Writes one artifact (atomically) below the output folder and returns its manifest entry.
    /// The entry is also recorded in the work folder, so a killed run can keep it.
    pub fn write_artifact(
        &self,
        relative_uri: &str,
        kind: &str,
        bytes: Bytes,
        rows: Option<u64>,
    ) -> Result<Artifact, Error> {
        self.write_artifact_noted(relative_uri, kind, bytes, rows, Value::Null)
    }

    /// Like [`StageRun::write_artifact`], keeping `note` (e.g. the artifact's rejection counts)
    /// beside the resume record, for [`StageRun::finished_artifact_noted`].
    pub fn write_artifact_noted(
        &self,
        relative_uri: &str,
        kind: &str,
        bytes: Bytes,
        rows: Option<u64>,
        note: Value,
    ) -> Result<Artifact, Error> {
        let artifact = Artifact {
            uri: relative_uri.to_string(),
            kind: kind.to_string(),
            bytes: bytes.len() as u64,
            digest: digest_bytes(&bytes),
            rows,
        };
        self.out.join(relative_uri).put(bytes)?;
        self.record_finished(&artifact, note)?;
        Ok(artifact)
    }

    /// Records an artifact already in place (say, listed by this stage's published manifest) as
    /// finished, so a run that rewrites some artifacts and is killed keeps the others.
    pub fn record_finished(&self, artifact: &Artifact, note: Value) -> Result<(), Error> {
        let record = serde_json::json!({ "artifact": artifact, "note": note });
        self.work_record(&artifact.uri)
            .put(Bytes::from(record.to_string()))
    }

    /// An artifact finished by an earlier, interrupted run with the same config and inputs, if
    /// it is still intact (verified by digest).
    pub fn finished_artifact(&self, relative_uri: &str) -> Result<Option<Artifact>, Error> {
        Ok(self
            .finished_artifact_noted(relative_uri)?
            .map(|f| f.artifact))
    }

    /// The finished artifact with its note and its (verified) contents.
    pub fn finished_artifact_noted(&self, relative_uri: &str) -> Result<Option<Finished>, Error> {
        let Some(record) = self.work_record(relative_uri).get_if_present()? else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        struct Record {
            artifact: Artifact,
            #[serde(default)]
            note: Value,
        }
        let Ok(record) = serde_json::from_slice::<Record>(&record) else {
            return Ok(None);
        };
        match read_verified(&self.out.join(relative_uri), &record.artifact) {
            Ok(bytes) => Ok(Some(Finished {
                artifact: record.artifact,
                note: record.note,
                bytes,
            })),
            Err(e) => {
                debug!("redoing {relative_uri}: {e}");
                Ok(None)
            }
        }
    }

    /// Keeps a training checkpoint (named files, e.g. model, optimizer, state) in this run's
    /// work folder. Files go to a folder of their own per `step` and the index naming them (with
    /// digests) is written last, so a run killed mid-write still finds the previous checkpoint
    /// whole; the previous one is deleted only after the new index is in place.
    pub fn save_checkpoint(&self, step: usize, files: Vec<(&str, Bytes)>) -> Result<(), Error> {
        let work = self.work_dir();
        let previous = checkpoint_index(&work)?;
        let folder = format!("checkpoint-{step:09}");
        let mut entries = Vec::new();
        for (name, bytes) in files {
            let uri = format!("{folder}/{name}");
            entries.push(Artifact {
                uri: uri.clone(),
                kind: "checkpoint".into(),
                bytes: bytes.len() as u64,
                digest: digest_bytes(&bytes),
                rows: None,
            });
            work.join(&uri).put(bytes)?;
        }
        if previous.is_none() {
            work.join(RUN_RECORD)
                .put(Bytes::from(self.run_record().to_string()))?;
        }
        let index = serde_json::json!({"step": step, "files": entries});
        work.join(CHECKPOINT_INDEX)
            .put(Bytes::from(index.to_string()))?;
        if let Some((old_step, old_files)) = previous
            && old_step != step
        {
            for file in old_files {
                work.join(&file.uri).delete()?;
            }
        }
        Ok(())
    }

    /// The latest checkpoint of an interrupted run with this config and inputs: its step and
    /// its files by name, each verified by digest. `None` when there is none or it is damaged
    /// (a file missing, cut short or altered); an error when the storage fails to read it, so a
    /// passing network error neither restarts the run from step 0 nor lets its next save
    /// delete the checkpoint it could not read.
    pub fn load_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        let mut dir = self.work_dir();
        let mut index = checkpoint_index(&dir)?;
        if index.is_none()
            && let Some(earlier) = self.earlier_work_dir()
        {
            index = checkpoint_index(&earlier)?;
            dir = earlier;
        }
        let Some((step, entries)) = index else {
            return Ok(None);
        };
        let mut files = Vec::new();
        for entry in entries {
            match read_verified(&dir.join(&entry.uri), &entry) {
                Ok(bytes) => {
                    let name = entry.uri.rsplit('/').next().unwrap_or_default().to_string();
                    files.push((name, bytes));
                }
                Err(
                    e @ (Error::NotFound { .. }
                    | Error::SizeMismatch { .. }
                    | Error::DigestMismatch { .. }),
                ) => {
                    info!("ignoring the damaged checkpoint of step {step}: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(Checkpoint { step, files }))
    }

    /// Checkpoints of other runs in this output folder for this job: killed runs of another
    /// config or other inputs, each with how it differs from this run. A run that finds no
    /// checkpoint of its own says so rather than silently starting from step 0 beside them.
    pub fn other_checkpoints(&self) -> Result<Vec<OtherCheckpoint>, Error> {
        let ours = [Some(self.work_dir()), self.earlier_work_dir()];
        let work = self.out.join(WORK_DIR);
        let job = self.job_folder();
        let mut others = Vec::new();
        for object in work.list()? {
            let relative = object.location.relative_to(&work).unwrap_or_default();
            let parts: Vec<&str> = relative.split('/').collect();
            let [run_id, folder, name] = parts[..] else {
                continue;
            };
            let dir = work.join(&format!("{run_id}/{folder}"));
            if folder != job
                || name != CHECKPOINT_INDEX
                || ours.iter().flatten().any(|own| own.uri() == dir.uri())
            {
                continue;
            }
            let Some((step, _)) = checkpoint_index(&dir)? else {
                continue;
            };
            let differences = dir
                .join(RUN_RECORD)
                .get_if_present()?
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                .map(|record| self.differences_from(&record));
            others.push(OtherCheckpoint {
                folder: dir.uri(),
                step,
                differences,
            });
        }
        Ok(others)
    }

    /// This run's config and input identities, as [`RUN_RECORD`] keeps them.
    fn run_record(&self) -> Value {
        serde_json::json!({"config": self.config, "inputs": self.input_identities()})
    }

    /// Each input's identity by name.
    fn input_identities(&self) -> Map<String, Value> {
        self.inputs
            .iter()
            .map(|i| (i.name.clone(), Value::String(i.digest.clone())))
            .collect()
    }

    /// How the run `record` describes differs from this one: config fields (leaving out those
    /// outside the hash), then inputs.
    fn differences_from(&self, record: &Value) -> Vec<String> {
        let mut fields = Vec::new();
        value_differences(
            "",
            &self.hashed_config(&record["config"]),
            &self.hashed_config(&self.config),
            &mut fields,
        );
        let mut differences: Vec<String> = fields
            .into_iter()
            .map(|(path, there, here)| format!("{path}: {there} there, {here} here"))
            .collect();
        let ours = Value::Object(self.input_identities());
        let names: std::collections::BTreeSet<&String> = ours
            .as_object()
            .into_iter()
            .chain(record["inputs"].as_object())
            .flat_map(|inputs| inputs.keys())
            .collect();
        for name in names {
            if record["inputs"][name] != ours[name] {
                differences.push(format!("input {name}: other contents"));
            }
        }
        differences
    }

    /// Writes the manifest, last, after every artifact. Then drops the resume records.
    pub fn publish(
        &self,
        artifacts: Vec<Artifact>,
        metrics: Map<String, Value>,
    ) -> Result<Manifest, Error> {
        let manifest = Manifest {
            schema: manifest::SCHEMA.to_string(),
            stage: self.stage.clone(),
            created_at: manifest::now_rfc3339(),
            tool: self.tool.clone(),
            config: self.config.clone(),
            config_hash: self.config_hash.clone(),
            shard: (!self.shard.is_single()).then_some(self.shard),
            inputs: self.inputs.clone(),
            artifacts,
            metrics,
        };
        let location = self.manifest_location();
        manifest.write(&location)?;
        self.discard_work()?;
        info!(stage = %self.stage, manifest = %location, "published");
        Ok(manifest)
    }

    /// Deletes this job's resume records (finished artifacts, checkpoints): once published,
    /// or when the run learns that its identity does not describe what it read, so that no run
    /// resumes from them.
    pub fn discard_work(&self) -> Result<(), Error> {
        for work in std::iter::once(self.work_dir()).chain(self.earlier_work_dir()) {
            for object in work.list()? {
                object.location.delete()?;
            }
            // Locally, also remove this job's folder (with any staging file a killed write
            // left) and its parents when empty (remove_dir refuses a folder another job uses).
            if let Some(path) = work.local_path() {
                let _ = std::fs::remove_dir_all(&path);
                for dir in path.ancestors().skip(1).take(2) {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
        Ok(())
    }
}

/// The step and files of the checkpoint index in the work folder `dir`, if there is one.
fn checkpoint_index(dir: &Location) -> Result<Option<(usize, Vec<Artifact>)>, Error> {
    let Some(bytes) = dir.join(CHECKPOINT_INDEX).get_if_present()? else {
        return Ok(None);
    };
    #[derive(serde::Deserialize)]
    struct Index {
        step: usize,
        files: Vec<Artifact>,
    }
    Ok(serde_json::from_slice::<Index>(&bytes)
        .ok()
        .map(|index| (index.step, index.files)))
}

/// The leaf fields where `there` and `here` differ, as (path, there, here) in the form a
/// person wrote them (see [`shown`]); a field that one side lacks is `null` there.
pub(crate) fn value_differences(
    path: &str,
    there: &Value,
    here: &Value,
    out: &mut Vec<(String, String, String)>,
) {
    match (there, here) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let missing = Value::Null;
                let (a, b) = (
                    a.get(key).unwrap_or(&missing),
                    b.get(key).unwrap_or(&missing),
                );
                value_differences(&child, a, b, out);
            }
        }
        (Value::Number(a), Value::Number(b)) if same_number(a, b) => {}
        (a, b) if a != b => out.push((path.to_string(), shown(a), shown(b))),
        _ => {}
    }
}

/// Equal, or one rounding apart: serde_json may read a float back one unit in the last place
/// off, which is no difference of config.
fn same_number(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs()),
        _ => a == b,
    }
}

/// A config value as a person wrote it: an f32 field is recorded as its exact f64 value
/// (0.1 as 0.10000000149011612), shown in f32's shortest form.
fn shown(value: &Value) -> String {
    match value.as_f64() {
        Some(number) if value.is_f64() && number as f32 as f64 == number => {
            format!("{:?}", number as f32)
        }
        _ => value.to_string(),
    }
}

/// `config` without the fields at these JSON pointers.
fn without_fields<'a>(config: &Value, pointers: impl IntoIterator<Item = &'a String>) -> Value {
    let mut config = config.clone();
    for pointer in pointers {
        if let Some((parent, key)) = pointer.rsplit_once('/')
            && let Some(Value::Object(object)) = config.pointer_mut(parent)
        {
            object.remove(key);
        }
    }
    config
}

/// Why the inputs a manifest recorded are not the inputs now, in words; `None` when every input
/// has the same identity (wherever it was read from).
pub fn changed_input(recorded: &[Input], now: &[Input]) -> Option<String> {
    for input in now {
        let Some(before) = recorded.iter().find(|r| r.name == input.name) else {
            return Some(format!("new input '{}' ({})", input.name, input.uri));
        };
        if before.same_identity(input) {
            continue;
        }
        if input.kind != "manifest" {
            let file = changed_file(before, input).unwrap_or_else(|| input.uri.clone());
            return Some(format!("source '{}' changed: {file}", input.name));
        }
        let stage = input.stage.as_deref().unwrap_or("?");
        return Some(if before.config_hash != input.config_hash {
            format!("upstream {stage} ({}) ran with other settings", input.uri)
        } else if before.stage != input.stage {
            format!("input '{}' is now stage {stage}", input.name)
        } else {
            format!("upstream {stage} ({}) wrote different artifacts", input.uri)
        });
    }
    recorded
        .iter()
        .find(|r| !now.iter().any(|i| i.name == r.name))
        .map(|r| format!("input '{}' ({}) is no longer given", r.name, r.uri))
}
