//! `ingest pairs`: image-text pairs from any supported layout into Parquet shards.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::process::{ImageConfig, RawSample, Reason, Row, process};
use crate::shard::{PAIRS_KIND, pairs_from_parquet, pairs_to_parquet};
use crate::sources::{InputFormat, Loaded, SourceConfig, Unit, detect_format, enumerate, load};
use crate::{Error, RunOptions, ShardSet, job_range, progress_bar, record_input, tool};
use manifests::{Location, Manifest, StageRun};

pub const STAGE: &str = "ingest.pairs";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsConfig {
    pub source: SourceConfig,
    pub image: ImageConfig,
    /// Samples per output shard (a container file in the input is one shard).
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

type Outcome = Result<Row, (String, Reason)>;

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

fn process_chunk(chunk: &Chunk<'_>, config: &ImageConfig) -> Vec<Outcome> {
    match chunk.units {
        [container @ Unit::Container(_)] => load(container)
            .into_par_iter()
            .map(|l| process_loaded(l, config))
            .collect(),
        // Load and process each sample on the same worker, so at most one source image per
        // thread is in memory.
        units => units
            .par_iter()
            .flat_map_iter(|unit| load(unit).into_iter().map(|l| process_loaded(l, config)))
            .collect(),
    }
}

pub fn ingest_pairs(config: &PairsConfig, options: &RunOptions) -> Result<Manifest, Error> {
    let started = Instant::now();
    let input = Location::parse(&config.source.input)?;
    let format = detect_format(&input, config.source.format)?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, options.shard)?;
    let image_roots: Vec<Location> = config
        .source
        .image_root
        .iter()
        .map(|r| Location::parse(r))
        .collect::<Result<_, _>>()?;
    record_input(&mut run, &input, &image_roots)?;
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }

    let units = enumerate(&config.source, format)?;
    let range = job_range(units.len(), options.shard);
    let mine = &units[range.clone()];
    info!(
        "{format:?} input {input}: {} units, this job takes {}..{}",
        units.len(),
        range.start,
        range.end
    );
    let chunks = chunks(mine, config.shard_rows);
    let bar = progress_bar(mine.len() as u64, options.progress, "samples");
    let mut shards = ShardSet::new(&run, PAIRS_KIND);
    // Duplicates are the same image bytes reached from a different origin (a COCO image
    // with five captions is one origin, not five duplicates).
    let mut seen: HashMap<String, String> = HashMap::new();
    for (index, chunk) in chunks.iter().enumerate() {
        let name = format!("pairs/part-{:05}-{index:05}.parquet", options.shard.index);
        if let Some(bytes) = shards.resume(&name)? {
            for row in pairs_from_parquet(&shards.uri(&name), bytes)? {
                seen.entry(row.sha256).or_insert(row.source);
            }
            debug!("kept {name} from an interrupted run");
            bar.inc(chunk.units.len() as u64);
            continue;
        }
        let mut rows = Vec::new();
        let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
        for outcome in process_chunk(chunk, &config.image) {
            let result = outcome.and_then(|row| match seen.get(&row.sha256) {
                Some(origin) if *origin != row.source => Err((row.key, "duplicate")),
                _ => {
                    seen.insert(row.sha256.clone(), row.source.clone());
                    Ok(row)
                }
            });
            match result {
                Ok(row) => rows.push(row),
                Err((key, reason)) => {
                    let count = rejected.entry(reason.to_string()).or_default();
                    *count += 1;
                    if shards.tally.rejected.get(reason).copied().unwrap_or(0) + *count <= 10 {
                        warn!(key = %key, reason, "rejected sample");
                    } else {
                        debug!(key = %key, reason, "rejected sample");
                    }
                }
            }
        }
        rows.sort_by(|a, b| (&a.key, &a.source).cmp(&(&b.key, &b.source)));
        let bytes = pairs_to_parquet(&shards.uri(&name), &rows)?;
        shards.write(&name, bytes, rows.len() as u64, &rejected)?;
        bar.inc(chunk.units.len() as u64);
        let tally = &shards.tally;
        bar.set_message(format!(
            "{} rows, {} rejected",
            tally.rows,
            tally.rejected_total()
        ));
        if bar.is_hidden() {
            info!(
                "{name}: {} rows ({} rows, {} rejected so far)",
                rows.len(),
                tally.rows,
                tally.rejected_total()
            );
        }
    }
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
