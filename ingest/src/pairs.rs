//! `ingest pairs`: image-text pairs from any supported layout into Parquet shards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use clap::ValueEnum as _;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::Reason;
use crate::dedup::SeenImages;
use crate::download::{DownloadRules, Downloader, is_transient, redacted};
use crate::process::{ImageConfig, RawSample, process};
use crate::sources::{
    InputFormat, Loaded, SourceConfig, Unit, detect_format, enumerate_job, image_root, load,
    stream_container,
};
use crate::{Error, RunOptions, ShardSet, begin_with_input, discarding_work_if_changed, tool};
use manifests::shards::pairs::{self, PairRow};
use manifests::sources::SourceDigests;
use manifests::{Location, Manifest, StageRun};

pub const STAGE: &str = "ingest.pairs";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsConfig {
    pub source: SourceConfig,
    pub image: ImageConfig,
    /// Samples per output shard (a container file in the input makes its own shards).
    pub shard_rows: usize,
    /// What makes a download fail (size cap, opt-out); only URL lists use it.
    #[serde(default, skip_serializing_if = "DownloadRules::is_default")]
    pub download: DownloadRules,
}

impl PairsConfig {
    /// `tiny` makes 64 px images (the CI-sized pipeline); `default` 256 px, as Parti.
    pub fn preset(name: &str, input: &str) -> Result<PairsConfig, Error> {
        let size = match name {
            "tiny" => 64,
            "default" | "paper" => 256,
            other => {
                return Err(Error::Usage(format!(
                    "unknown preset '{other}' for ingest pairs (tiny, default)"
                )));
            }
        };
        Ok(PairsConfig {
            source: SourceConfig {
                input: input.to_string(),
                format: InputFormat::Auto,
                image_root: None,
                coco_captions: crate::sources::CocoCaptions::All,
                image_column: "image".into(),
                caption_column: "caption".into(),
                has_header: true,
                url_column: None,
            },
            image: ImageConfig {
                // Flat saturated shapes 64 px wide would bleed colour at half-resolution chroma.
                jpeg_subsampling: if name == "tiny" {
                    crate::process::JpegSubsampling::Yuv444
                } else {
                    crate::process::JpegSubsampling::Yuv420
                },
                ..ImageConfig::with_size(size)
            },
            shard_rows: 1000,
            download: DownloadRules::default(),
        })
    }
}

/// Work for one output shard: consecutive sample units, or one container file.
struct Chunk<'a> {
    units: &'a [Unit],
}

fn chunks(units: &[Unit], shard_rows: usize) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < units.len() {
        if matches!(units[start], Unit::Container(_)) {
            chunks.push(Chunk {
                units: &units[start..start + 1],
            });
            start += 1;
            continue;
        }
        let mut end = start;
        while end < units.len()
            && end - start < shard_rows.max(1)
            && !matches!(units[end], Unit::Container(_))
        {
            end += 1;
        }
        chunks.push(Chunk {
            units: &units[start..end],
        });
        start = end;
    }
    chunks
}

type Outcome = Result<PairRow, (String, Reason)>;

fn process_loaded(loaded: Loaded, config: &ImageConfig) -> Outcome {
    let Loaded {
        key,
        source,
        image,
        caption,
        metadata,
    } = loaded;
    let image = match image {
        Ok(bytes) => bytes,
        Err(reason) => return Err((key, reason)),
    };
    let sample = RawSample {
        key: key.clone(),
        source,
        image: &image,
        caption: caption.as_deref(),
        metadata,
    };
    process(sample, config).map_err(|reason| (key, reason))
}

/// Rows and rejections of the output shard being filled.
#[derive(Default)]
struct ShardRows {
    rows: Vec<PairRow>,
    rejected: BTreeMap<String, u64>,
    /// Each rejected sample (key, reason): the shard's failure record in URL runs.
    failed: Vec<(String, String)>,
}

/// What the run carries from shard to shard: the shards written so far, and the image digests
/// seen (duplicates are the same bytes reached from a different origin: a COCO image with five
/// captions is one origin, not five duplicates).
struct Writer<'a> {
    shards: ShardSet<'a>,
    seen: SeenImages,
    config: &'a ImageConfig,
    /// What the stage's identity holds for the local files it reads: each is checked as read.
    digests: Arc<SourceDigests>,
    /// The column of containers' parquet rows that holds the caption (`--caption-column`).
    caption_column: &'a str,
    bar: indicatif::ProgressBar,
}

impl Writer<'_> {
    /// Whether shard `name` was finished by an interrupted run (digest-checked); its rows then
    /// count, and only the dedup state is rebuilt from them.
    fn resumed(&mut self, name: &str) -> Result<bool, Error> {
        let Some(finished) = self.shards.finished(name)? else {
            return Ok(false);
        };
        self.keep(name, finished)?;
        Ok(true)
    }

    /// Counts and lists shard `name`, finished by an interrupted run, and rebuilds the dedup
    /// state from its rows. A URL shard's failure record is written again from the shard's
    /// note: the run may have been killed after the shard but before its record.
    fn keep(&mut self, name: &str, finished: manifests::Finished) -> Result<(), Error> {
        let (bytes, note) = self.shards.keep(finished);
        for row in pairs::from_parquet(&self.shards.uri(name), bytes)? {
            self.seen.kept(&row.sha256, &row.source);
        }
        if let Some(failed) = note.get(FAILED_NOTE) {
            let failed: Vec<(String, String)> = serde_json::from_value(failed.clone())
                .map_err(|e| Error::Io(format!("resume record of {name}: {e}")))?;
            self.write_failures(name, &failed)?;
        }
        debug!("kept {name} from an interrupted run");
        Ok(())
    }

    /// Processes `loaded` in parallel and adds the outcomes, in order, to `shard`.
    fn absorb(&mut self, shard: &mut ShardRows, loaded: Vec<Loaded>) {
        let config = self.config;
        let outcomes: Vec<Outcome> = loaded
            .into_par_iter()
            .map(|l| process_loaded(l, config))
            .collect();
        self.absorb_outcomes(shard, outcomes);
    }

    fn absorb_outcomes(&mut self, shard: &mut ShardRows, outcomes: Vec<Outcome>) {
        for outcome in outcomes {
            let result =
                outcome.and_then(
                    |row| match self.seen.is_duplicate(&row.sha256, &row.source) {
                        true => Err((row.key, "duplicate")),
                        false => Ok(row),
                    },
                );
            match result {
                Ok(row) => shard.rows.push(row),
                Err((key, reason)) => {
                    shard.failed.push((key.clone(), reason.to_string()));
                    let count = shard.rejected.entry(reason.to_string()).or_default();
                    *count += 1;
                    let before = self.shards.tally.rejected.get(reason).copied().unwrap_or(0);
                    if before + *count <= 10 {
                        warn!(key = %key, reason, "rejected sample");
                    } else {
                        debug!(key = %key, reason, "rejected sample");
                    }
                }
            }
        }
    }

    /// Sorts and writes a finished shard. With `keep_failures` (URL runs), the shard's failure
    /// record is written after it and its failures are kept in the shard's resume note too,
    /// so the record always describes the shard as written: a run killed between the two
    /// writes rewrites the record when it resumes, and one killed before the shard is in place
    /// leaves the old shard with its old record.
    fn finish(
        &mut self,
        name: &str,
        mut shard: ShardRows,
        keep_failures: bool,
    ) -> Result<(), Error> {
        shard
            .rows
            .sort_by(|a, b| (&a.key, &a.source).cmp(&(&b.key, &b.source)));
        let bytes = pairs::to_parquet(&self.shards.uri(name), &shard.rows)?;
        let rows = shard.rows.len() as u64;
        let mut note = json!({ "rejected": shard.rejected });
        if keep_failures {
            note[FAILED_NOTE] = json!(shard.failed);
        }
        self.shards.write_noted(name, bytes, rows, note)?;
        if keep_failures {
            self.write_failures(name, &shard.failed)?;
        }
        let tally = &self.shards.tally;
        self.bar.set_message(format!(
            "{} rows, {} rejected",
            tally.rows,
            tally.rejected_total()
        ));
        if self.bar.is_hidden() {
            info!(
                "{name}: {rows} rows ({} rows, {} rejected so far)",
                tally.rows,
                tally.rejected_total()
            );
        }
        Ok(())
    }

    /// Consecutive sample units into one shard; each sample is loaded and processed on the same
    /// worker, so at most one source image per thread is in memory.
    fn samples(&mut self, name: &str, units: &[Unit]) -> Result<(), Error> {
        if self.resumed(name)? {
            return Ok(());
        }
        let (config, digests) = (self.config, &*self.digests);
        let outcomes: Vec<Outcome> = units
            .par_iter()
            .map(|unit| {
                Ok(process_loaded(
                    load(unit, config.max_source_bytes(), digests)?,
                    config,
                ))
            })
            .collect::<Result<_, Error>>()?;
        let mut shard = ShardRows::default();
        self.absorb_outcomes(&mut shard, outcomes);
        self.finish(name, shard, false)
    }

    /// Keeps the (key, reason) of every rejected sample of shard `name`, beside the output, so a
    /// `--retry-failed` run knows which rows to fetch again.
    fn write_failures(&self, name: &str, failed: &[(String, String)]) -> Result<(), Error> {
        let mut lines = String::new();
        for (key, reason) in failed {
            lines.push_str(&json!({"key": key, "reason": reason}).to_string());
            lines.push('\n');
        }
        self.shards
            .location(&failures_name(name))
            .put(bytes::Bytes::from(lines))?;
        Ok(())
    }

    /// The shards of a job with URLs to fetch, finished in order: downloads run on an async
    /// runtime (at most `concurrency` at once, and never more than [`SHARDS_AHEAD`] shards past
    /// the oldest unfinished one) and hand each body to the rayon pool to decode, so no
    /// download waits on one decoding thread and no decode on a slow server.
    fn fetch_slots(
        &mut self,
        mut slots: Vec<Slot<'_>>,
        downloader: Arc<Downloader>,
        concurrency: usize,
        shard_rows: usize,
    ) -> Result<(), Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(rayon::current_num_threads().clamp(1, 4))
            .enable_all()
            .build()
            .map_err(|e| Error::Io(format!("async runtime: {e}")))?;
        let mut work = Vec::new();
        let mut outcomes: Vec<Vec<Option<Outcome>>> = Vec::with_capacity(slots.len());
        for (index, slot) in slots.iter_mut().enumerate() {
            let units = match &mut slot.work {
                SlotWork::Fetch { units, .. } => std::mem::take(units),
                _ => Vec::new(),
            };
            outcomes.push((0..units.len()).map(|_| None).collect());
            work.extend(
                units
                    .into_iter()
                    .enumerate()
                    .map(|(position, unit)| (index, position, unit)),
            );
        }
        let (sender, receiver) = std::sync::mpsc::channel();
        let (lowest_sender, lowest) = tokio::sync::watch::channel(0usize);
        let config = Arc::new(self.config.clone());
        runtime.spawn(produce(
            work,
            lowest,
            Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            downloader,
            (config, self.digests.clone()),
            sender,
        ));
        let mut received = vec![0usize; slots.len()];
        for (index, slot) in slots.into_iter().enumerate() {
            match slot.work {
                SlotWork::Kept(finished) => self.keep(&slot.name, *finished)?,
                SlotWork::Container(location) => {
                    self.container(&slot.name, location, shard_rows)?
                }
                SlotWork::Fetch { start, .. } => {
                    while received[index] < outcomes[index].len() {
                        let (at, position, outcome) = receiver.recv().map_err(|_| {
                            Error::Io("the download workers stopped before the end".into())
                        })?;
                        received[at] += 1;
                        outcomes[at][position] = Some(outcome?);
                    }
                    let mut shard = start;
                    let done = std::mem::take(&mut outcomes[index]);
                    self.absorb_outcomes(&mut shard, done.into_iter().flatten().collect());
                    self.finish(&slot.name, shard, true)?;
                }
            }
            self.bar.inc(slot.samples as u64);
            // The producer stops when every sender is gone; a send error only means it has.
            let _ = lowest_sender.send(index + 1);
        }
        drop(receiver);
        runtime.shutdown_background();
        Ok(())
    }

    /// A container, streamed: every `shard_rows` of its samples (in container order) make shard
    /// `{base}-{part}`, processed a few batches of threads' worth at a time, so memory holds
    /// one batch of sources and one shard of outputs whatever the container's size. A part
    /// finished by an interrupted run is read past without decoding.
    fn container(
        &mut self,
        base: &str,
        location: &Location,
        shard_rows: usize,
    ) -> Result<(), Error> {
        let per_shard = shard_rows.max(1);
        let batch_size = rayon::current_num_threads().max(1) * 8;
        let (mut part, mut taken, mut skip) = (0usize, 0usize, None::<bool>);
        let mut shard = ShardRows::default();
        let mut batch = Vec::new();
        let name = |part: usize| format!("{base}-{part:04}.parquet");
        let (max_image_bytes, digests) = (self.config.max_source_bytes(), self.digests.clone());
        stream_container(
            location,
            self.caption_column,
            max_image_bytes,
            &digests,
            &mut |loaded| {
                let skipping = match skip {
                    Some(skipping) => skipping,
                    None => *skip.insert(self.resumed(&name(part))?),
                };
                taken += 1;
                if !skipping {
                    batch.push(loaded);
                }
                if batch.len() >= batch_size || taken == per_shard {
                    self.absorb(&mut shard, std::mem::take(&mut batch));
                }
                if taken == per_shard {
                    if !skipping {
                        self.finish(&name(part), std::mem::take(&mut shard), false)?;
                    }
                    (part, taken, skip) = (part + 1, 0, None);
                }
                Ok(())
            },
        )?;
        if skip == Some(false) {
            self.absorb(&mut shard, batch);
            self.finish(&name(part), shard, false)?;
        }
        Ok(())
    }
}

/// Output shards a URL run may have in flight past the oldest unfinished one.
const SHARDS_AHEAD: usize = 4;

/// One output shard of a URL run, in order.
struct Slot<'a> {
    /// The shard (`.parquet`) or, for a container, the base of its shards' names.
    name: String,
    samples: usize,
    work: SlotWork<'a>,
}

enum SlotWork<'a> {
    /// Finished by an interrupted run: kept when its turn comes, so the shards are listed (and
    /// the dedup state built) in slot order, as in an uninterrupted run.
    Kept(Box<manifests::Finished>),
    Container(&'a Location),
    /// Units to fetch (or read), added to `start`: empty, or the rows and remaining failures a
    /// `--retry-failed` run keeps.
    Fetch {
        units: Vec<Unit>,
        start: ShardRows,
    },
}

/// Feeds the units of a URL run to the downloader in order, each holding one of `in_flight`'s
/// permits from its request until its decode ends, which bounds the raw bytes in memory.
async fn produce(
    work: Vec<(usize, usize, Unit)>,
    mut lowest: tokio::sync::watch::Receiver<usize>,
    in_flight: Arc<tokio::sync::Semaphore>,
    downloader: Arc<Downloader>,
    (config, digests): (Arc<ImageConfig>, Arc<SourceDigests>),
    sender: std::sync::mpsc::Sender<(usize, usize, Result<Outcome, Error>)>,
) {
    for (slot, position, unit) in work {
        loop {
            let oldest_unfinished = *lowest.borrow();
            if slot < oldest_unfinished + SHARDS_AHEAD {
                break;
            }
            if lowest.changed().await.is_err() {
                return;
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let (downloader, config, sender) = (downloader.clone(), config.clone(), sender.clone());
        let digests = digests.clone();
        tokio::spawn(async move {
            let loaded = match unit {
                Unit::Url {
                    key,
                    url,
                    caption,
                    metadata,
                } => {
                    let image = downloader.fetch(&url).await;
                    Loaded {
                        key,
                        source: redacted(&url),
                        image,
                        caption,
                        metadata,
                    }
                }
                // A local path in a URL list, or a row rejected while listing.
                other => {
                    rayon::spawn(move || {
                        let outcome = load(&other, config.max_source_bytes(), &digests)
                            .map(|loaded| process_loaded(loaded, &config));
                        let _ = sender.send((slot, position, outcome));
                        drop(permit);
                    });
                    return;
                }
            };
            rayon::spawn(move || {
                let outcome = Ok(process_loaded(loaded, &config));
                let _ = sender.send((slot, position, outcome));
                drop(permit);
            });
        });
    }
}

/// The key of a URL shard's resume note that holds its failures (key, reason), so a resumed run
/// can write the shard's failure record again.
const FAILED_NOTE: &str = "failed";

/// Where the failure record of shard `name` (`pairs/part-….parquet`) is kept.
fn failures_name(name: &str) -> String {
    let stem = name
        .trim_start_matches("pairs/")
        .trim_end_matches(".parquet");
    format!("failed/{stem}.jsonl")
}

/// The (key, reason) lines of a failure record; a missing record has none.
fn read_failures(shards: &ShardSet<'_>, name: &str) -> Result<Vec<(String, String)>, Error> {
    let Some(bytes) = shards.location(&failures_name(name)).get_if_present()? else {
        return Ok(Vec::new());
    };
    #[derive(Deserialize)]
    struct Line {
        key: String,
        reason: String,
    }
    Ok(bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Line>(line).ok())
        .map(|line| (line.key, line.reason))
        .collect())
}

/// The images that this job's rows of a COCO, CSV, TSV or JSONL file name, each once, under
/// their paths relative to the image root (as the list spells them): inputs of the job like the
/// list itself. Each job names only its own rows' images, so a job of a batch array looks at
/// its share of a list's files and not at all of them; `manifests merge` joins the jobs' named
/// files into the identity one job's run would record. Folders and containers are identified
/// by listing them instead.
fn named_images(units: &[Unit], format: InputFormat, root: &Location) -> Vec<(String, Location)> {
    let lists = [
        InputFormat::Coco,
        InputFormat::Csv,
        InputFormat::Tsv,
        InputFormat::Jsonl,
    ];
    if !lists.contains(&format) {
        return Vec::new();
    }
    let mut named = BTreeMap::new();
    for unit in units {
        if let Unit::Sample { image, .. } = unit {
            let name = image.relative_to(root).unwrap_or_else(|| image.uri());
            named.entry(name).or_insert_with(|| image.clone());
        }
    }
    named.into_iter().collect()
}

pub fn ingest_pairs(config: &PairsConfig, options: &RunOptions) -> Result<Manifest, Error> {
    let started = Instant::now();
    let ratio = config.image.max_aspect_ratio;
    if !(ratio.is_finite() && ratio >= 1.0) {
        return Err(Error::Usage(format!(
            "image.max_aspect_ratio is {ratio}: give a finite ratio of at least 1"
        )));
    }
    let input = Location::parse(&config.source.input)?;
    let format = detect_format(&input, config.source.format)?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, options.shard)?
        .with_locations(&["/source/input", "/source/image_root"]);
    let image_roots: Vec<Location> = config
        .source
        .image_root
        .iter()
        .map(|r| Location::parse(r))
        .collect::<Result<_, _>>()?;
    let job = enumerate_job(&config.source, format, options.shard)?;
    if job.total == 0 {
        // Else a run would publish a stage of no rows, and only a later stage would say why.
        let format = format.to_possible_value().map(|v| v.get_name().to_string());
        return Err(Error::Usage(format!(
            "{input}: no samples there to read as {} (see --format)",
            format.unwrap_or_default()
        )));
    }
    let named = named_images(&job.units, format, &image_root(&config.source, &input)?);
    let reads = job.reads.as_ref();
    let list_read = job.list_read.clone();
    let existing = begin_with_input(
        &mut run,
        &input,
        &named,
        reads,
        list_read,
        &image_roots,
        options.force,
    )?;
    let (range, mine) = (job.range, &job.units[..]);
    let downloads = mine.iter().any(|unit| matches!(unit, Unit::Url { .. }));
    if let Some(existing) = existing {
        if downloads && options.download.retry_failed {
            return retry_failed(&run, existing, config, options, mine);
        }
        return Ok(existing);
    }

    info!(
        "{format:?} input {input}: {} units, this job takes {}..{}",
        job.total, range.start, range.end
    );
    let chunks = chunks(mine, config.shard_rows);
    let mut writer = Writer {
        shards: ShardSet::new(&run, pairs::KIND),
        seen: SeenImages::default(),
        config: &config.image,
        digests: Arc::new(run.source_digests()),
        caption_column: &config.source.caption_column,
        bar: manifests::progress::bar(
            mine.len() as u64,
            0,
            "samples",
            "ingest pairs",
            options.progress,
        ),
    };
    // A file found to be other than the identity says stops the run: what it finished is
    // discarded with it.
    let mut write = || -> Result<(), Error> {
        if downloads {
            let mut slots = Vec::with_capacity(chunks.len());
            for (index, chunk) in chunks.iter().enumerate() {
                let base = shard_base(options.shard.index, index);
                slots.push(match chunk.units {
                    [Unit::Container(location)] => Slot {
                        name: base,
                        samples: 1,
                        work: SlotWork::Container(location),
                    },
                    units => {
                        let name = format!("{base}.parquet");
                        let work = match writer.shards.finished(&name)? {
                            Some(finished) => SlotWork::Kept(Box::new(finished)),
                            None => SlotWork::Fetch {
                                units: units.to_vec(),
                                start: ShardRows::default(),
                            },
                        };
                        Slot {
                            name,
                            samples: units.len(),
                            work,
                        }
                    }
                });
            }
            let downloader = downloader(config, options)?;
            writer.fetch_slots(
                slots,
                downloader,
                options.download.concurrency,
                config.shard_rows,
            )?;
        } else {
            for (index, chunk) in chunks.iter().enumerate() {
                let base = shard_base(options.shard.index, index);
                match chunk.units {
                    [Unit::Container(location)] => {
                        writer.container(&base, location, config.shard_rows)?
                    }
                    units => writer.samples(&format!("{base}.parquet"), units)?,
                }
                writer.bar.inc(chunk.units.len() as u64);
            }
        }
        Ok(())
    };
    write().map_err(|e| discarding_work_if_changed(&run, e))?;
    let Writer { shards, bar, .. } = writer;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let ShardSet {
        tally, artifacts, ..
    } = shards;
    let mut metrics = tally.metrics();
    metrics.insert("shards".into(), json!(artifacts.len()));
    metrics.insert("seconds".into(), json!(seconds));
    metrics.insert("format".into(), json!(format));
    let manifest = run.publish(artifacts, metrics)?;
    info!(
        "ingest pairs: {} rows, {} rejected {:?} in {seconds:.1}s -> {}",
        tally.rows,
        tally.rejected_total(),
        tally.rejected,
        run.manifest_location()
    );
    Ok(manifest)
}

fn shard_base(job: u32, chunk: usize) -> String {
    format!("pairs/part-{job:05}-{chunk:05}")
}

fn downloader(config: &PairsConfig, options: &RunOptions) -> Result<Arc<Downloader>, Error> {
    Downloader::new(options.download.clone(), config.download.clone())
        .map(Arc::new)
        .map_err(Error::Io)
}

/// `--retry-failed` on a finished run: fetches again the rows whose failure was transient
/// (timeout, DNS, connection, 429, 5xx, cut short), adds those that now succeed to their shards
/// (rewritten) and publishes the manifest again with the counts updated. Shards without such
/// rows are kept as they are.
fn retry_failed(
    run: &StageRun,
    existing: Manifest,
    config: &PairsConfig,
    options: &RunOptions,
    mine: &[Unit],
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let chunk_units: HashMap<String, &[Unit]> = chunks(mine, config.shard_rows)
        .into_iter()
        .enumerate()
        .map(|(index, chunk)| {
            let name = format!("{}.parquet", shard_base(options.shard.index, index));
            (name, chunk.units)
        })
        .collect();
    let mut writer = Writer {
        shards: ShardSet::new(run, pairs::KIND),
        seen: SeenImages::default(),
        config: &config.image,
        digests: Arc::new(run.source_digests()),
        caption_column: &config.source.caption_column,
        bar: manifests::progress::bar(0, 0, "samples", "ingest pairs", options.progress),
    };
    let mut slots = Vec::new();
    let mut replaced_rows = 0u64;
    let mut replaced_rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut retried = 0u64;
    for artifact in existing.artifacts.iter().filter(|a| a.kind == pairs::KIND) {
        let bytes = writer.shards.location(&artifact.uri).get()?;
        let rows = pairs::from_parquet(&writer.shards.uri(&artifact.uri), bytes)?;
        for row in &rows {
            writer.seen.kept(&row.sha256, &row.source);
        }
        let failures = read_failures(&writer.shards, &artifact.uri)?;
        // A retry killed midway resumes like any run: every shard it did not rewrite yet is kept.
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, reason) in &failures {
            *counts.entry(reason.as_str()).or_default() += 1;
        }
        run.record_finished(artifact, json!({ "rejected": counts }))?;
        let Some(units) = chunk_units.get(&artifact.uri) else {
            continue;
        };
        let again: HashSet<&str> = failures
            .iter()
            .filter(|(_, reason)| is_transient(reason))
            .map(|(key, _)| key.as_str())
            .collect();
        let units: Vec<Unit> = units
            .iter()
            .filter(|unit| matches!(unit, Unit::Url { key, .. } if again.contains(key.as_str())))
            .cloned()
            .collect();
        if units.is_empty() {
            continue;
        }
        retried += units.len() as u64;
        replaced_rows += artifact.rows.unwrap_or(0);
        let mut start = ShardRows {
            rows,
            ..ShardRows::default()
        };
        for (key, reason) in &failures {
            *replaced_rejected.entry(reason.clone()).or_default() += 1;
            let retrying = is_transient(reason) && again.contains(key.as_str());
            if !retrying {
                *start.rejected.entry(reason.clone()).or_default() += 1;
                start.failed.push((key.clone(), reason.clone()));
            }
        }
        slots.push(Slot {
            name: artifact.uri.clone(),
            samples: units.len(),
            work: SlotWork::Fetch { units, start },
        });
    }
    info!(
        "--retry-failed: {retried} rows of {} shards to fetch again",
        slots.len()
    );
    writer.bar.set_length(retried);
    // Shards are rewritten in place: no reader may trust the old manifest meanwhile. Every
    // shard is recorded as finished above, so a retry killed from here on resumes as any run.
    run.manifest_location().delete()?;
    writer.fetch_slots(
        slots,
        downloader(config, options)?,
        options.download.concurrency,
        config.shard_rows,
    )?;
    let Writer { shards, bar, .. } = writer;
    bar.finish_and_clear();
    let ShardSet {
        tally,
        artifacts: rewritten,
        ..
    } = shards;
    let artifacts: Vec<manifests::Artifact> = existing
        .artifacts
        .iter()
        .map(|old| {
            rewritten
                .iter()
                .find(|new| new.uri == old.uri)
                .unwrap_or(old)
                .clone()
        })
        .collect();
    let mut rejected: BTreeMap<String, u64> = existing
        .metrics
        .get("rejected")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    for (reason, count) in replaced_rejected {
        let entry = rejected.entry(reason).or_default();
        *entry = entry.saturating_sub(count);
    }
    for (reason, count) in &tally.rejected {
        *rejected.entry(reason.clone()).or_default() += count;
    }
    rejected.retain(|_, count| *count > 0);
    let previous_rows = existing.metric_u64("rows").unwrap_or(0);
    let rows = previous_rows.saturating_sub(replaced_rows) + tally.rows;
    let mut metrics = existing.metrics.clone();
    metrics.insert("rows".into(), json!(rows));
    metrics.insert("rejected".into(), json!(rejected));
    metrics.insert("retried".into(), json!(retried));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    let manifest = run.publish(artifacts, metrics)?;
    info!(
        "ingest pairs --retry-failed: {retried} rows fetched again, {rows} rows now -> {}",
        run.manifest_location()
    );
    Ok(manifest)
}
