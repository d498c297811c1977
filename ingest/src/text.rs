//! `ingest text`: C4-style `*.json.gz` lines, JSONL and plain text into Parquet text shards.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::shard::{TEXT_KIND, TextRow, text_from_parquet, text_to_parquet};
use crate::{Error, RunOptions, ShardSet, job_range, progress_bar, record_input, tool};
use manifests::{Location, Manifest, StageRun};

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
}

impl TextConfig {
    pub fn preset(input: &str) -> TextConfig {
        TextConfig {
            input: input.to_string(),
            text_field: "text".into(),
            min_chars: 16,
        }
    }
}

fn is_text_file(name: &str) -> bool {
    [
        ".json.gz",
        ".jsonl.gz",
        ".jsonl",
        ".json",
        ".txt",
        ".txt.gz",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

/// Documents of one file in order; a malformed line is a rejection, and a truncated or corrupt
/// compressed stream ends the file with one `truncated_file` rejection (what came before stays).
fn read_documents(
    location: &Location,
    config: &TextConfig,
) -> (Vec<Result<TextRow, &'static str>>, String) {
    let name = location.file_name().to_string();
    let stem = name.split('.').next().unwrap_or("doc").to_string();
    let mut out = Vec::new();
    // Streamed: a bucket object is fetched a few MiB at a time, never held whole.
    let Ok(source) = location.reader_from(0) else {
        return (vec![Err("unreadable")], name);
    };
    let reader: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(MultiGzDecoder::new(source))
    } else {
        source
    };
    let mut reader = BufReader::new(reader);
    let plain = name.ends_with(".txt") || name.ends_with(".txt.gz");
    let mut block = String::new();
    let mut line_number = 0usize;
    let mut raw = Vec::new();
    let key = |n: usize| format!("{stem}-{n:09}");
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => {
                out.push(Err("truncated_file"));
                break;
            }
        }
        line_number += 1;
        let Ok(line) = std::str::from_utf8(&raw) else {
            out.push(Err("invalid_utf8"));
            continue;
        };
        if plain {
            // One document per blank-line-separated block.
            if line.trim().is_empty() {
                if !block.trim().is_empty() {
                    out.push(Ok(TextRow {
                        key: key(line_number),
                        text: std::mem::take(&mut block),
                        url: None,
                        timestamp: None,
                    }));
                }
                block.clear();
            } else {
                block.push_str(line);
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let Ok(serde_json::Value::Object(object)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            out.push(Err("malformed_line"));
            continue;
        };
        let field = |name: &str| {
            object
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        match field(&config.text_field) {
            Some(text) => out.push(Ok(TextRow {
                key: key(line_number),
                text,
                url: field("url"),
                timestamp: field("timestamp"),
            })),
            None => out.push(Err("no_text")),
        }
    }
    if plain && !block.trim().is_empty() {
        out.push(Ok(TextRow {
            key: key(line_number + 1),
            text: block,
            url: None,
            timestamp: None,
        }));
    }
    (out, name)
}

pub fn ingest_text(config: &TextConfig, options: &RunOptions) -> Result<Manifest, Error> {
    let input = Location::parse(&config.input)?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, options.shard)?;
    record_input(&mut run, &input, &[])?;
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }
    let files: Vec<Location> = if input.exists()? {
        vec![input.clone()]
    } else {
        input
            .list()?
            .into_iter()
            .map(|o| o.location)
            .filter(|l| is_text_file(l.file_name()))
            .collect()
    };
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "{input}: no .json.gz, .jsonl, .json or .txt files"
        )));
    }
    let mine = &files[job_range(files.len(), options.shard)];
    let bar = progress_bar(mine.len() as u64, options.progress, "files");
    let mut shards = ShardSet::new(&run, TEXT_KIND);
    let mut seen: HashSet<blake3::Hash> = HashSet::new();
    // Files are read in parallel a few at a time; shards are written in file order.
    let per_batch = rayon::current_num_threads().max(1);
    for (batch_index, batch) in mine.chunks(per_batch).enumerate() {
        let documents: Vec<_> = batch
            .par_iter()
            .map(|file| read_documents(file, config))
            .collect();
        for (offset, (documents, file_name)) in documents.into_iter().enumerate() {
            let index = batch_index * per_batch + offset;
            let name = format!("text/part-{:05}-{index:05}.parquet", options.shard.index);
            if let Some(bytes) = shards.resume(&name)? {
                for row in text_from_parquet(&shards.uri(&name), bytes)? {
                    seen.insert(blake3::hash(row.text.as_bytes()));
                }
                continue;
            }
            let mut rows = Vec::new();
            let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
            for document in documents {
                let outcome = document.and_then(|row| {
                    if row.text.trim().chars().count() < config.min_chars {
                        Err("too_short")
                    } else if !seen.insert(blake3::hash(row.text.as_bytes())) {
                        Err("duplicate")
                    } else {
                        Ok(row)
                    }
                });
                match outcome {
                    Ok(row) => rows.push(row),
                    Err(reason) => *rejected.entry(reason.to_string()).or_default() += 1,
                }
            }
            if !rejected.is_empty() {
                info!("{file_name}: rejected {rejected:?}");
            }
            let bytes = text_to_parquet(&shards.uri(&name), &rows)?;
            shards.write(&name, bytes, rows.len() as u64, &rejected)?;
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let ShardSet {
        tally, artifacts, ..
    } = shards;
    let mut metrics = tally.metrics();
    metrics.insert("files".into(), json!(mine.len()));
    let manifest = run.publish(artifacts, metrics)?;
    info!(
        "ingest text: {} documents, rejected {:?}",
        tally.rows, tally.rejected
    );
    Ok(manifest)
}
