//! Input formats: what one unit of work is in each, and how a unit becomes raw samples.
//!
//! Units are enumerated in a deterministic order by every job, then each job takes its
//! contiguous range. A unit is one sample whose image is its own object (folder layout, COCO,
//! CSV/TSV/JSONL) or one container holding many samples (img2dataset parquet, webdataset tar).
//!
//! One file over 600 lines, on purpose: every format's enumeration and reading sit side by side
//! behind the one `InputFormat` switch, so a quirk handled for one format is seen beside the
//! others.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Read};
use std::ops::{ControlFlow, Range};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use manifests::sources::{ReadWhole, SourceDigests, time_before_reading};
use manifests::{Location, ObjectInfo, ShardSpec};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::reading::{
    Capped, ReadFault, Watched, open_watched, parquet_footer, read_capped, stream_parquet,
    stream_parquet_rows,
};
use crate::{Error, Reason, job_range};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// Decide from the input's extension or the files in the folder.
    Auto,
    /// KEY.jpg|png|webp|bmp + KEY.txt (+ KEY.json), img2dataset's "files" layout.
    Folder,
    /// MS-COCO captions JSON; images under --image-root (default: the JSON's folder).
    Coco,
    Csv,
    Tsv,
    Jsonl,
    /// img2dataset parquet shards with image bytes.
    Parquet,
    /// webdataset tars ({key}.jpg, {key}.txt, {key}.json).
    Webdataset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CocoCaptions {
    /// One row per (image, caption).
    All,
    /// One row per image, with its first caption.
    First,
}

/// Where and how to find the samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub input: String,
    pub format: InputFormat,
    /// Folder that image paths in COCO/CSV/TSV/JSONL are relative to (default: the file's folder).
    pub image_root: Option<String>,
    pub coco_captions: CocoCaptions,
    /// Column (or JSON field) with the image path; a 0-based index when `has_header` is false.
    pub image_column: String,
    pub caption_column: String,
    /// Whether CSV/TSV files start with a header row (CC3M and CC12M do not).
    pub has_header: bool,
    /// Column (or JSON field) with image URLs, when it is not `image_column`; without it a
    /// list whose header lacks `image_column` reads its images from a `url` column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_column: Option<String>,
}

/// The column of URL lists that has no `image_column` (LAION, DataComp, img2dataset inputs).
const DEFAULT_URL_COLUMN: &str = "url";

impl SourceConfig {
    /// The column naming each row's image: `url_column` if given, else `image_column`.
    fn image_field(&self) -> &str {
        self.url_column.as_deref().unwrap_or(&self.image_column)
    }
}

/// UTF-8's byte-order mark, which Windows editors put at the start of text files.
pub(crate) const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

#[derive(Debug, Clone)]
pub enum CaptionRef {
    Text(Vec<u8>),
    File(Location),
    Missing,
}

#[derive(Debug, Clone)]
pub enum Unit {
    Sample {
        key: String,
        image: Location,
        caption: CaptionRef,
        metadata: Option<Location>,
    },
    Container(Location),
    /// An image to download (`http://` or `https://`), with the row's caption and extra columns.
    Url {
        key: String,
        url: String,
        caption: Option<Vec<u8>>,
        metadata: Option<String>,
    },
    /// Found broken while enumerating (a malformed table row, a caption without an image).
    Rejected {
        key: String,
        reason: &'static str,
    },
}

/// A sample with its bytes in hand, or the reason it has none.
pub struct Loaded {
    pub key: String,
    /// Identity of the picture's origin (file URI, or container URI and member); two samples
    /// with the same image bytes from different origins are duplicates.
    pub source: String,
    pub image: Result<Bytes, &'static str>,
    pub caption: Option<Vec<u8>>,
    pub metadata: Option<String>,
}

fn extension(name: &str) -> Option<String> {
    name.rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
}

/// The key prefix of each of `files` (its rows are keyed `{prefix}-{row}`): `short(file)`
/// wherever no other file has the same, so keys stay what they have always been; otherwise the
/// file's path below `input` without the first of `extensions` it ends with, or with it where
/// even that is shared (`a.json` beside `a.jsonl`). C4's `c4-train.00000-of-01024.json.gz` and
/// `c4-train.00001-of-01024.json.gz`, or `2023/urls.parquet` and `2024/urls.parquet`, would
/// otherwise key their rows alike.
pub fn key_prefixes(
    files: &[Location],
    input: &Location,
    short: impl Fn(&Location) -> String,
    extensions: &[&str],
) -> Vec<String> {
    fn counts(names: &[String]) -> std::collections::HashMap<&str, usize> {
        let mut counts = std::collections::HashMap::new();
        for name in names {
            *counts.entry(name.as_str()).or_default() += 1;
        }
        counts
    }
    let relative = |file: &Location| {
        file.relative_to(input)
            .unwrap_or_else(|| file.file_name().into())
    };
    let shorts: Vec<String> = files.iter().map(short).collect();
    let short_counts = counts(&shorts);
    let longer: Vec<String> = files
        .iter()
        .zip(&shorts)
        .map(|(file, short)| {
            if short_counts[short.as_str()] == 1 {
                return short.clone();
            }
            let path = relative(file);
            match extensions.iter().find_map(|ext| path.strip_suffix(ext)) {
                Some(stem) => stem.to_string(),
                None => path,
            }
        })
        .collect();
    let longer_counts = counts(&longer);
    files
        .iter()
        .zip(&longer)
        .map(|(file, prefix)| match longer_counts[prefix.as_str()] {
            1 => prefix.clone(),
            _ => relative(file),
        })
        .collect()
}

/// Resolves `auto` from the input's extension, or from the files inside a folder.
pub fn detect_format(input: &Location, format: InputFormat) -> Result<InputFormat, Error> {
    if format != InputFormat::Auto {
        return Ok(format);
    }
    let by_extension = |name: &str| match extension(name).as_deref() {
        Some("json") => Some(InputFormat::Coco),
        Some("csv") => Some(InputFormat::Csv),
        Some("tsv") => Some(InputFormat::Tsv),
        Some("jsonl") => Some(InputFormat::Jsonl),
        Some("parquet") => Some(InputFormat::Parquet),
        Some("tar") => Some(InputFormat::Webdataset),
        _ => None,
    };
    if input.exists()? {
        return by_extension(input.file_name()).ok_or_else(|| {
            Error::Usage(format!(
                "{input}: cannot tell the format from the name; pass --format"
            ))
        });
    }
    let listed = input.list()?;
    if listed.is_empty() {
        return Err(Error::Usage(format!(
            "{input}: no such file or folder, or it is empty"
        )));
    }
    let has = |ext: &str| {
        listed
            .iter()
            .any(|o| extension(o.location.file_name()).as_deref() == Some(ext))
    };
    Ok(if has("tar") {
        InputFormat::Webdataset
    } else if has("parquet") {
        InputFormat::Parquet
    } else {
        InputFormat::Folder
    })
}

/// One job's share of a source (see [`enumerate_job`]).
pub struct JobUnits {
    /// How many units the whole source has.
    pub total: usize,
    /// Which of them are this job's: [`job_range`] over `total`.
    pub range: Range<usize>,
    /// This job's units, built.
    pub units: Vec<Unit>,
    /// Which files of the input folder the job reads, and the listing its share came from;
    /// `None` where the input is one file, or a folder of parquet files.
    pub reads: Option<FolderReads>,
    /// The local list file (CSV, TSV, JSONL, COCO) as the pass that read it whole found it, for
    /// the stage's identity of it: the identity is then of the bytes the units came from. (A
    /// job of many builds its share in a second pass, held to the first by the list's change
    /// marker and row count.)
    pub list_read: Option<ReadWhole>,
}

/// The files of an input folder that a job reads, so that a job of a batch array identifies
/// those alone by content (`manifests::sources::SourceSet::list_reading`), and the folder's
/// listing that the job's share was taken from.
pub struct FolderReads {
    /// One job does all the work, and so reads every file.
    every: bool,
    /// This job's: its units' images, captions, metadata and containers.
    mine: HashSet<String>,
    /// Any job's. The first job also reads the folder's files no job reads (a stats file beside
    /// the shards), so that the jobs together look at every file.
    anyone: HashSet<String>,
    first_job: bool,
    /// Every file the listing that decided the shares held, when it was the whole folder.
    listed: Option<HashSet<String>>,
}

impl FolderReads {
    pub(crate) fn new(
        mine: HashSet<String>,
        anyone: HashSet<String>,
        listed: Option<HashSet<String>>,
        shard: ShardSpec,
    ) -> FolderReads {
        FolderReads {
            every: shard.is_single(),
            mine,
            anyone,
            first_job: shard.index == 0,
            listed,
        }
    }

    /// Whether the job reads the file at `uri`.
    pub fn reads(&self, uri: &str) -> bool {
        self.every || self.mine.contains(uri) || self.first_job && !self.anyone.contains(uri)
    }

    /// Whether `uri` was in the listing the shares were taken from (`true` when unknown).
    pub fn was_listed(&self, uri: &str) -> bool {
        self.listed
            .as_ref()
            .is_none_or(|listed| listed.contains(uri))
    }

    /// How many files that listing held, when known.
    pub fn listed_count(&self) -> Option<usize> {
        self.listed.as_ref().map(HashSet::len)
    }
}

/// The files a unit reads.
fn unit_files(unit: &Unit) -> Vec<String> {
    match unit {
        Unit::Sample {
            image,
            caption,
            metadata,
            ..
        } => {
            let caption = match caption {
                CaptionRef::File(file) => Some(file),
                _ => None,
            };
            std::iter::once(image)
                .chain(caption)
                .chain(metadata)
                .map(Location::uri)
                .collect()
        }
        Unit::Container(file) => vec![file.uri()],
        Unit::Url { .. } | Unit::Rejected { .. } => Vec::new(),
    }
}

/// Enumerates the source's units in the same order for every job and builds this job's share
/// of them only, so that a job of a batch array over a list of a hundred million URLs holds
/// its own rows and not the list. A CSV, TSV or JSONL list is read twice: once to count its
/// rows, once up to the end of the job's share. Parquet lists are
/// counted from their footers, and only the row groups of the share are read.
pub fn enumerate_job(
    config: &SourceConfig,
    format: InputFormat,
    shard: ShardSpec,
) -> Result<JobUnits, Error> {
    let input = Location::parse(&config.input)?;
    match format {
        InputFormat::Auto => enumerate_job(config, detect_format(&input, format)?, shard),
        InputFormat::Csv | InputFormat::Tsv | InputFormat::Jsonl => {
            let pass = |sink: &mut Sink, fault: &ReadFault| match format {
                InputFormat::Jsonl => jsonl_units(config, &input, sink, fault),
                _ => table_units(config, &input, format, sink, fault),
            };
            let before = input.info()?;
            let time = time_before_reading(&input);
            // The pass that reads the whole list digests it, and the digest is taken before the
            // list is checked against `before`: what was added since is in neither or in both.
            let whole = ReadFault::digesting(&input);
            let read_whole = |digest: Option<String>| {
                digest.map(|digest| ReadWhole {
                    digest,
                    bytes: before.size,
                    modified_ns: time,
                })
            };
            if shard.count <= 1 {
                let mut all = Sink::new(0..usize::MAX);
                pass(&mut all, &whole)?;
                let digest = whole.digest(&input)?;
                unchanged_since(&before)?;
                let mut job = all.into_job(shard);
                job.list_read = read_whole(digest);
                return Ok(job);
            }
            let mut counted = Sink::counter();
            pass(&mut counted, &whole)?;
            let list_read = read_whole(whole.digest(&input)?);
            let range = job_range(counted.count, shard);
            let mut share = Sink::new(range.clone());
            pass(&mut share, &ReadFault::default())?;
            // Rows counted in one version of the list and built from another would be lost or
            // taken twice across the jobs. A change marker may miss a rewrite (a file system
            // whose times are coarse); a list that came up short is caught by its count too.
            unchanged_since(&before)?;
            if share.units.len() != range.len() {
                return Err(Error::Io(format!(
                    "{input} changed while this job read it: it had {} rows, then fewer",
                    counted.count
                )));
            }
            Ok(JobUnits {
                total: counted.count,
                range,
                units: share.units,
                reads: None,
                list_read,
            })
        }
        InputFormat::Folder | InputFormat::Coco => {
            let (units, listing, list_read) = match format {
                InputFormat::Folder => {
                    let listing = input.list()?;
                    (folder_units(&input, &listing), Some(listing), None)
                }
                _ => {
                    let (units, read) = coco_units(config, &input)?;
                    (units, None, read)
                }
            };
            let mut all = Sink::new(0..usize::MAX);
            let anyone = shared_files(shard, units.iter().flat_map(unit_files));
            units.into_iter().for_each(|unit| all.push(unit));
            let folder = listing.map(|listing| (uris(&listing), anyone));
            let mut job = all.into_job(shard).reading(folder, shard);
            job.list_read = list_read;
            Ok(job)
        }
        InputFormat::Parquet | InputFormat::Webdataset => {
            let wanted = match format {
                InputFormat::Parquet => "parquet",
                _ => "tar",
            };
            let listing = match input.exists()? {
                true => None,
                false => Some(input.list()?),
            };
            let files: Vec<Location> = match &listing {
                None => vec![input.clone()],
                Some(listing) => listing
                    .iter()
                    .map(|o| o.location.clone())
                    .filter(|l| extension(l.file_name()).as_deref() == Some(wanted))
                    .collect(),
            };
            match format {
                InputFormat::Parquet => parquet_job(config, &input, files, shard),
                _ => {
                    let anyone = shared_files(shard, files.iter().map(Location::uri));
                    let folder = listing.map(|listing| (uris(&listing), anyone));
                    let mut all = Sink::new(0..usize::MAX);
                    files
                        .into_iter()
                        .for_each(|file| all.push(Unit::Container(file)));
                    Ok(all.into_job(shard).reading(folder, shard))
                }
            }
        }
    }
}

/// An error naming the file when it is no longer what `before` describes (its size, or its
/// store's change marker: the ETag, or the local file's inode, time and size).
fn unchanged_since(before: &ObjectInfo) -> Result<(), Error> {
    match before.location.info()? == *before {
        true => Ok(()),
        false => Err(Error::Io(format!(
            "{} changed while this job read it: run the job again",
            before.location
        ))),
    }
}

/// What a pass over a source keeps: the units within `window`, built. It counts every unit,
/// built or not, and the pass stops at the window's end.
struct Sink {
    window: Range<usize>,
    units: Vec<Unit>,
    count: usize,
}

impl Sink {
    fn new(window: Range<usize>) -> Sink {
        Sink {
            window,
            units: Vec::new(),
            count: 0,
        }
    }

    /// Builds nothing and counts every unit: an empty window past any count a source reaches.
    fn counter() -> Sink {
        Sink::new(usize::MAX..usize::MAX)
    }

    /// Whether the next unit is looked at, so must be built.
    fn wants_next(&self) -> bool {
        self.window.contains(&self.count)
    }

    /// Whether no later unit is looked at: the pass may stop reading.
    fn is_done(&self) -> bool {
        self.count >= self.window.end
    }

    fn push(&mut self, unit: Unit) {
        if self.window.contains(&self.count) {
            self.units.push(unit);
        }
        self.count += 1;
    }

    /// Counts a unit that is not looked at.
    fn skip(&mut self) {
        self.count += 1;
    }

    /// All units were kept: the job's share of them.
    fn into_job(self, shard: ShardSpec) -> JobUnits {
        let range = job_range(self.count, shard);
        let mut units = self.units;
        JobUnits {
            total: self.count,
            units: units.drain(range.clone()).collect(),
            range,
            reads: None,
            list_read: None,
        }
    }
}

impl JobUnits {
    /// The job's [`FolderReads`] over a folder, given its listing and the files any job reads
    /// (`None`: the input is one file).
    fn reading(
        mut self,
        folder: Option<(HashSet<String>, HashSet<String>)>,
        shard: ShardSpec,
    ) -> JobUnits {
        self.reads = folder.map(|(listed, anyone)| {
            let mine = shared_files(shard, self.units.iter().flat_map(unit_files));
            FolderReads::new(mine, anyone, Some(listed), shard)
        });
        self
    }
}

/// The URIs of `files` for a job of many, which must know whose each file is; none for one
/// job, which reads every file.
pub(crate) fn shared_files(
    shard: ShardSpec,
    files: impl Iterator<Item = String>,
) -> HashSet<String> {
    match shard.is_single() {
        true => HashSet::new(),
        false => files.collect(),
    }
}

pub(crate) fn uris(listing: &[ObjectInfo]) -> HashSet<String> {
    listing.iter().map(|object| object.location.uri()).collect()
}

/// How many parquet footers a job reads at once.
const FOOTER_READS_IN_FLIGHT: usize = 32;

/// A job's share of a folder (or file) of parquet files. Each URL list counts as its rows and
/// each img2dataset container (or file damaged before its data) as one unit; all are counted
/// from their footers, and only the row groups within the share are read.
fn parquet_job(
    config: &SourceConfig,
    input: &Location,
    files: Vec<Location>,
    shard: ShardSpec,
) -> Result<JobUnits, Error> {
    let prefixes = key_prefixes(
        &files,
        input,
        |file| file.file_name().trim_end_matches(".parquet").to_string(),
        &[".parquet"],
    );
    let list_of = |file: &Location| -> Result<Option<(String, usize, ObjectInfo)>, Error> {
        Ok(match parquet_footer(file)? {
            Ok(footer) if footer.rows > 0 => list_url_column(config, file, &footer.schema)?
                .map(|url_column| (url_column, footer.rows, footer.info)),
            // A file without rows is a container of nothing, whatever its columns; a damaged
            // one's damage is counted when it is streamed as a container.
            _ => None,
        })
    };
    // Every job reads every footer; in a bucket each is a round trip or two, so thousands of
    // files are read many at a time.
    let readers = rayon::ThreadPoolBuilder::new()
        .num_threads(FOOTER_READS_IN_FLIGHT.min(files.len()).max(1))
        .build()
        .map_err(|e| Error::Io(format!("cannot start threads to read footers: {e}")))?;
    let lists: Vec<_> =
        readers.install(|| files.par_iter().map(list_of).collect::<Result<_, _>>())?;
    let layout: Vec<_> = files
        .into_iter()
        .zip(prefixes)
        .zip(lists)
        .map(|((file, prefix), list)| (file, prefix, list))
        .collect();
    let units_of =
        |list: &Option<(String, usize, ObjectInfo)>| list.as_ref().map_or(1, |(_, rows, _)| *rows);
    // Each file's count is below 2^63 (its footer is checked), so the sum fits in a u128.
    let total = layout
        .iter()
        .map(|(_, _, list)| units_of(list) as u128)
        .sum::<u128>();
    let total = usize::try_from(total).map_err(|_| {
        Error::Usage(format!(
            "{input}: the parquet files' footers claim {total} rows in all, more than one run can count"
        ))
    })?;
    let range = job_range(total, shard);
    let mut units = Vec::new();
    let mut first = 0;
    for (file, prefix, list) in layout {
        let count = units_of(&list);
        let share = range.start.max(first)..range.end.min(first + count);
        if !share.is_empty() {
            match list {
                None => units.push(Unit::Container(file)),
                Some((url_column, _, footer)) => {
                    let rows = share.start - first..share.end - first;
                    parquet_list_rows(config, &file, &prefix, &url_column, rows, &mut units)?;
                    // Rows of another version than its footer counted would shift every job's.
                    unchanged_since(&footer)?;
                }
            }
        }
        first += count;
    }
    Ok(JobUnits {
        total,
        range,
        units,
        // Every job reads every footer, and each file's row count moves every job's share: so
        // each job identifies every file by content.
        reads: None,
        list_read: None,
    })
}

#[derive(Default)]
struct FolderGroup {
    image: Option<Location>,
    /// More images with the same key (`x.jpg` beside `x.png`): counted, not silently dropped.
    extra_images: Vec<Location>,
    caption: Option<Location>,
    metadata: Option<Location>,
}

/// The units of a folder in img2dataset's "files" layout, from its `listing`.
fn folder_units(input: &Location, listing: &[ObjectInfo]) -> Vec<Unit> {
    let mut groups: BTreeMap<String, FolderGroup> = BTreeMap::new();
    for object in listing {
        let Some(relative) = object.location.relative_to(input) else {
            continue;
        };
        let Some((stem, ext)) = relative.rsplit_once('.') else {
            continue;
        };
        let ext = ext.to_ascii_lowercase();
        let group = groups.entry(stem.to_string()).or_default();
        match ext.as_str() {
            "txt" => group.caption = Some(object.location.clone()),
            "json" => group.metadata = Some(object.location.clone()),
            e if IMAGE_EXTENSIONS.contains(&e) => match group.image {
                None => group.image = Some(object.location.clone()),
                Some(_) => group.extra_images.push(object.location.clone()),
            },
            _ => {}
        }
    }
    let mut units = Vec::new();
    for (key, group) in groups {
        for extra in &group.extra_images {
            units.push(Unit::Rejected {
                key: extra.uri(),
                reason: "duplicate_key",
            });
        }
        match group.image {
            Some(image) => units.push(Unit::Sample {
                key,
                image,
                caption: group.caption.map_or(CaptionRef::Missing, CaptionRef::File),
                metadata: group.metadata,
            }),
            None if group.caption.is_some() => units.push(Unit::Rejected {
                key,
                reason: "no_image",
            }),
            None => {}
        }
    }
    units
}

/// The folder that image paths in the list `table` are relative to.
pub fn image_root(config: &SourceConfig, table: &Location) -> Result<Location, Error> {
    match &config.image_root {
        Some(root) => Ok(Location::parse(root)?),
        None => Ok(table.parent()),
    }
}

/// A path in a table: absolute URI/path as given, otherwise relative to the image root.
fn image_location(root: &Location, path: &str) -> Result<Location, Error> {
    if path.contains("://") || path.starts_with('/') {
        Ok(Location::parse(path)?)
    } else {
        Ok(root.join(path))
    }
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}
#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    /// `coco_url`, `flickr_url`: read when `--url-column` names one.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}
#[derive(Deserialize)]
struct CocoAnnotation {
    /// Absent in some exports: a caption is then keyed by its place among its image's.
    id: Option<u64>,
    image_id: u64,
    caption: String,
}

/// The units of a COCO captions file, and the file as they came from it where it is local.
fn coco_units(
    config: &SourceConfig,
    input: &Location,
) -> Result<(Vec<Unit>, Option<ReadWhole>), Error> {
    let time = time_before_reading(input);
    let bytes = input.get()?;
    let read = input.local_path().map(|_| ReadWhole {
        digest: manifests::digest_bytes(&bytes),
        bytes: bytes.len() as u64,
        modified_ns: time,
    });
    let coco: CocoFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Usage(format!("{input}: not an MS-COCO captions file: {e}")))?;
    let root = image_root(config, input)?;
    let mut captions: BTreeMap<u64, Vec<&CocoAnnotation>> = BTreeMap::new();
    for annotation in &coco.annotations {
        captions
            .entry(annotation.image_id)
            .or_default()
            .push(annotation);
    }
    let mut images: Vec<&CocoImage> = coco.images.iter().collect();
    images.sort_by_key(|image| image.id);
    let listed: std::collections::BTreeSet<u64> = images.iter().map(|image| image.id).collect();
    let mut units = Vec::new();
    for image in images {
        let key = format!("{:012}", image.id);
        let url = config
            .url_column
            .as_ref()
            .and_then(|field| image.other.get(field))
            .and_then(|v| v.as_str())
            .filter(|url| is_url(url));
        let location = match image_location(&root, &image.file_name) {
            Ok(location) => location,
            Err(_) => {
                units.push(Unit::Rejected {
                    key,
                    reason: "bad_path",
                });
                continue;
            }
        };
        let annotations = captions
            .get(&image.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let chosen: &[&CocoAnnotation] = match config.coco_captions {
            CocoCaptions::First => annotations.get(..1).unwrap_or_default(),
            CocoCaptions::All => annotations,
        };
        if chosen.is_empty() {
            units.push(Unit::Rejected {
                key: key.clone(),
                reason: "no_caption",
            });
        }
        for (place, annotation) in chosen.iter().enumerate() {
            let key = match config.coco_captions {
                CocoCaptions::First => key.clone(),
                CocoCaptions::All => format!("{key}-{}", annotation_key(annotation.id, place)),
            };
            let caption = annotation.caption.clone().into_bytes();
            units.push(match url {
                Some(url) => Unit::Url {
                    key,
                    url: url.to_string(),
                    caption: Some(caption),
                    metadata: None,
                },
                None => Unit::Sample {
                    key,
                    image: location.clone(),
                    caption: CaptionRef::Text(caption),
                    metadata: None,
                },
            });
        }
    }
    // Captions of images the file does not list: counted, as the folder layout counts a
    // caption without its image.
    for (place, annotation) in coco
        .annotations
        .iter()
        .enumerate()
        .filter(|(_, annotation)| !listed.contains(&annotation.image_id))
    {
        units.push(Unit::Rejected {
            key: format!(
                "{:012}-{}",
                annotation.image_id,
                annotation_key(annotation.id, place)
            ),
            reason: "no_image",
        });
    }
    Ok((units, read))
}

/// A caption's part of its key: its annotation id, or without one its place (`p` and the
/// number, so it cannot be taken for another caption's id): among its image's captions, or
/// for a caption of an image the file does not list, in the file.
fn annotation_key(id: Option<u64>, place: usize) -> String {
    match id {
        Some(id) => format!("{id:09}"),
        None => format!("p{place:09}"),
    }
}

/// A list's row longer than this stops the run: no image-text row comes near it, and a file
/// that is no list (a binary file, one line of minified JSON) is not held in memory whole.
const MAX_LIST_ROW_BYTES: usize = 16 << 20;

/// Follows a list's bytes in order: the line, the length of the row so far (a quoted CSV field
/// carries a row over line breaks), and, with `quoting`, the line where a quoted field opens
/// that the file never closes. Quotes are read as the csv crate reads them: a quote opens a
/// field only at its start, `""` inside it is a quote, and any other quote closes it.
struct RowScan {
    delimiter: u8,
    quoting: bool,
    /// Whether a lone `\r` ends a row, as it ends a csv record (CSV, TSV), or not (JSONL, whose
    /// rows end at `\n` only).
    cr_ends_row: bool,
    line: usize,
    row_line: usize,
    row_bytes: usize,
    state: QuoteState,
}

#[derive(Clone, Copy)]
enum QuoteState {
    Outside {
        field_start: bool,
    },
    Inside {
        opened_at: usize,
    },
    /// A quote inside a quoted field: an escaped quote if another follows, else the field's end.
    QuoteInside {
        opened_at: usize,
    },
}

impl RowScan {
    fn new(delimiter: u8, quoting: bool, cr_ends_row: bool) -> RowScan {
        RowScan {
            delimiter,
            quoting,
            cr_ends_row,
            line: 1,
            row_line: 1,
            row_bytes: 0,
            state: QuoteState::Outside { field_start: true },
        }
    }

    /// `Err(line)`: the row that starts at `line` is longer than [`MAX_LIST_ROW_BYTES`].
    fn feed(&mut self, bytes: &[u8]) -> Result<(), usize> {
        if !self.quoting {
            return self.feed_unquoted(bytes);
        }
        for &byte in bytes {
            self.state = match self.state {
                QuoteState::Inside { opened_at } if byte == b'"' => {
                    QuoteState::QuoteInside { opened_at }
                }
                QuoteState::Inside { opened_at } => QuoteState::Inside { opened_at },
                QuoteState::QuoteInside { opened_at } if byte == b'"' => {
                    QuoteState::Inside { opened_at }
                }
                QuoteState::QuoteInside { .. } => self.outside(byte, false),
                QuoteState::Outside { field_start } => self.outside(byte, field_start),
            };
            if byte == b'\n' {
                self.line += 1;
            }
            match self.state {
                // The csv crate ends a record at `\r` too (old Mac line ends).
                QuoteState::Outside { .. }
                    if byte == b'\n' || (byte == b'\r' && self.cr_ends_row) =>
                {
                    (self.row_line, self.row_bytes) = (self.line, 0);
                }
                _ if self.row_bytes == MAX_LIST_ROW_BYTES => return Err(self.row_line),
                _ => self.row_bytes += 1,
            }
        }
        Ok(())
    }

    /// [`RowScan::feed`] without quoting (TSV, JSONL): only line ends matter, found a word at
    /// a time rather than a byte at a time.
    fn feed_unquoted(&mut self, mut bytes: &[u8]) -> Result<(), usize> {
        let cr_ends_row = self.cr_ends_row;
        let row_end = |bytes: &[u8]| match cr_ends_row {
            true => memchr::memchr2(b'\n', b'\r', bytes),
            false => memchr::memchr(b'\n', bytes),
        };
        while let Some(end) = row_end(bytes) {
            if self.row_bytes + end > MAX_LIST_ROW_BYTES {
                return Err(self.row_line);
            }
            if bytes[end] == b'\n' {
                self.line += 1;
            }
            (self.row_line, self.row_bytes) = (self.line, 0);
            bytes = &bytes[end + 1..];
        }
        self.row_bytes += bytes.len();
        match self.row_bytes > MAX_LIST_ROW_BYTES {
            true => Err(self.row_line),
            false => Ok(()),
        }
    }

    fn outside(&self, byte: u8, field_start: bool) -> QuoteState {
        if byte == b'"' && field_start && self.quoting {
            return QuoteState::Inside {
                opened_at: self.line,
            };
        }
        QuoteState::Outside {
            field_start: matches!(byte, b'\n' | b'\r') || byte == self.delimiter,
        }
    }

    /// After the last byte: the line of the quote left open, if one is.
    fn unclosed(&self) -> Option<usize> {
        match self.state {
            QuoteState::Inside { opened_at } => Some(opened_at),
            _ => None,
        }
    }
}

/// A list's bytes, shown to a [`RowScan`] as they are read; a row over the cap fails the read.
struct ListReader<R> {
    inner: R,
    scan: RowScan,
}

impl<R: Read> Read for ListReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(out)?;
        self.scan.feed(&out[..read]).map_err(|line| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the row at line {line} is longer than {} MiB: not a list of image-text rows",
                    MAX_LIST_ROW_BYTES >> 20
                ),
            )
        })?;
        Ok(read)
    }
}

/// One pass over a CSV or TSV list into `sink`, streamed: up to the end of the sink's window,
/// or through the whole file (and then a quote left open is an error).
fn table_units(
    config: &SourceConfig,
    input: &Location,
    format: InputFormat,
    sink: &mut Sink,
    fault: &ReadFault,
) -> Result<(), Error> {
    let delimiter = match format {
        InputFormat::Tsv => b'\t',
        _ => b',',
    };
    let source = ListReader {
        inner: Watched::new(input.reader_from(0)?, fault),
        scan: RowScan::new(delimiter, format == InputFormat::Csv, true),
    };
    let failed = |e: csv::Error| match fault.error(input) {
        Some(failed) => failed,
        None => Error::Usage(format!("{input}: {e}")),
    };
    let root = image_root(config, input)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(config.has_header)
        .flexible(true)
        .quoting(format == InputFormat::Csv)
        .from_reader(source);
    let column_index = |name: &str, headers: Option<&csv::ByteRecord>| -> Result<usize, Error> {
        match headers {
            Some(headers) => headers.iter().position(|h| h == name.as_bytes()).ok_or_else(|| {
                Error::Usage(format!("{input}: no column '{name}' in the header (use --image-column/--caption-column)"))
            }),
            None => name.parse().map_err(|_| {
                Error::Usage(format!("{input}: without a header, columns are 0-based indices, not '{name}'"))
            }),
        }
    };
    let headers = match config.has_header {
        true => Some(reader.byte_headers().map_err(failed)?.clone()),
        false => None,
    };
    let image_col = match (&config.url_column, headers.as_ref()) {
        (None, Some(headers))
            if !headers.iter().any(|h| h == config.image_column.as_bytes())
                && headers.iter().any(|h| h == DEFAULT_URL_COLUMN.as_bytes()) =>
        {
            column_index(DEFAULT_URL_COLUMN, Some(headers))?
        }
        _ => column_index(config.image_field(), headers.as_ref())?,
    };
    let caption_col = column_index(&config.caption_column, headers.as_ref())?;
    let mut record = csv::ByteRecord::new();
    let mut row = 0usize;
    while !sink.is_done() {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) if !sink.wants_next() => sink.skip(),
            Ok(true) => sink.push(table_row(
                &root,
                format!("{row:09}"),
                &record,
                [image_col, caption_col],
            )),
            // The disk or store failed: that says nothing about the row.
            Err(e) if e.is_io_error() => return Err(failed(e)),
            Err(_) => sink.push(Unit::Rejected {
                key: format!("{row:09}"),
                reason: "malformed_row",
            }),
        }
        row += 1;
    }
    if sink.is_done() {
        return Ok(());
    }
    // The csv reader ends such a field at the end of the file without an error, so every row
    // after the quote would become one caption and the rest be lost uncounted.
    match reader.into_inner().scan.unclosed() {
        Some(line) => Err(Error::Usage(format!(
            "{input}, line {line}: a quoted field is never closed (a quote left open takes in \
             every row after it)"
        ))),
        None => Ok(()),
    }
}

/// The unit of one table row, from its image and caption columns.
fn table_row(
    root: &Location,
    key: String,
    record: &csv::ByteRecord,
    [image, caption]: [usize; 2],
) -> Unit {
    let (Some(path), caption) = (record.get(image), record.get(caption)) else {
        return Unit::Rejected {
            key,
            reason: "malformed_row",
        };
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return Unit::Rejected {
            key,
            reason: "bad_path",
        };
    };
    sample_from_row(root, key, path, caption.map(<[u8]>::to_vec))
}

fn sample_from_row(root: &Location, key: String, path: &str, caption: Option<Vec<u8>>) -> Unit {
    let path = path.trim();
    if is_url(path) {
        return Unit::Url {
            key,
            url: path.to_string(),
            caption,
            metadata: None,
        };
    }
    match image_location(root, path) {
        Ok(image) if !path.is_empty() => Unit::Sample {
            key,
            image,
            caption: caption.map_or(CaptionRef::Missing, CaptionRef::Text),
            metadata: None,
        },
        _ => Unit::Rejected {
            key,
            reason: "bad_path",
        },
    }
}

/// One pass over a JSONL list into `sink`, streamed, up to the end of the sink's window.
fn jsonl_units(
    config: &SourceConfig,
    input: &Location,
    sink: &mut Sink,
    fault: &ReadFault,
) -> Result<(), Error> {
    let list = ListReader {
        inner: Watched::new(input.reader_from(0)?, fault),
        scan: RowScan::new(b',', false, false),
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, list);
    let root = image_root(config, input)?;
    let mut line = Vec::new();
    let mut row = 0usize;
    while !sink.is_done() {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(|e| {
            fault
                .error(input)
                .unwrap_or_else(|| Error::Usage(format!("{input}: {e}")))
        })?;
        if read == 0 {
            break;
        }
        let mut text = line.strip_suffix(b"\n").unwrap_or(&line);
        if row == 0 {
            text = text.strip_prefix(BYTE_ORDER_MARK).unwrap_or(text);
        }
        let key = format!("{row:09}");
        row += 1;
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if !sink.wants_next() {
            sink.skip();
            continue;
        }
        sink.push(jsonl_row(config, &root, key, text));
    }
    Ok(())
}

/// The unit of one JSONL row.
fn jsonl_row(config: &SourceConfig, root: &Location, key: String, line: &[u8]) -> Unit {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(line) else {
        return Unit::Rejected {
            key,
            reason: "malformed_row",
        };
    };
    let path = object.get(config.image_field()).or_else(|| {
        config
            .url_column
            .is_none()
            .then(|| object.get(DEFAULT_URL_COLUMN))
            .flatten()
    });
    let Some(path) = path.and_then(|v| v.as_str()) else {
        return Unit::Rejected {
            key,
            reason: "bad_path",
        };
    };
    let caption = object
        .get(&config.caption_column)
        .and_then(|v| v.as_str())
        .map(|s| s.as_bytes().to_vec());
    sample_from_row(root, key, path, caption)
}

/// A caption or metadata file (or tar member) longer than this is refused unread: no caption
/// the filters keep is near it, and memory stays bounded whatever a file holds.
const MAX_SIDECAR_BYTES: u64 = 16 << 20;

/// Reads what a sample unit refers to. A missing object is a rejection of that sample; a
/// store or disk that fails to read one (permission, network, I/O) is an error of the run,
/// naming the file, since it says nothing about the sample. An image file longer than
/// `max_image_bytes`, or a caption or metadata file over [`MAX_SIDECAR_BYTES`], is refused
/// unread. A file that is not what `digests` says the stage's identity was taken from is an
/// error of the run too.
pub fn load(unit: &Unit, max_image_bytes: u64, digests: &SourceDigests) -> Result<Loaded, Error> {
    Ok(match unit {
        Unit::Rejected { key, reason } => Loaded::rejected(key.clone(), String::new(), reason),
        Unit::Sample {
            key,
            image,
            caption,
            metadata,
        } => {
            let mut refused = None;
            let mut sidecar = |location: &Location, too_large: Reason| {
                Ok::<_, Error>(match read_capped(location, MAX_SIDECAR_BYTES, digests)? {
                    Capped::Bytes(bytes) => Some(bytes),
                    Capped::TooLarge => {
                        refused.get_or_insert(too_large);
                        None
                    }
                    Capped::Missing => None,
                })
            };
            let caption = match caption {
                CaptionRef::Text(text) => Some(text.clone()),
                CaptionRef::File(location) => {
                    sidecar(location, "caption_too_long")?.map(|b| b.to_vec())
                }
                CaptionRef::Missing => None,
            };
            let metadata = match metadata {
                Some(location) => sidecar(location, "metadata_too_large")?,
                None => None,
            };
            let picture = match refused {
                Some(reason) => Err(reason),
                None => match read_capped(image, max_image_bytes, digests)? {
                    Capped::Bytes(bytes) => Ok(bytes),
                    Capped::TooLarge => Err("too_large"),
                    Capped::Missing => Err("missing_file"),
                },
            };
            Loaded {
                key: key.clone(),
                source: image.uri(),
                image: picture,
                caption,
                metadata: metadata.and_then(|b| String::from_utf8(b.to_vec()).ok()),
            }
        }
        // Downloads go through the URL pipeline of `ingest pairs`, never loaded here.
        Unit::Url { key, url, .. } => {
            Loaded::rejected(key.clone(), crate::download::redacted(url), "not_a_sample")
        }
        // Containers stream through `stream_container` (chunks keep them alone); never loaded
        // whole.
        Unit::Container(location) => Loaded::rejected(
            location.file_name().to_string(),
            location.uri(),
            "not_a_sample",
        ),
    })
}

impl Loaded {
    fn rejected(key: String, source: String, reason: &'static str) -> Loaded {
        Loaded {
            key,
            source,
            image: Err(reason),
            caption: None,
            metadata: None,
        }
    }
}

/// Whether a list names this image by URL (downloaded) rather than by path or bucket URI.
pub fn is_url(path: &str) -> bool {
    let lower = path.get(..8).unwrap_or(path).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The URL column of a parquet URL list (LAION, DataComp: a URL column and no image bytes),
/// from its schema; `None` when the file holds images (img2dataset output). A list without
/// its URL or caption column, or with something else than text in them, is an error naming
/// the file: read under the wrong column names, it would reject every row one by one.
fn list_url_column(
    config: &SourceConfig,
    location: &Location,
    schema: &Schema,
) -> Result<Option<String>, Error> {
    let is_image = |field: &Field| {
        PARQUET_IMAGE_COLUMNS.contains(&field.name().as_str()) && is_bytes(field.data_type())
    };
    if schema.fields().iter().any(|field| is_image(field)) {
        return Ok(None);
    }
    let type_of = |name: &str| {
        schema
            .field_with_name(name)
            .ok()
            .map(|f| text_type(f.data_type()))
    };
    let url_column = match config.url_column.as_deref() {
        Some(name) => name,
        None if type_of(&config.image_column) == Some(Ok(true)) => &config.image_column,
        None => DEFAULT_URL_COLUMN,
    };
    let checked = |name: &str, missing: Error| match type_of(name) {
        None => Err(missing),
        Some(Err(other)) => Err(Error::Usage(format!(
            "{location}: column '{name}' holds {other}, not text"
        ))),
        Some(Ok(_)) => Ok(()),
    };
    checked(
        url_column,
        Error::Usage(format!(
            "{location}: neither an image column of bytes ({}) nor the URL column '{url_column}' \
             (its columns: {}; --url-column names another)",
            PARQUET_IMAGE_COLUMNS.join(", "),
            column_names(schema)
        )),
    )?;
    checked(
        &config.caption_column,
        missing_caption_column(location, schema, &config.caption_column),
    )?;
    Ok(Some(url_column.to_string()))
}

/// Whether a column of `data_type` reads as text: `Ok(true)` for strings, however they are
/// stored; `Ok(false)` for pyarrow's `null` type (a column of nothing but nulls); else the
/// type it holds instead.
fn text_type(data_type: &DataType) -> Result<bool, DataType> {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(true),
        DataType::Null => Ok(false),
        DataType::Dictionary(_, values) => text_type(values),
        other => Err(other.clone()),
    }
}

/// The rows `rows` of the parquet URL list at `location` onto `units`, in order, keyed
/// `{stem}-{row}`; the file's other string columns become each row's JSON metadata. A row the
/// file cannot give (a damaged row group, or a file shorter than its footer says) is rejected
/// as `unreadable_parquet`; a failed read of the file is an error.
fn parquet_list_rows(
    config: &SourceConfig,
    location: &Location,
    stem: &str,
    url_column: &str,
    rows: Range<usize>,
    units: &mut Vec<Unit>,
) -> Result<(), Error> {
    let mut read = BTreeMap::new();
    let lost = stream_parquet_rows(location, PARQUET_BATCH_ROWS, rows, &mut |first, batch| {
        // The footer said the columns are there and text: these do not fail.
        let column = |name: &str| -> Result<ArrayRef, Error> {
            text_column(location, &batch, name)?.ok_or_else(|| {
                Error::Usage(format!("{location}: no column '{name}' in a row group"))
            })
        };
        let (urls, captions) = (column(url_column)?, column(&config.caption_column)?);
        let schema = batch.schema();
        let extra: Vec<(&str, ArrayRef)> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| (field.name().as_str(), plain(column)))
            .filter(|(name, _)| *name != url_column && *name != config.caption_column)
            .collect();
        let mut batch_units = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let key = format!("{stem}-{:09}", first + i);
            let caption = string_at(&captions, i).map(String::into_bytes);
            let mut fields = serde_json::Map::new();
            for (name, column) in &extra {
                if let Some(value) = string_at(column, i) {
                    fields.insert(name.to_string(), serde_json::Value::String(value));
                }
            }
            let metadata =
                (!fields.is_empty()).then(|| serde_json::Value::Object(fields).to_string());
            batch_units.push(match string_at(&urls, i) {
                Some(url) if is_url(url.trim()) => Unit::Url {
                    key,
                    url: url.trim().to_string(),
                    caption,
                    metadata,
                },
                _ => Unit::Rejected {
                    key,
                    reason: "bad_url",
                },
            });
        }
        read.insert(first, batch_units);
        Ok(())
    })?;
    for range in lost {
        let rejected = range
            .clone()
            .map(|row| Unit::Rejected {
                key: format!("{stem}-{row:09}"),
                reason: "unreadable_parquet",
            })
            .collect();
        read.insert(range.start, rejected);
    }
    units.extend(read.into_values().flatten());
    Ok(())
}

/// The names img2dataset gives its image column, after the encode format.
const PARQUET_IMAGE_COLUMNS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "image"];

fn parquet_image_column(batch: &RecordBatch) -> Option<ArrayRef> {
    PARQUET_IMAGE_COLUMNS.iter().find_map(|name| {
        batch
            .column_by_name(name)
            .cloned()
            .filter(|c| is_bytes(c.data_type()))
    })
}

/// Whether a column of `data_type` holds bytes, as an image column does.
fn is_bytes(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

/// `column` with a dictionary encoding decoded (pyarrow writes pandas categoricals and
/// `pa.dictionary` columns so); any other column as it is.
fn plain(column: &ArrayRef) -> ArrayRef {
    column
        .as_any_dictionary_opt()
        .and_then(|dictionary| {
            arrow_select::take::take(dictionary.values().as_ref(), dictionary.keys(), None).ok()
        })
        .unwrap_or_else(|| column.clone())
}

fn is_text(column: &ArrayRef) -> bool {
    matches!(
        column.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// The column `name` of `batch` as strings, however they are stored; `None` when there is no
/// such column, an error naming the file and the column when it holds something else.
fn text_column(
    location: &Location,
    batch: &RecordBatch,
    name: &str,
) -> Result<Option<ArrayRef>, Error> {
    let Some(column) = batch.column_by_name(name).map(plain) else {
        return Ok(None);
    };
    // pyarrow types a column of nothing but nulls (an empty caption column) `null`.
    if column.data_type() == &DataType::Null {
        return Ok(Some(arrow_array::new_null_array(
            &DataType::Utf8,
            column.len(),
        )));
    }
    match is_text(&column) {
        true => Ok(Some(column)),
        false => Err(Error::Usage(format!(
            "{location}: column '{name}' holds {}, not text",
            column.data_type()
        ))),
    }
}

fn column_names(schema: &Schema) -> String {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    names.join(", ")
}

/// Without its caption column every row of a file would be rejected as `no_caption`.
fn missing_caption_column(location: &Location, schema: &Schema, name: &str) -> Error {
    Error::Usage(format!(
        "{location}: no caption column '{name}' (its columns: {}; --caption-column names \
         another)",
        column_names(schema)
    ))
}

/// Record batches of an img2dataset parquet file are cut to this many rows.
const PARQUET_BATCH_ROWS: usize = 256;

/// Hands `each` the samples of a container in container order, streaming: a tar holds one
/// sample in memory at a time, a parquet file one row group's columns. A damaged container
/// (bad or cut short) gives what came before the damage and one rejection for it; a container
/// that is gone gives one rejection. A failed read (permission, network, I/O) or an error from
/// `each` ends the stream with an error. A tar's image member longer than `max_image_bytes`
/// is refused unread. A tar that is not what `digests` says the stage's identity was taken from
/// ends the stream with an error once it is read (parquet files are read in ranges, not whole,
/// and are not checked).
pub fn stream_container(
    location: &Location,
    caption_column: &str,
    max_image_bytes: u64,
    digests: &SourceDigests,
    each: &mut dyn FnMut(Loaded) -> Result<(), Error>,
) -> Result<(), Error> {
    let whole = |reason| Loaded::rejected(location.file_name().to_string(), location.uri(), reason);
    if extension(location.file_name()).as_deref() == Some("tar") {
        let fault = ReadFault::checking(digests, location);
        return match open_watched(location, &fault)? {
            Some(reader) => {
                stream_tar(location, Box::new(reader), &fault, max_image_bytes, each)?;
                fault.finish(digests, location)
            }
            None => {
                digests.check(location, None)?;
                each(whole("unreadable"))
            }
        };
    }
    let mut rejected = None;
    let mut row_offset = 0usize;
    let read = stream_parquet(location, PARQUET_BATCH_ROWS, &mut |batch| {
        let Some(captions) = text_column(location, &batch, caption_column)? else {
            return Err(missing_caption_column(
                location,
                &batch.schema(),
                caption_column,
            ));
        };
        let samples = match parquet_samples(location, &batch, &captions, row_offset) {
            Ok(samples) => samples,
            Err(reason) => {
                rejected = Some(reason);
                return Ok(ControlFlow::Break(()));
            }
        };
        row_offset += batch.num_rows();
        samples.into_iter().try_for_each(&mut *each)?;
        Ok(ControlFlow::Continue(()))
    })?;
    match (rejected, read) {
        (Some(reason), _) => each(whole(reason)),
        (None, Ok(())) => Ok(()),
        (None, Err(_)) => each(whole("unreadable_parquet")),
    }
}

/// webdataset order: a sample's members (`KEY.jpg`, `KEY.txt`, `KEY.json`) are adjacent, as
/// webdataset and img2dataset write them; a sample ends where the next key begins. `fault`
/// watches `reader`'s source: a read error there fails the run, where damage in the archive is
/// a `truncated_archive` rejection.
fn stream_tar(
    location: &Location,
    reader: Box<dyn Read + Send>,
    fault: &ReadFault,
    max_image_bytes: u64,
    each: &mut dyn FnMut(Loaded) -> Result<(), Error>,
) -> Result<(), Error> {
    /// What a member holds for its sample, by its extension.
    enum Part {
        Caption,
        Metadata,
        Image,
    }
    #[derive(Default)]
    struct Member {
        /// Why the sample is refused whatever else it holds (a caption member over the cap).
        refused: Option<Reason>,
        image: Option<Result<Vec<u8>, Reason>>,
        caption: Option<Vec<u8>>,
        metadata: Option<String>,
    }
    let emit = |key: String, member: Member| Loaded {
        source: format!("{}#{key}", location.uri()),
        image: match member.refused {
            Some(reason) => Err(reason),
            None => member.image.unwrap_or(Err("no_image")).map(Bytes::from),
        },
        caption: member.caption,
        metadata: member.metadata,
        key,
    };
    let mut archive = tar::Archive::new(reader);
    let mut pending: Option<(String, Member)> = None;
    let mut emitted = std::collections::HashSet::new();
    let mut truncated = false;
    match archive.entries() {
        Ok(entries) => {
            for entry in entries {
                let Ok(mut entry) = entry else {
                    truncated = true;
                    break;
                };
                // Folders (`./` of `tar -cf x.tar .`) and links are no sample's members.
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let Ok(path) = entry.path().map(|p| p.to_string_lossy().into_owned()) else {
                    continue;
                };
                let path = path.trim_start_matches("./");
                let Some((stem, ext)) = path.rsplit_once('.') else {
                    continue;
                };
                let ext = ext.to_ascii_lowercase();
                let part = match ext.as_str() {
                    "txt" => Some(Part::Caption),
                    "json" => Some(Part::Metadata),
                    e if IMAGE_EXTENSIONS.contains(&e) => Some(Part::Image),
                    _ => None,
                };
                if let Some((key, member)) = pending.take_if(|(key, _)| key != stem) {
                    emitted.insert(key.clone());
                    each(emit(key, member))?;
                }
                if emitted.contains(stem) {
                    // Each half would count as a sample without image or without caption.
                    return Err(Error::Usage(format!(
                        "{location}: the files of sample '{stem}' are not next to each other \
                         (webdataset keeps a sample's files together: repack the tar sorted by \
                         name)"
                    )));
                }
                // Members no sample uses (audio, video, arrays) are skipped unread, and so is
                // a member over its cap.
                let oversized = entry.size()
                    > match part {
                        Some(Part::Image) => max_image_bytes,
                        _ => MAX_SIDECAR_BYTES,
                    };
                let mut data = Vec::new();
                if part.is_some() && !oversized && entry.read_to_end(&mut data).is_err() {
                    truncated = true;
                    break;
                }
                let (_, member) =
                    pending.get_or_insert_with(|| (stem.to_string(), Member::default()));
                match part {
                    Some(Part::Caption) if oversized => {
                        member.refused.get_or_insert("caption_too_long");
                    }
                    Some(Part::Metadata) if oversized => {
                        member.refused.get_or_insert("metadata_too_large");
                    }
                    Some(Part::Caption) => member.caption = Some(data),
                    Some(Part::Metadata) => member.metadata = String::from_utf8(data).ok(),
                    Some(Part::Image) if oversized => member.image = Some(Err("too_large")),
                    Some(Part::Image) => member.image = Some(Ok(data)),
                    None => {}
                }
            }
        }
        Err(_) => truncated = true,
    }
    if let Some(failed) = fault.error(location) {
        return Err(failed);
    }
    if let Some((key, member)) = pending {
        each(emit(key, member))?;
    }
    if truncated {
        each(Loaded::rejected(
            format!("{}#truncated", location.file_name()),
            location.uri(),
            "truncated_archive",
        ))?;
    }
    Ok(())
}

fn string_at(array: &ArrayRef, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(i).to_string()),
        _ => None,
    }
}

fn binary_at(array: &ArrayRef, i: usize) -> Option<Bytes> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Binary => Some(Bytes::copy_from_slice(array.as_binary::<i32>().value(i))),
        DataType::LargeBinary => Some(Bytes::copy_from_slice(array.as_binary::<i64>().value(i))),
        DataType::BinaryView => Some(Bytes::copy_from_slice(array.as_binary_view().value(i))),
        _ => None,
    }
}

/// One record batch of img2dataset parquet (rows from `row_offset` on): the image column is
/// named after its encode format; `key` and `status` are read when they hold text.
fn parquet_samples(
    location: &Location,
    batch: &RecordBatch,
    captions: &ArrayRef,
    row_offset: usize,
) -> Result<Vec<Loaded>, &'static str> {
    let uri = location.uri();
    let text = |name: &str| batch.column_by_name(name).map(plain).filter(is_text);
    let image_column = parquet_image_column(batch).ok_or("no_image_column")?;
    let (keys, statuses) = (text("key"), text("status"));
    let mut samples = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let key = keys
            .as_ref()
            .and_then(|k| string_at(k, i))
            .unwrap_or_else(|| format!("{}-{:09}", location.file_name(), row_offset + i));
        let failed = statuses
            .as_ref()
            .and_then(|s| string_at(s, i))
            .is_some_and(|status| status != "success");
        samples.push(Loaded {
            source: format!("{uri}#{key}"),
            image: if failed {
                Err("download_failed")
            } else {
                binary_at(&image_column, i).ok_or("no_image")
            },
            caption: string_at(captions, i).map(String::into_bytes),
            metadata: None,
            key,
        });
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::FailingAfter;
    use std::io::Cursor;
    use std::path::Path;
    use std::sync::Arc;

    /// A parquet file of string columns (or, for `jpg`, bytes), `group_rows` rows per row group.
    fn write_parquet(path: &Path, columns: &[(&str, Vec<&str>)], group_rows: usize) {
        let batch = RecordBatch::try_from_iter(columns.iter().map(|(name, values)| {
            let array: ArrayRef = match *name {
                "jpg" => Arc::new(arrow_array::BinaryArray::from_vec(
                    values.iter().map(|v| v.as_bytes()).collect(),
                )),
                _ => Arc::new(arrow_array::StringArray::from(values.clone())),
            };
            (*name, array)
        }))
        .unwrap();
        let properties = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(group_rows))
            .build();
        let mut bytes = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties))
                .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn source(input: &Path) -> SourceConfig {
        SourceConfig {
            input: input.to_str().unwrap().to_string(),
            format: InputFormat::Auto,
            image_root: None,
            coco_captions: CocoCaptions::All,
            image_column: "image".into(),
            caption_column: "caption".into(),
            has_header: true,
            url_column: None,
        }
    }

    /// `cc3m.tsv` under `root`, read as CC3M is: no header, the caption first.
    fn cc3m_source(root: &Path) -> SourceConfig {
        let mut cc3m = source(&root.join("cc3m.tsv"));
        (cc3m.has_header, cc3m.image_column, cc3m.caption_column) = (false, "1".into(), "0".into());
        cc3m
    }

    fn job(config: &SourceConfig, index: u32, count: u32) -> JobUnits {
        let shard = ShardSpec { index, count };
        enumerate_job(config, config.format, shard).unwrap()
    }

    fn described(units: &[Unit]) -> Vec<String> {
        units.iter().map(|unit| format!("{unit:?}")).collect()
    }

    /// Lists of every kind, with the rows that enumeration rejects, quoted line breaks, blank
    /// lines, row groups and a container among the lists. For any number of jobs, each builds
    /// only its own share, and the shares in order are the units one job builds.
    #[test]
    fn the_jobs_shares_of_a_list_in_order_are_the_whole_list() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut tsv = String::from("url\tcaption\n");
        for n in 0..23 {
            match n {
                4 => tsv.push_str("a path without a caption\n"),
                9 => tsv.push_str("pictures/nine.jpg\ta local image\n"),
                _ => tsv.push_str(&format!("https://example.com/{n}.jpg\tcaption {n}\n")),
            }
        }
        std::fs::write(root.join("list.tsv"), tsv).unwrap();
        std::fs::write(
            root.join("list.csv"),
            "image,caption\n\
             a.jpg,\"two\nlines\"\n\
             https://example.com/b.jpg,\"a \"\"quoted\"\" word\"\n\
             c.jpg,three\n\
             https://example.com/d.jpg,four\n",
        )
        .unwrap();
        let mut jsonl = String::from("\u{feff}");
        for n in 0..11 {
            match n {
                3 => jsonl.push('\n'),
                6 => jsonl.push_str("{not json\n"),
                _ => jsonl.push_str(&format!(
                    "{{\"url\": \"https://example.com/{n}.jpg\", \"caption\": \"c{n}\"}}\n"
                )),
            }
        }
        std::fs::write(root.join("list.jsonl"), jsonl).unwrap();
        let urls: Vec<String> = (0..10).map(|n| format!("https://x.org/{n}.jpg")).collect();
        write_parquet(
            &root.join("parquet/a.parquet"),
            &[
                ("url", urls.iter().map(String::as_str).collect()),
                ("caption", vec!["a"; 10]),
                ("license", vec!["cc-by"; 10]),
            ],
            4,
        );
        write_parquet(
            &root.join("parquet/b.parquet"),
            &[("jpg", vec!["not an image"; 3]), ("caption", vec!["b"; 3])],
            2,
        );
        std::fs::write(root.join("parquet/c.parquet"), "not parquet at all").unwrap();
        write_parquet(
            &root.join("parquet/d.parquet"),
            &[
                ("url", urls[..7].iter().map(String::as_str).collect()),
                ("caption", vec!["d"; 7]),
            ],
            3,
        );
        // A list of no rows is a container of nothing, as it always was.
        write_parquet(
            &root.join("parquet/e.parquet"),
            &[("url", vec![]), ("caption", vec![])],
            3,
        );
        // CC3M's layout (caption, URL; no header) with old Mac, Windows and no final line ends.
        std::fs::write(
            root.join("cc3m.tsv"),
            "one\thttps://x.org/1.jpg\rtwo\thttps://x.org/2.jpg\r\n\
             three\thttps://x.org/3.jpg\nfour\thttps://x.org/4.jpg",
        )
        .unwrap();

        let cases = [
            (source(&root.join("list.tsv")), 23, 2),
            (source(&root.join("list.csv")), 4, 2),
            (source(&root.join("list.jsonl")), 10, 0),
            (source(&root.join("parquet")), 20, 0),
            (cc3m_source(root), 4, 0),
        ];
        for (config, total, local_images) in cases {
            let input = config.input.clone();
            let whole = job(&config, 0, 1);
            assert_eq!(whole.total, total, "{input}");
            assert_eq!(whole.units.len(), total, "{input}");
            let local = |units: &[Unit]| {
                units
                    .iter()
                    .filter(|unit| matches!(unit, Unit::Sample { .. }))
                    .count()
            };
            assert_eq!(local(&whole.units), local_images, "{input}");
            for count in [2, 3, 7, 40] {
                let mut units = Vec::new();
                for index in 0..count {
                    let share = job(&config, index, count);
                    assert_eq!(share.total, total, "{input}, job {index} of {count}");
                    assert_eq!(share.range, job_range(total, ShardSpec { index, count }));
                    assert_eq!(share.units.len(), share.range.len(), "{input}");
                    units.extend(share.units);
                }
                assert_eq!(
                    described(&units),
                    described(&whole.units),
                    "{input} in {count} jobs"
                );
            }
        }
        // The keys and reasons one job gives are what they always were.
        let keys = |input: &str| -> Vec<String> {
            let units = job(&source(&root.join(input)), 0, 1).units;
            units
                .iter()
                .map(|unit| match unit {
                    Unit::Url { key, .. } => key.clone(),
                    Unit::Sample { key, .. } => format!("{key} sample"),
                    Unit::Rejected { key, reason } => format!("{key} {reason}"),
                    Unit::Container(location) => location.file_name().to_string(),
                })
                .collect()
        };
        let numbered = |rows: Range<usize>| rows.map(|n| format!("{n:09}"));
        let mut tsv_keys: Vec<String> = numbered(0..23).collect();
        tsv_keys[4].push_str(" sample");
        tsv_keys[9].push_str(" sample");
        assert_eq!(keys("list.tsv"), tsv_keys);
        let mut jsonl_keys: Vec<String> = numbered(0..11).filter(|k| k != "000000003").collect();
        jsonl_keys[5].push_str(" malformed_row");
        assert_eq!(
            keys("list.jsonl"),
            jsonl_keys,
            "a blank line keeps its number"
        );
        let csv_keys = [
            "000000000 sample",
            "000000001",
            "000000002 sample",
            "000000003",
        ];
        assert_eq!(keys("list.csv"), csv_keys);
        let cc3m: Vec<String> = job(&cc3m_source(root), 0, 1)
            .units
            .iter()
            .map(|unit| match unit {
                Unit::Url { url, caption, .. } => {
                    let caption = caption.as_deref().unwrap_or_default();
                    format!("{url} {}", String::from_utf8_lossy(caption))
                }
                other => format!("{other:?}"),
            })
            .collect();
        let expected = ["1.jpg one", "2.jpg two", "3.jpg three", "4.jpg four"];
        let expected: Vec<String> = expected
            .iter()
            .map(|e| format!("https://x.org/{e}"))
            .collect();
        assert_eq!(cc3m, expected);

        let whole = job(&source(&root.join("parquet")), 0, 1);
        let kinds: Vec<&str> = whole
            .units
            .iter()
            .map(|unit| match unit {
                Unit::Url { .. } => "url",
                Unit::Container(_) => "container",
                _ => "other",
            })
            .collect();
        let expected: Vec<&str> = [
            vec!["url"; 10],
            vec!["container"; 2],
            vec!["url"; 7],
            vec!["container"],
        ]
        .concat();
        assert_eq!(
            kinds, expected,
            "the damaged c.parquet and the empty e.parquet are streamed as containers"
        );

        // A quote left open is found by the count every job makes.
        let open = root.join("open.csv");
        std::fs::write(&open, "image,caption\na.jpg,\"open\nb.jpg,x\n").unwrap();
        for count in [1, 2] {
            let shard = ShardSpec {
                index: count - 1,
                count,
            };
            let error = enumerate_job(&source(&open), InputFormat::Auto, shard);
            let error = error.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                error.contains("open.csv, line 2: a quoted field is never closed"),
                "{error}"
            );
        }
        let Unit::Url { metadata, key, .. } = &whole.units[3] else {
            panic!("{:?}", whole.units[3]);
        };
        assert_eq!(key, "a-000000003");
        assert_eq!(metadata.as_deref(), Some(r#"{"license":"cc-by"}"#));
    }

    /// A damaged row group of a parquet list costs its own rows, each counted, and nothing to
    /// the jobs whose rows lie elsewhere: they never read it.
    #[test]
    fn a_damaged_row_group_costs_its_rows_and_only_to_the_job_that_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("laion.parquet");
        let urls: Vec<String> = (0..12).map(|n| format!("https://x.org/{n}.jpg")).collect();
        write_parquet(
            &path,
            &[
                ("url", urls.iter().map(String::as_str).collect()),
                ("caption", vec!["c"; 12]),
            ],
            4,
        );
        let bytes = std::fs::read(&path).unwrap();
        let footer =
            parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(bytes.clone()))
                .unwrap();
        use parquet::file::reader::FileReader;
        let (start, length) = footer.metadata().row_group(1).column(0).byte_range();
        let mut damaged = bytes;
        damaged[start as usize..(start + length) as usize].fill(0xFF);
        std::fs::write(&path, damaged).unwrap();

        let config = source(&path);
        let reasons = |units: &[Unit]| -> Vec<String> {
            units
                .iter()
                .map(|unit| match unit {
                    Unit::Url { key, .. } => format!("{key} url"),
                    Unit::Rejected { key, reason } => format!("{key} {reason}"),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let expected: Vec<String> = (0..12)
            .map(|row| match row {
                4..8 => format!("laion-{row:09} unreadable_parquet"),
                _ => format!("laion-{row:09} url"),
            })
            .collect();
        assert_eq!(reasons(&job(&config, 0, 1).units), expected);
        for index in 0..3 {
            let share = job(&config, index, 3);
            let range = share.range.clone();
            assert_eq!(reasons(&share.units), expected[range], "job {index} of 3");
        }
    }

    /// Rewrites the parquet file at `path` with a footer whose first row group claims `rows`
    /// rows, whatever it holds (the file's count is then the groups' sum).
    fn claim_first_group_rows(path: &Path, rows: i64) {
        use parquet::file::metadata::{ParquetMetaDataReader, ParquetMetaDataWriter};
        let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
        let metadata = ParquetMetaDataReader::new()
            .parse_and_finish(&bytes)
            .unwrap();
        let mut groups = metadata.row_groups().to_vec();
        groups[0] = groups[0]
            .clone()
            .into_builder()
            .set_num_rows(rows)
            .build()
            .unwrap();
        let claimed = metadata.into_builder().set_row_groups(groups).build();
        let footer = bytes.len() - 8;
        let length = u32::from_le_bytes(bytes[footer..footer + 4].try_into().unwrap()) as usize;
        let mut rewritten = bytes[..footer - length].to_vec();
        ParquetMetaDataWriter::new(&mut rewritten, &claimed)
            .finish()
            .unwrap();
        std::fs::write(path, rewritten).unwrap();
    }

    /// A row group claiming rows it does not hold costs its rows, each counted; one claiming
    /// more than any writer makes is damage, and the file is read as a container (which counts
    /// its damage) rather than counted as a list of the rows it claims.
    #[test]
    fn a_footer_claiming_rows_its_row_group_lacks_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("laion.parquet");
        let urls: Vec<String> = (0..10).map(|n| format!("https://x.org/{n}.jpg")).collect();
        let columns = [
            ("url", urls.iter().map(String::as_str).collect()),
            ("caption", vec!["c"; 10]),
        ];
        let kinds = |path: &Path| -> Vec<String> {
            let units = job(&source(path), 0, 1).units;
            units
                .iter()
                .map(|unit| match unit {
                    Unit::Url { key, .. } => key.clone(),
                    Unit::Rejected { key, reason } => format!("{key} {reason}"),
                    Unit::Container(_) => "container".to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let keys = |rows: Range<usize>| rows.map(|n| format!("laion-{n:09}"));
        let truthful: Vec<String> = keys(0..10).collect();
        // The group's pages end before its claimed rows: the reader refuses the group, whose
        // rows are then lost each by key; the next groups are read.
        let lacking: Vec<String> = keys(0..5)
            .map(|key| format!("{key} unreadable_parquet"))
            .chain(keys(5..11))
            .collect();
        for (claimed, expected) in [
            (4, truthful),
            (5, lacking),
            (1 << 40, vec!["container".to_string()]),
        ] {
            write_parquet(&path, &columns, 4);
            claim_first_group_rows(&path, claimed);
            assert_eq!(
                kinds(&path),
                expected,
                "a first row group claiming {claimed} rows"
            );
        }
    }

    #[test]
    fn a_list_rewritten_while_a_job_reads_it_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.tsv");
        std::fs::write(&path, "url\tcaption\nhttps://x.org/1.jpg\tone\n").unwrap();
        let before = Location::parse(path.to_str().unwrap())
            .unwrap()
            .info()
            .unwrap();
        assert!(unchanged_since(&before).is_ok());
        std::fs::write(
            &path,
            "url\tcaption\nhttps://x.org/2.jpg\ttwo\nhttps://x.org/3.jpg\tthree\n",
        )
        .unwrap();
        let error = unchanged_since(&before)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("list.tsv changed while this job read it"),
            "{error}"
        );
    }

    #[test]
    fn a_quote_left_open_is_found_however_the_bytes_arrive() {
        let text = b"image,caption\na.jpg,\"\"\"fine\"\"\"\nb.jpg,\"open\nc.jpg,x\n";
        for chunk in [1, 2, 3, text.len()] {
            let mut scan = RowScan::new(b',', true, true);
            text.chunks(chunk)
                .for_each(|bytes| scan.feed(bytes).unwrap());
            assert_eq!(scan.unclosed(), Some(3), "read {chunk} bytes at a time");
        }
        let mut closed = RowScan::new(b',', true, true);
        closed.feed(b"a,\"x\"\"\"\nb,\"y\"").unwrap();
        assert_eq!(closed.unclosed(), None);
        let mut unquoted = RowScan::new(b'\t', false, true);
        unquoted.feed(b"a\t\"b\n").unwrap();
        assert_eq!(unquoted.unclosed(), None, "a TSV has no quoting");
    }

    /// The row cap holds however a row is cut into reads, with and without quoting.
    #[test]
    fn the_row_cap_holds_across_reads_of_any_size() {
        let at_cap = [vec![b'x'; MAX_LIST_ROW_BYTES], b"\r\nshort\n".to_vec()].concat();
        let over = [b"first\n".to_vec(), vec![b'x'; MAX_LIST_ROW_BYTES + 1]].concat();
        let over_and_ended = [vec![b'x'; MAX_LIST_ROW_BYTES + 1], b"\nnext\n".to_vec()].concat();
        for quoting in [false, true] {
            for chunk in [1, 7, 4096, 1 << 20, usize::MAX] {
                let feed = |bytes: &[u8]| {
                    let mut scan = RowScan::new(b'\t', quoting, true);
                    bytes
                        .chunks(chunk.min(bytes.len()))
                        .try_for_each(|part| scan.feed(part))
                };
                assert_eq!(feed(&at_cap), Ok(()), "quoting {quoting}, reads of {chunk}");
                assert_eq!(feed(&over), Err(2), "quoting {quoting}, reads of {chunk}");
                assert_eq!(
                    feed(&over_and_ended),
                    Err(1),
                    "quoting {quoting}, reads of {chunk}"
                );
            }
        }
    }

    /// A row over the cap stops the run with the file and the line where the row starts,
    /// in every kind of list; a quoted field over line breaks counts as one row.
    #[test]
    fn a_row_longer_than_the_cap_is_refused_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(MAX_LIST_ROW_BYTES);
        let short_lines = format!("\"{}\"", "y\n".repeat(MAX_LIST_ROW_BYTES / 2 + 1));
        let cases = [
            (
                "list.tsv",
                format!("url\tcaption\na.jpg\tfine\nb.jpg\t{long}\n"),
                3,
            ),
            (
                "list.jsonl",
                format!("{{\"url\": \"a.jpg\"}}\n\n{{\"caption\": \"{long}\"}}\n"),
                3,
            ),
            (
                "list.csv",
                format!("image,caption\na.jpg,{short_lines}\n"),
                2,
            ),
        ];
        for (name, text, line) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            for count in [1, 2] {
                let shard = ShardSpec { index: 0, count };
                let error = enumerate_job(&source(&path), InputFormat::Auto, shard)
                    .err()
                    .unwrap_or_else(|| panic!("{name} was read"))
                    .to_string();
                assert!(
                    error.contains(name)
                        && error.contains(&format!("the row at line {line} is longer than 16 MiB")),
                    "{error}"
                );
            }
        }
        let fits = dir.path().join("fits.tsv");
        let row = format!("a.jpg\t{}", "x".repeat(MAX_LIST_ROW_BYTES - 6));
        std::fs::write(&fits, format!("url\tcaption\n{row}\n")).unwrap();
        assert_eq!(row.len(), MAX_LIST_ROW_BYTES);
        let job = enumerate_job(
            &source(&fits),
            InputFormat::Auto,
            ShardSpec { index: 0, count: 1 },
        );
        assert_eq!(job.unwrap().total, 1, "a row of exactly the cap is read");
        // Old Mac line ends (`\r` alone) end rows, as they do for the csv reader, in CSV and
        // TSV; a JSONL row ends at `\n` only, so `\r`s in one long line do not cut it.
        let rows = MAX_LIST_ROW_BYTES / 8 + 1;
        let one_job = ShardSpec { index: 0, count: 1 };
        for (name, header, row) in [
            ("mac.tsv", "url\tcaption\r", "a.jpg\tx\r"),
            ("mac.csv", "image,caption\r", "a.jpg,x\r"),
        ] {
            let mac = dir.path().join(name);
            std::fs::write(&mac, format!("{header}{}", row.repeat(rows))).unwrap();
            let job = enumerate_job(&source(&mac), InputFormat::Auto, one_job);
            assert_eq!(
                job.unwrap().total,
                rows,
                "{name}: short rows over 16 MiB in all"
            );
        }
        let jsonl = dir.path().join("cr.jsonl");
        let spaces = format!("{}\r", " ".repeat(1 << 20));
        std::fs::write(
            &jsonl,
            format!(
                "{{\"url\": \"a.jpg\",{}\"caption\": \"x\"}}\n",
                spaces.repeat(17)
            ),
        )
        .unwrap();
        let error = enumerate_job(&source(&jsonl), InputFormat::Auto, one_job).err();
        let error = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains("cr.jsonl: the row at line 1 is longer than 16 MiB"),
            "{error}"
        );
    }

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// The rejection reasons `stream_tar` hands on for `bytes`, read through `source`.
    fn stream(
        location: &Location,
        source: impl Read + Send + 'static,
        fault: &ReadFault,
    ) -> (Result<(), Error>, Vec<&'static str>) {
        let mut reasons = Vec::new();
        let reader = Box::new(Watched::new(source, fault));
        let result = stream_tar(location, reader, fault, u64::MAX, &mut |loaded| {
            reasons.extend(loaded.image.err());
            Ok(())
        });
        (result, reasons)
    }

    #[test]
    fn a_failed_read_of_a_tar_stops_the_run_and_a_cut_tar_is_a_rejection() {
        let location = Location::parse("/data/shard-0.tar").unwrap();
        let tar = tar_of(&[
            ("a.png", &[1; 700]),
            ("a.txt", b"first"),
            ("b.png", &[2; 700]),
            ("b.txt", b"second"),
        ]);
        let cut = tar[..1800].to_vec();

        let fault = ReadFault::default();
        let failing = FailingAfter {
            good: Cursor::new(cut.clone()),
        };
        let (result, reasons) = stream(&location, failing, &fault);
        let error = result.expect_err("a failed read is an error of the run");
        assert!(error.to_string().contains("/data/shard-0.tar"), "{error}");
        assert!(!reasons.contains(&"truncated_archive"), "{reasons:?}");

        // The same bytes, ending cleanly where they stop: the archive is cut short.
        let fault = ReadFault::default();
        let (result, reasons) = stream(&location, Cursor::new(cut), &fault);
        result.unwrap();
        assert_eq!(reasons, ["truncated_archive"]);
    }
}
