//! `ingest text`: C4-style `*.json.gz` lines, JSONL and plain text into Parquet text shards.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::reading::{ReadFault, open_watched};
use crate::sources::BYTE_ORDER_MARK;
use crate::sources::{FolderReads, shared_files, uris};
use crate::{
    Error, RunOptions, ShardSet, begin_with_input, discarding_work_if_changed, job_range, tool,
};
use manifests::shards::text::{self, TextRow};
use manifests::sources::SourceDigests;
use manifests::{Location, Manifest, ObjectInfo, StageRun, Upstream};

pub const STAGE: &str = "ingest.text";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// A file or a folder of `.json.gz`, `.jsonl`, `.json`, `.txt` (and `.txt.gz`) files.
    pub input: String,
    /// The JSON field that holds the document (C4: `text`).
    pub text_field: String,
    /// Documents shorter than this many characters are rejected (`too_short`).
    pub min_chars: usize,
    /// Documents (and refused lines) read into each output shard: a file is read, parsed and
    /// written this many at a time, so memory depends on this and not on the file's size.
    pub shard_rows: usize,
}

impl TextConfig {
    /// One set of settings under every preset name the pipeline uses (a corpus is read the
    /// same way whatever the model's size), so `--preset tiny` given to every stage works; an
    /// unknown name is refused.
    pub fn preset(name: &str, input: &str) -> Result<TextConfig, Error> {
        if !matches!(name, "tiny" | "default" | "paper") {
            return Err(Error::Usage(format!(
                "unknown preset '{name}' for ingest text (tiny, default: the same settings)"
            )));
        }
        Ok(TextConfig {
            input: input.to_string(),
            text_field: "text".into(),
            min_chars: 16,
            shard_rows: 10_000,
        })
    }
}

/// What a text file's name ends with, longest first (so `.json.gz` is removed whole).
const TEXT_EXTENSIONS: [&str; 6] = [
    ".jsonl.gz",
    ".json.gz",
    ".txt.gz",
    ".jsonl",
    ".json",
    ".txt",
];

fn is_text_file(name: &str) -> bool {
    TEXT_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// A document (a JSON line, a plain-text block) longer than this many bytes is refused
/// (`too_long`) without being held: C4's and Wikipedia's longest are a few hundred KiB.
const MAX_DOCUMENT_BYTES: usize = 4 << 20;

/// One unit of a text file before parsing: a JSON line, a blank-line-separated block of plain
/// text, or the reason a read stopped or a line was refused.
enum Record {
    Json { line: usize, text: String },
    Block { line: usize, text: String },
    Rejected(&'static str),
}

/// The records of one file in order, read as they are needed: a bucket object is fetched a few
/// MiB at a time and a file of any size is never held whole. A truncated or corrupt compressed
/// stream ends the file with one `truncated_file` record (what came before stays). A failed
/// read of the file itself (permission, network, I/O) ends the records and is kept in `fault`:
/// the run stops on it.
struct Records {
    /// A record to return before reading on.
    pending: Option<Record>,
    reader: Option<Box<dyn BufRead>>,
    plain: bool,
    block: String,
    /// Why the block in progress is refused whole, once one of its lines is (a document with
    /// a line cut out of it would be a different document).
    block_refused: Option<&'static str>,
    line_number: usize,
    raw: Vec<u8>,
    fault: ReadFault,
}

impl Records {
    /// The records of the file at `location`; one `unreadable` record if it is gone. Its bytes
    /// are digested as read where `digests` holds what the stage's identity was taken from
    /// (`fault.finish` checks them).
    fn open(location: &Location, digests: &SourceDigests) -> Result<Records, Error> {
        let fault = ReadFault::checking(digests, location);
        let source = open_watched(location, &fault)?;
        let source = source.map(|reader| Box::new(reader) as Box<dyn Read>);
        Ok(Records::over(location.file_name(), source, fault))
    }

    /// The records of file `name` read from `source` (watched by `fault`).
    fn over(name: &str, source: Option<Box<dyn Read>>, fault: ReadFault) -> Records {
        let plain = name.ends_with(".txt") || name.ends_with(".txt.gz");
        let mut records = Records {
            pending: None,
            reader: None,
            plain,
            block: String::new(),
            block_refused: None,
            line_number: 0,
            raw: Vec::new(),
            fault,
        };
        let Some(source) = source else {
            records.pending = Some(Record::Rejected("unreadable"));
            return records;
        };
        let reader: Box<dyn Read> = if name.ends_with(".gz") {
            Box::new(MultiGzDecoder::new(source))
        } else {
            source
        };
        records.reader = Some(Box::new(BufReader::new(reader)));
        records
    }

    /// The plain-text block in progress, as a record, if it holds any text or was refused.
    fn take_block(&mut self, line: usize) -> Option<Record> {
        let text = std::mem::take(&mut self.block);
        if let Some(reason) = self.block_refused.take() {
            return Some(Record::Rejected(reason));
        }
        (!text.trim().is_empty()).then_some(Record::Block { line, text })
    }

    /// A line of a plain-text block that cannot be part of a document refuses its block.
    fn refuse_block(&mut self, reason: &'static str) {
        self.block_refused.get_or_insert(reason);
        self.block = String::new();
    }
}

impl Iterator for Records {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        if let Some(record) = self.pending.take() {
            return Some(record);
        }
        loop {
            let reader = self.reader.as_mut()?;
            self.raw.clear();
            // A line is read up to the cap and no further: a file without line breaks is not
            // taken into memory whole.
            let read = (&mut **reader)
                .take(MAX_DOCUMENT_BYTES as u64 + 1)
                .read_until(b'\n', &mut self.raw);
            // Over the cap when the cap's worth and one more byte came without the line's end
            // (a line of exactly the cap comes with its line break).
            let too_long = self.raw.len() > MAX_DOCUMENT_BYTES && !self.raw.ends_with(b"\n");
            let read = match too_long {
                true => reader.skip_until(b'\n').map(|_| self.raw.len()),
                false => read,
            };
            match read {
                Ok(0) => {
                    self.reader = None;
                    return self.take_block(self.line_number + 1);
                }
                Ok(_) => {}
                Err(_) if self.fault.failed() => {
                    self.reader = None;
                    return None;
                }
                Err(_) => {
                    // The plain-text block read before the cut still counts, after this.
                    self.reader = None;
                    self.pending = self.take_block(self.line_number + 1);
                    return Some(Record::Rejected("truncated_file"));
                }
            }
            self.line_number += 1;
            if self.line_number == 1 && self.raw.starts_with(BYTE_ORDER_MARK) {
                self.raw.drain(..BYTE_ORDER_MARK.len());
            }
            let line = match std::str::from_utf8(&self.raw) {
                Ok(line) if !too_long => line,
                refused => {
                    let reason = match refused {
                        Ok(_) => "too_long",
                        Err(_) => "invalid_utf8",
                    };
                    match self.plain {
                        true => self.refuse_block(reason),
                        false => return Some(Record::Rejected(reason)),
                    }
                    continue;
                }
            };
            if self.plain {
                if line.trim().is_empty() {
                    if let Some(block) = self.take_block(self.line_number) {
                        return Some(block);
                    }
                } else if self.block_refused.is_some() {
                    // The rest of a refused block is not kept.
                } else if self.block.len() + line.len() > MAX_DOCUMENT_BYTES {
                    self.refuse_block("too_long");
                } else {
                    self.block.push_str(line);
                }
            } else if !line.trim().is_empty() {
                return Some(Record::Json {
                    line: self.line_number,
                    text: line.to_string(),
                });
            }
        }
    }
}

/// The document a record holds, keyed `{file stem}-{line:09}`, or why there is none.
fn parse(record: Record, stem: &str, config: &TextConfig) -> Result<TextRow, &'static str> {
    let key = |line: usize| format!("{stem}-{line:09}");
    match record {
        Record::Rejected(reason) => Err(reason),
        Record::Block { line, text } => Ok(TextRow {
            key: key(line),
            text,
            url: None,
            timestamp: None,
        }),
        Record::Json { line, text } => {
            let Ok(serde_json::Value::Object(object)) =
                serde_json::from_str::<serde_json::Value>(&text)
            else {
                return Err("malformed_line");
            };
            let field = |name: &str| {
                object
                    .get(name)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            match field(&config.text_field) {
                Some(text) => Ok(TextRow {
                    key: key(line),
                    text,
                    url: field("url"),
                    timestamp: field("timestamp"),
                }),
                None => Err("no_text"),
            }
        }
    }
}

/// The `ingest pairs` stage `input` is the folder of, if it is one.
fn pairs_stage(input: &Location) -> Result<Option<Upstream>, Error> {
    let manifest = input.join(manifests::MANIFEST_FILE);
    if !manifest.exists()? {
        return Ok(None);
    }
    let (stage, _) = Upstream::read(&input.uri())?;
    Ok((stage.manifest.stage == crate::pairs::STAGE).then_some(stage))
}

/// Text shards from the captions of an `ingest pairs` stage, one per pairs shard: the corpus
/// when a data set comes without text of its own (`make pipeline PAIRS=...` without `TEXT`).
/// Held-out rows are left out, so the text encoder never reads the captions it is judged on.
fn captions_as_text(
    config: &TextConfig,
    options: &RunOptions,
    run: StageRun,
    pairs: &Upstream,
) -> Result<Manifest, Error> {
    let sources = manifests::shards::pairs::shards(pairs);
    let mine = &sources[job_range(sources.len(), options.shard)];
    let bar = manifests::progress::bar(
        mine.len() as u64,
        0,
        "shards",
        "ingest text",
        options.progress,
    );
    let mut shards = ShardSet::new(&run, text::KIND);
    let mut seen: HashSet<blake3::Hash> = HashSet::new();
    for (index, source) in mine.iter().enumerate() {
        let name = format!(
            "text/part-{:05}-{index:05}-0000.parquet",
            options.shard.index
        );
        if !resumed(&mut shards, &name, &mut seen)? {
            let mut rows = Vec::new();
            let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
            for pair in manifests::shards::pairs::read(pairs, source)? {
                let outcome = if manifests::shards::is_held_out(&pair.sha256) {
                    Err("held_out")
                } else if pair.caption.trim().chars().count() < config.min_chars {
                    Err("too_short")
                } else if !seen.insert(blake3::hash(pair.caption.as_bytes())) {
                    Err("duplicate")
                } else {
                    Ok(TextRow {
                        key: pair.key,
                        text: pair.caption,
                        url: None,
                        timestamp: None,
                    })
                };
                match outcome {
                    Ok(row) => rows.push(row),
                    Err(reason) => *rejected.entry(reason.to_string()).or_default() += 1,
                }
            }
            let bytes = text::to_parquet(&shards.uri(&name), &rows)?;
            shards.write(&name, bytes, rows.len() as u64, &rejected)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let what = format!("captions of {}", pairs.location.uri());
    publish(&run, shards, ("pairs_shards", mine.len()), &what)
}

/// Whether an interrupted run already wrote shard `name`: its texts then join `seen`, so the
/// rows after it are deduplicated as in an uninterrupted run.
fn resumed(
    shards: &mut ShardSet,
    name: &str,
    seen: &mut HashSet<blake3::Hash>,
) -> Result<bool, Error> {
    let Some(bytes) = shards.resume(name)? else {
        return Ok(false);
    };
    for row in text::from_parquet(&shards.uri(name), bytes)? {
        seen.insert(blake3::hash(row.text.as_bytes()));
    }
    Ok(true)
}

/// Publishes the text shards written, with `count` (a metric: what was read, how many), and
/// logs what came of it.
fn publish(
    run: &StageRun,
    shards: ShardSet,
    count: (&str, usize),
    what: &str,
) -> Result<Manifest, Error> {
    let ShardSet {
        tally, artifacts, ..
    } = shards;
    let mut metrics = tally.metrics();
    metrics.insert(count.0.into(), json!(count.1));
    let manifest = run.publish(artifacts, metrics)?;
    info!(
        "ingest text: {} {what}, rejected {:?}",
        tally.rows, tally.rejected
    );
    Ok(manifest)
}

/// The text files of a corpus (the file itself, or a folder's files of a text format), and the
/// folder's whole listing (empty for a file).
fn corpus_files(input: &Location) -> Result<(Vec<Location>, Vec<ObjectInfo>), Error> {
    let (files, listing) = if input.exists()? {
        // Read as JSON lines otherwise, every line of another format would be a rejection.
        if !is_text_file(input.file_name()) {
            return Err(Error::Usage(format!(
                "{input}: not a text corpus by its name (one of {})",
                TEXT_EXTENSIONS.join(", ")
            )));
        }
        (vec![input.clone()], Vec::new())
    } else {
        let listing = input.list()?;
        let files = listing
            .iter()
            .map(|o| o.location.clone())
            .filter(|l| is_text_file(l.file_name()))
            .collect();
        (files, listing)
    };
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "{input}: no .json.gz, .jsonl, .json or .txt files"
        )));
    }
    Ok((files, listing))
}

pub fn ingest_text(config: &TextConfig, options: &RunOptions) -> Result<Manifest, Error> {
    let input = Location::parse(&config.input)?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, options.shard)?
        .with_locations(&["/input"]);
    let pairs = pairs_stage(&input)?;
    // A folder is listed before the identity is taken, and the identity's listing is checked
    // against it: a file added in between would be read and not in the identity, or the other
    // way round. A job of many looks only at the files it reads: its share of that listing.
    let folder = pairs.is_none() && !input.exists()?;
    let listed_first = folder.then(|| corpus_files(&input)).transpose()?;
    let reads = listed_first.as_ref().map(|(files, listing)| {
        let range = job_range(files.len(), options.shard);
        let uris_of =
            |files: &[Location]| shared_files(options.shard, files.iter().map(Location::uri));
        FolderReads::new(
            uris_of(&files[range]),
            uris_of(files),
            Some(uris(listing)),
            options.shard,
        )
    });
    let begun = begin_with_input(
        &mut run,
        &input,
        &[],
        reads.as_ref(),
        None,
        &[],
        options.force,
    )?;
    if let Some(existing) = begun {
        return Ok(existing);
    }
    if let Some(pairs) = pairs {
        return captions_as_text(config, options, run, &pairs);
    }
    let (files, _) = match listed_first {
        Some(listed) => listed,
        None => corpus_files(&input)?,
    };
    let range = job_range(files.len(), options.shard);
    let prefixes = crate::sources::key_prefixes(
        &files,
        &input,
        |file| {
            file.file_name()
                .split('.')
                .next()
                .unwrap_or("doc")
                .to_string()
        },
        &TEXT_EXTENSIONS,
    );
    let (mine, stems) = (&files[range.clone()], &prefixes[range]);
    let bar = manifests::progress::bar(
        mine.len() as u64,
        0,
        "files",
        "ingest text",
        options.progress,
    );
    let digests = run.source_digests();
    let mut shards = ShardSet::new(&run, text::KIND);
    let mut seen: HashSet<blake3::Hash> = HashSet::new();
    let part_records = config.shard_rows.max(1);
    // Files in order, each a part of `shard_rows` records at a time, parsed in parallel and
    // deduplicated in order: the shards do not depend on the thread count, and memory on the
    // part, not on the file.
    // A file found to be other than the identity says stops the run: what it finished is
    // discarded with it.
    let mut write = || -> Result<(), Error> {
        for (index, (file, stem)) in mine.iter().zip(stems).enumerate() {
            let file_name = file.file_name().to_string();
            let mut records = Records::open(file, &digests)?;
            for part in 0.. {
                let chunk: Vec<Record> = records.by_ref().take(part_records).collect();
                if let Some(failed) = records.fault.error(file) {
                    return Err(failed);
                }
                let read = chunk.len();
                if read == 0 && part > 0 {
                    break;
                }
                let name = format!(
                    "text/part-{:05}-{index:05}-{part:04}.parquet",
                    options.shard.index
                );
                if !resumed(&mut shards, &name, &mut seen)? {
                    let parsed: Vec<_> = chunk
                        .into_par_iter()
                        .map(|record| {
                            let row = parse(record, stem, config)?;
                            if row.text.trim().chars().count() < config.min_chars {
                                return Err("too_short");
                            }
                            let digest = blake3::hash(row.text.as_bytes());
                            Ok((row, digest))
                        })
                        .collect();
                    let mut rows = Vec::new();
                    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
                    for document in parsed {
                        let outcome = document.and_then(|(row, digest)| {
                            if seen.insert(digest) {
                                Ok(row)
                            } else {
                                Err("duplicate")
                            }
                        });
                        match outcome {
                            Ok(row) => rows.push(row),
                            Err(reason) => *rejected.entry(reason.to_string()).or_default() += 1,
                        }
                    }
                    if !rejected.is_empty() {
                        info!("{file_name} part {part}: rejected {rejected:?}");
                    }
                    let bytes = text::to_parquet(&shards.uri(&name), &rows)?;
                    shards.write(&name, bytes, rows.len() as u64, &rejected)?;
                }
                if read < part_records {
                    break;
                }
            }
            records.fault.finish(&digests, file)?;
            bar.inc(1);
        }
        Ok(())
    };
    write().map_err(|e| discarding_work_if_changed(&run, e))?;
    bar.finish_and_clear();
    publish(&run, shards, ("files", mine.len()), "documents")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{FailingAfter, Watched};
    use std::io::{Cursor, Write};

    fn records_of(source: impl Read + Send + 'static) -> (Vec<Record>, ReadFault) {
        let fault = ReadFault::default();
        let reader = Box::new(Watched::new(source, &fault));
        let records = Records::over(
            "c4-train.00000-of-01024.json.gz",
            Some(reader),
            fault.clone(),
        );
        (records.collect(), fault)
    }

    #[test]
    fn a_failed_read_of_a_text_file_is_a_fault_and_a_cut_gzip_is_a_rejection() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for n in 0..2000 {
            writeln!(gz, r#"{{"text": "document number {n} with some words"}}"#).unwrap();
        }
        let gz = gz.finish().unwrap();
        let cut = gz[..gz.len() / 2].to_vec();

        let (records, fault) = records_of(FailingAfter {
            good: Cursor::new(cut.clone()),
        });
        let location = Location::parse("/corpus/c4-train.00000-of-01024.json.gz").unwrap();
        let error = fault.error(&location).expect("the failed read is kept");
        assert!(
            error.to_string().contains("c4-train.00000-of-01024"),
            "{error}"
        );
        assert!(
            !records
                .iter()
                .any(|r| matches!(r, Record::Rejected("truncated_file"))),
            "a failed read is not the file's damage"
        );

        let (records, fault) = records_of(Cursor::new(cut));
        assert!(fault.error(&location).is_none());
        assert!(matches!(
            records.last(),
            Some(Record::Rejected("truncated_file"))
        ));
    }

    /// What `records` hold, as text: `block:LINE:TEXT`, `json:LINE` or the refusal's reason.
    fn outline(name: &str, bytes: Vec<u8>) -> Vec<String> {
        let records = Records::over(
            name,
            Some(Box::new(Cursor::new(bytes))),
            ReadFault::default(),
        );
        records
            .map(|record| match record {
                Record::Block { line, text } => format!("block:{line}:{}", text.trim_end()),
                Record::Json { line, .. } => format!("json:{line}"),
                Record::Rejected(reason) => reason.to_string(),
            })
            .collect()
    }

    /// A plain-text document with a line that is not UTF-8, or longer than the cap, is refused
    /// whole rather than kept with the line cut out; a JSON line over the cap is refused and
    /// the lines after it read on. Nothing longer than the cap is held.
    #[test]
    fn a_bad_or_overlong_line_refuses_its_whole_document() {
        let mut plain = b"kept first\n\nline one\n".to_vec();
        plain.extend(b"caf\xe9 in latin-1\nline three\n\nkept last\n");
        assert_eq!(
            outline("notes.txt", plain),
            ["block:2:kept first", "invalid_utf8", "block:8:kept last"]
        );

        let long_line = "x".repeat(MAX_DOCUMENT_BYTES + 10);
        let mut json = format!("{{\"text\": \"{long_line}\"}}\n").into_bytes();
        json.extend(b"{\"text\": \"short and fine\"}\n");
        assert_eq!(outline("c4.jsonl", json), ["too_long", "json:2"]);

        // Lines each under the cap whose block is over it.
        let quarter = "y".repeat(MAX_DOCUMENT_BYTES / 4);
        let mut plain = String::new();
        for _ in 0..5 {
            plain.push_str(&quarter);
            plain.push('\n');
        }
        plain.push_str("\nkept\n");
        assert_eq!(
            outline("big.txt", plain.into_bytes()),
            ["too_long", "block:8:kept"]
        );

        // A line of exactly the cap is kept, and so is the line after it; so is a block of
        // exactly the cap, which the blank line after it ends.
        let at_cap = "w".repeat(MAX_DOCUMENT_BYTES);
        let json = format!("{at_cap}\n{{\"text\": \"next\"}}\n").into_bytes();
        assert_eq!(outline("c4.jsonl", json), ["json:1", "json:2"]);
        // The block's bytes include its line break.
        let plain = format!("{}\n  \nnext\n", &at_cap[1..]).into_bytes();
        assert_eq!(
            outline("exact.txt", plain)
                .iter()
                .map(|record| record.get(..8).unwrap_or(record))
                .collect::<Vec<_>>(),
            ["block:2:", "block:4:"]
        );

        // One line over the cap without a line break, to the end of the file.
        let endless = "z".repeat(MAX_DOCUMENT_BYTES * 2).into_bytes();
        assert_eq!(outline("endless.txt", endless), ["too_long"]);
    }
}
