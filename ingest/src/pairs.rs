//! `ingest pairs`: image-text pairs from any supported layout into Parquet shards.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::Reason;
use crate::process::{ImageConfig, RawSample, process};
use crate::sources::{
    InputFormat, Loaded, SourceConfig, Unit, detect_format, enumerate, image_root, load,
    stream_container,
};
use crate::{Error, RunOptions, ShardSet, begin_with_input, job_range, progress_bar, tool};
use manifests::shards::pairs::{self, PairRow};
use manifests::{Location, Manifest, StageRun};

pub const STAGE: &str = "ingest.pairs";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsConfig {
    pub source: SourceConfig,
    pub image: ImageConfig,
    /// Samples per output shard (a container file in the input makes its own shards).
    pub shard_rows: usize,
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
}

/// What the run carries from shard to shard: the shards written so far, and the image digests
/// seen (duplicates are the same bytes reached from a different origin: a COCO image with five
/// captions is one origin, not five duplicates).
struct Writer<'a> {
    shards: ShardSet<'a>,
    seen: HashMap<String, String>,
    config: &'a ImageConfig,
    bar: indicatif::ProgressBar,
}

impl Writer<'_> {
    /// Whether shard `name` was finished by an interrupted run (digest-checked); its rows then
    /// count, and only the dedup state is rebuilt from them.
    fn resumed(&mut self, name: &str) -> Result<bool, Error> {
        let Some(bytes) = self.shards.resume(name)? else {
            return Ok(false);
        };
        for row in pairs::from_parquet(&self.shards.uri(name), bytes)? {
            self.seen.entry(row.sha256).or_insert(row.source);
        }
        debug!("kept {name} from an interrupted run");
        Ok(true)
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
            let result = outcome.and_then(|row| match self.seen.get(&row.sha256) {
                Some(origin) if *origin != row.source => Err((row.key, "duplicate")),
                _ => {
                    self.seen.insert(row.sha256.clone(), row.source.clone());
                    Ok(row)
                }
            });
            match result {
                Ok(row) => shard.rows.push(row),
                Err((key, reason)) => {
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

    /// Sorts and writes a finished shard.
    fn finish(&mut self, name: &str, mut shard: ShardRows) -> Result<(), Error> {
        shard
            .rows
            .sort_by(|a, b| (&a.key, &a.source).cmp(&(&b.key, &b.source)));
        let bytes = pairs::to_parquet(&self.shards.uri(name), &shard.rows)?;
        let rows = shard.rows.len() as u64;
        self.shards.write(name, bytes, rows, &shard.rejected)?;
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
        let config = self.config;
        let outcomes: Vec<Outcome> = units
            .par_iter()
            .map(|unit| process_loaded(load(unit), config))
            .collect();
        let mut shard = ShardRows::default();
        self.absorb_outcomes(&mut shard, outcomes);
        self.finish(name, shard)
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
        stream_container(location, &mut |loaded| {
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
                    self.finish(&name(part), std::mem::take(&mut shard))?;
                }
                (part, taken, skip) = (part + 1, 0, None);
            }
            Ok(())
        })?;
        if skip == Some(false) {
            self.absorb(&mut shard, batch);
            self.finish(&name(part), shard)?;
        }
        Ok(())
    }
}

/// The images a COCO, CSV, TSV or JSONL file names, each once, under its path relative to the
/// image root (as the list spells it): inputs of the run like the list itself. Folders and
/// containers are identified by listing them instead.
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
    let units = enumerate(&config.source, format)?;
    let named = named_images(&units, format, &image_root(&config.source, &input)?);
    if let Some(existing) = begin_with_input(&mut run, &input, &named, &image_roots, options.force)?
    {
        return Ok(existing);
    }

    let range = job_range(units.len(), options.shard);
    let mine = &units[range.clone()];
    info!(
        "{format:?} input {input}: {} units, this job takes {}..{}",
        units.len(),
        range.start,
        range.end
    );
    let chunks = chunks(mine, config.shard_rows);
    let mut writer = Writer {
        shards: ShardSet::new(&run, pairs::KIND),
        seen: HashMap::new(),
        config: &config.image,
        bar: progress_bar(mine.len() as u64, options.progress, "samples"),
    };
    for (index, chunk) in chunks.iter().enumerate() {
        let base = format!("pairs/part-{:05}-{index:05}", options.shard.index);
        match chunk.units {
            [Unit::Container(location)] => writer.container(&base, location, config.shard_rows)?,
            units => writer.samples(&format!("{base}.parquet"), units)?,
        }
        writer.bar.inc(chunk.units.len() as u64);
    }
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
