//! `infer generate`: pictures for a list of prompts, from a few given on the command line to a
//! benchmark's thousands (PartiPrompts' TSV, a CSV, JSON lines or plain lines).
//!
//! The list is sampled in chunks ([`PROMPTS_PER_CHUNK`] prompts unless told otherwise). Each
//! chunk's pictures are written first and its record (`chunks/prompts-FFFFFF-EEEEEE.json`, with
//! the digest of every file) last, so a killed run resumes where it stopped: a prompt counts as
//! done when a record of the same models, settings, backend and kind of device names it at its
//! place, and its files are there with those digests. On the CPU a prompt's pictures do not
//! depend on the prompts sampled beside it, so a resumed run, another chunk size, or the jobs of
//! a batch array (chunk `c` is job `c % jobs`'s) write the pictures one uninterrupted run
//! writes. `generations.json`, the index of the whole list, is written once every prompt is
//! done, by whichever run or job finds them all done.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::Instant;

use bytes::Bytes;
use manifests::{Location, ShardSpec, digest_bytes};
use serde_json::{Map, Value, json};
use tracing::warn;

use crate::sample::{Generator, PromptImages, SamplingSettings};
use crate::{Error, grid_png, png};

/// Prompts sampled together by default, and the unit a run resumes by and jobs share out.
pub const PROMPTS_PER_CHUNK: usize = 16;

/// The index of a finished list, beside the pictures.
pub const INDEX_FILE: &str = "generations.json";

/// The columns a table's prompt is looked for in, case aside, when none is named.
const PROMPT_COLUMNS: [&str; 3] = ["prompt", "caption", "text"];

/// One prompt of a list, with the other columns of its row (PartiPrompts' `Category` and
/// `Challenge`, say), carried into its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub fields: Map<String, Value>,
}

/// The prompts to draw, in order, and the file they were read from (`None` for prompts given
/// on the command line or chosen by the program).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptList {
    pub prompts: Vec<Prompt>,
    pub source: Option<Value>,
}

impl PromptList {
    pub fn from_texts<S: AsRef<str>>(texts: &[S]) -> PromptList {
        PromptList {
            prompts: texts
                .iter()
                .map(|text| Prompt {
                    text: text.as_ref().to_string(),
                    fields: Map::new(),
                })
                .collect(),
            source: None,
        }
    }

    /// What the list holds: its prompts and their fields, in order (not where it was read).
    fn identity(&self) -> Value {
        Value::Array(
            self.prompts
                .iter()
                .map(|p| json!([p.text, p.fields]))
                .collect(),
        )
    }

    /// Reads a prompt list: `.tsv` and `.csv` (with a header; the prompt is `column`, or the
    /// first of `prompt`, `caption` and `text` in any case), `.jsonl` (one object per line, the
    /// prompt under the same keys) or anything else as plain text, one prompt per line. Blank
    /// lines are skipped; a row without a prompt is an error naming the file and line.
    pub fn read(uri: &str, column: Option<&str>) -> Result<PromptList, Error> {
        let location = Location::parse(uri)?;
        let bytes = location.get()?;
        // Editors on Windows start UTF-8 files with a byte-order mark.
        let text = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
        let name = location.uri();
        let extension = name
            .rsplit_once('.')
            .map(|(_, extension)| extension.to_ascii_lowercase())
            .unwrap_or_default();
        let prompts = match extension.as_str() {
            "tsv" => table_prompts(&name, text, b'\t', column)?,
            "csv" => table_prompts(&name, text, b',', column)?,
            "jsonl" => jsonl_prompts(&name, text, column)?,
            _ => {
                if let Some(column) = column {
                    return Err(Error::Usage(format!(
                        "{name}: --prompt-column {column} names a column, but a plain list (not .tsv, .csv or .jsonl) has none"
                    )));
                }
                line_prompts(&name, text)?
            }
        };
        if prompts.is_empty() {
            return Err(Error::Data(format!("{name}: no prompts in it")));
        }
        Ok(PromptList {
            prompts,
            source: Some(json!({"uri": name, "digest": digest_bytes(&bytes), "column": column})),
        })
    }
}

fn utf8<'a>(file: &str, line: usize, bytes: &'a [u8]) -> Result<&'a str, Error> {
    std::str::from_utf8(bytes)
        .map_err(|_| Error::Data(format!("{file}, line {line}: not UTF-8 text")))
}

fn line_prompts(file: &str, bytes: &[u8]) -> Result<Vec<Prompt>, Error> {
    let mut prompts = Vec::new();
    for (number, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let text = utf8(file, number + 1, line)?.trim();
        if !text.is_empty() {
            prompts.push(Prompt {
                text: text.to_string(),
                fields: Map::new(),
            });
        }
    }
    Ok(prompts)
}

/// The column `named`, or the first of [`PROMPT_COLUMNS`] among `columns` (case aside).
fn prompt_column<'a>(
    file: &str,
    columns: impl Iterator<Item = &'a str> + Clone,
    named: Option<&str>,
) -> Result<String, Error> {
    let found = match named {
        Some(named) => columns.clone().find(|c| *c == named),
        None => PROMPT_COLUMNS
            .iter()
            .find_map(|wanted| columns.clone().find(|c| c.eq_ignore_ascii_case(wanted))),
    };
    found.map(str::to_string).ok_or_else(|| {
        let listed: Vec<&str> = columns.collect();
        let wanted = match named {
            Some(named) => format!("no column '{named}'"),
            None => "no column named prompt, caption or text (pick one with --prompt-column)"
                .to_string(),
        };
        Error::Usage(format!(
            "{file}: {wanted}; its columns: {}",
            listed.join(", ")
        ))
    })
}

fn table_prompts(
    file: &str,
    bytes: &[u8],
    delimiter: u8,
    column: Option<&str>,
) -> Result<Vec<Prompt>, Error> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        // TSV (PartiPrompts among them) has no quoting: a quote is part of the prompt.
        .quoting(delimiter == b',')
        // A row may leave its trailing fields out; one without its prompt is an error below.
        .flexible(true)
        .from_reader(Cursor::new(bytes));
    let headers = reader
        .headers()
        .map_err(|e| Error::Data(format!("{file}: its header: {e}")))?
        .clone();
    let column = prompt_column(file, headers.iter(), column)?;
    let at = headers.iter().position(|h| h == column).unwrap_or(0);
    let mut prompts = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| match e.position() {
            Some(position) => Error::Data(format!("{file}, line {}: {e}", position.line())),
            None => Error::Data(format!("{file}: {e}")),
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(|field| field.trim().is_empty()) {
            continue;
        }
        let text = record.get(at).unwrap_or_default().trim();
        if text.is_empty() {
            return Err(Error::Data(format!(
                "{file}, line {line}: no prompt in column '{column}'"
            )));
        }
        // A quote left open swallows every row after it into one field, without an error from
        // the reader: a field over several lines is that, or nothing a prompt list should hold.
        if record.iter().any(|field| field.contains(['\n', '\r'])) {
            return Err(Error::Data(format!(
                "{file}, line {line}: a field runs over several lines (a quote left open?)"
            )));
        }
        let fields = headers
            .iter()
            .zip(record.iter())
            .filter(|(name, _)| *name != column)
            .map(|(name, value)| (name.to_string(), Value::String(value.to_string())))
            .collect();
        prompts.push(Prompt {
            text: text.to_string(),
            fields,
        });
    }
    Ok(prompts)
}

fn jsonl_prompts(file: &str, bytes: &[u8], column: Option<&str>) -> Result<Vec<Prompt>, Error> {
    let mut prompts = Vec::new();
    for (number, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_number = number + 1;
        let text = utf8(file, line_number, line)?.trim();
        if text.is_empty() {
            continue;
        }
        let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text) else {
            return Err(Error::Data(format!(
                "{file}, line {line_number}: not a JSON object"
            )));
        };
        let key = prompt_column(
            &format!("{file}, line {line_number}"),
            object.keys().map(String::as_str),
            column,
        )?;
        let prompt = match object.remove(&key) {
            Some(Value::String(prompt)) if !prompt.trim().is_empty() => prompt.trim().to_string(),
            _ => {
                return Err(Error::Data(format!(
                    "{file}, line {line_number}: '{key}' is not a non-empty string"
                )));
            }
        };
        prompts.push(Prompt {
            text: prompt,
            fields: object,
        });
    }
    Ok(prompts)
}

/// What a call of [`generate_to`] did.
#[derive(Debug)]
pub struct Generation {
    pub prompts: usize,
    pub chunks: usize,
    /// This job's chunks.
    pub job_chunks: usize,
    /// This job's chunks found done (and verified) before it started.
    pub done_before: usize,
    /// Chunks of the whole list done now, by this job or others (while some prompt has no
    /// record yet, the others' chunks are counted by their records, their files not read).
    pub done_now: usize,
    /// `generations.json`, when the whole list is done.
    pub index: Option<Value>,
}

/// Where a list's chunks and files lie, fixed by the list and the chunk size alone (never by
/// the job or run that samples them).
struct Layout<'a> {
    prompts: &'a [Prompt],
    per_chunk: usize,
    /// Digits of a prompt's place in file names: three at least, more for longer lists, so
    /// the names sort in order.
    width: usize,
}

impl Layout<'_> {
    fn chunks(&self) -> usize {
        self.prompts.len().div_ceil(self.per_chunk)
    }

    /// The places in the list of chunk `chunk`'s prompts.
    fn range(&self, chunk: usize) -> std::ops::Range<usize> {
        let first = chunk * self.per_chunk;
        first..(first + self.per_chunk).min(self.prompts.len())
    }

    /// A prompt's file: `sample-K` (its kept pictures) or `grid` (every sample).
    fn file(&self, index: usize, what: &str) -> String {
        format!("prompt-{index:0width$}-{what}.png", width = self.width)
    }
}

/// What the pictures depend on beyond the prompts: the models (by identity, not by where they
/// were read), the settings, the backend and the kind of device.
fn sampled_with(generator: &Generator, sampling: &SamplingSettings) -> Value {
    let digests: Vec<&str> = generator
        .provenance
        .iter()
        .map(|(_, digest)| digest.as_str())
        .collect();
    json!({
        "models": digests,
        "settings": sampling.settings,
        "backend": nn::backend::backend_name(),
        "device": device_kind(&format!("{:?}", generator.device)),
    })
}

/// A device as its backend prints it, without its number: the jobs of an array may sample on
/// different GPUs of one kind, and CPU and CUDA runs differ (CUDA samples under bf16 autocast).
fn device_kind(device: &str) -> String {
    device.chars().filter(|c| !c.is_ascii_digit()).collect()
}

fn pretty_json(value: &Value) -> Result<Bytes, Error> {
    serde_json::to_vec_pretty(value)
        .map(Bytes::from)
        .map_err(|e| Error::Data(e.to_string()))
}

fn digest_of(value: &Value) -> Result<String, Error> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::Data(e.to_string()))?;
    Ok(digest_bytes(&bytes))
}

/// A prompt's entry in a chunk record of this run's key, at its place in the list, its files
/// named where this layout puts them, and their digests.
#[derive(Clone)]
struct Claim {
    entry: Value,
    digests: Vec<(String, String)>,
    /// Its share of the sampling time of the chunk it was sampled in.
    seconds: f64,
}

/// Every prompt's claims in the chunk records under `out` written with `key` (records of other
/// settings, models or devices are passed over, whatever their chunk size), each with the `kept`
/// pictures the settings keep. A prompt may have several, from runs with other chunk sizes; on
/// a GPU their pictures may differ in a pixel.
fn claims(
    out: &Location,
    key: &str,
    layout: &Layout,
    kept_per_prompt: usize,
) -> Result<Vec<Vec<Claim>>, Error> {
    let mut claims: Vec<Vec<Claim>> = vec![Vec::new(); layout.prompts.len()];
    for object in out.join("chunks").list_folder()? {
        let uri = object.location.uri();
        if !uri.ends_with(".json") {
            continue;
        }
        let Ok(record) = serde_json::from_slice::<Value>(&object.location.get()?) else {
            // Its prompts are sampled again; a record cut short cannot come from this program.
            warn!("{uri}: not a chunk record, passed over");
            continue;
        };
        let (Some(entries), Some(digests)) =
            (record["prompts"].as_array(), record["digests"].as_object())
        else {
            continue;
        };
        if record["key"] != key {
            continue;
        }
        for entry in entries {
            let Some(index) = entry["index"].as_u64().map(|i| i as usize) else {
                continue;
            };
            let Some(prompt) = layout.prompts.get(index) else {
                continue;
            };
            let kept = entry["kept"].as_array().map_or(&[][..], Vec::as_slice);
            if kept.len() != kept_per_prompt {
                continue;
            }
            let mut names: Vec<String> = (0..kept.len())
                .map(|rank| layout.file(index, &format!("sample-{rank}")))
                .collect();
            names.push(layout.file(index, "grid"));
            let in_place = entry["prompt"] == prompt.text.as_str()
                && kept
                    .iter()
                    .zip(&names)
                    .all(|(file, name)| file["file"] == name.as_str())
                && entry["grid"] == layout.file(index, "grid");
            let digests: Option<Vec<(String, String)>> = names
                .into_iter()
                .map(|name| {
                    let digest = digests.get(&name)?.as_str()?.to_string();
                    Some((name, digest))
                })
                .collect();
            if let (true, Some(digests)) = (in_place, digests) {
                let mut entry = entry.clone();
                let seconds = entry
                    .as_object_mut()
                    .and_then(|entry| entry.remove("seconds"))
                    .and_then(|seconds| seconds.as_f64())
                    .unwrap_or(0.0);
                claims[index].push(Claim {
                    entry,
                    digests,
                    seconds,
                });
            }
        }
    }
    Ok(claims)
}

/// The first of a prompt's claims whose files are there with its digests.
fn verified(out: &Location, claims: Vec<Claim>) -> Result<Option<Claim>, Error> {
    'claims: for claim in claims {
        for (file, digest) in &claim.digests {
            match out.join(file).get_if_present()? {
                Some(bytes) if *digest == digest_bytes(&bytes) => {}
                _ => continue 'claims,
            }
        }
        return Ok(Some(claim));
    }
    Ok(None)
}

/// Samples `list` into `out` (`infer generate`): per prompt `p` (its place in the list), the
/// kept samples as `prompt-PPP-sample-K.png` (K = rank after reranking; enlarged when the
/// generator has an upscaler) and all samples as `prompt-PPP-grid.png` at the VQGAN's size;
/// this job's chunks of `per_chunk` prompts only (`shard`), skipping those whose every prompt is
/// done; and `generations.json` once the whole list is done, listing prompts (with their rows'
/// other fields), files, settings, scores and the digests of the manifests used.
///
/// A prompt is done when a chunk record of the same models, settings, backend and kind of device
/// names it at its place, its files under this layout's names, and the files are there with the
/// record's digests: records of any chunk size and any job count, so neither a changed
/// `per_chunk` nor a changed number of jobs loses what is done.
pub fn generate_to(
    generator: &Generator,
    list: &PromptList,
    sampling: &SamplingSettings,
    out: &str,
    shard: ShardSpec,
    per_chunk: usize,
) -> Result<Generation, Error> {
    if per_chunk == 0 {
        return Err(Error::Usage("prompts per chunk must be at least 1".into()));
    }
    let started = Instant::now();
    let config = &sampling.settings;
    let out = Location::parse(out)?;
    let layout = Layout {
        prompts: &list.prompts,
        per_chunk,
        width: list
            .prompts
            .len()
            .saturating_sub(1)
            .to_string()
            .len()
            .max(3),
    };
    let chunks = layout.chunks();
    let identity = sampled_with(generator, sampling);
    let key = digest_of(&identity)?;
    let list_digest = digest_of(&list.identity())?;
    let mine: Vec<usize> = (0..chunks)
        .filter(|chunk| chunk % shard.count as usize == shard.index as usize)
        .collect();
    let kept_per_prompt = config.keep.min(config.samples);
    // Prompts found done, their files read back and checked (or written by this run).
    let mut done: Vec<Option<Claim>> = vec![None; list.prompts.len()];
    let mut found = claims(&out, &key, &layout, kept_per_prompt)?;
    let mut todo = Vec::new();
    for &chunk in &mine {
        for index in layout.range(chunk) {
            done[index] = verified(&out, std::mem::take(&mut found[index]))?;
        }
        if done[layout.range(chunk)].iter().any(Option::is_none) {
            todo.push(chunk);
        }
    }
    let done_before = mine.len() - todo.len();
    // An index of another list or other settings must not stand beside this run's pictures,
    // nor one whose files are about to be rewritten.
    let index_location = out.join(INDEX_FILE);
    let mut index_kept = false;
    if let Some(bytes) = index_location.get_if_present()? {
        let current = serde_json::from_slice::<Value>(&bytes)
            .is_ok_and(|index| index["key"] == key && index["list"] == list_digest);
        if current && todo.is_empty() {
            index_kept = true;
        } else {
            index_location.delete()?;
        }
    }
    let job_prompts: usize = mine.iter().map(|&c| layout.range(c).len()).sum();
    let todo_prompts: usize = todo.iter().map(|&c| layout.range(c).len()).sum();
    let bar = nn::progress::bar(
        job_prompts as u64,
        (job_prompts - todo_prompts) as u64,
        "prompts",
        "infer generate",
        nn::progress::bars_shown(),
    );
    for &chunk in &todo {
        let chunk_started = Instant::now();
        // Only the chunk's prompts not done: the others keep their pictures, and their
        // entries go into this chunk's record as they are.
        let missing: Vec<usize> = layout
            .range(chunk)
            .filter(|&index| done[index].is_none())
            .collect();
        let texts: Vec<&str> = missing
            .iter()
            .map(|&index| list.prompts[index].text.as_str())
            .collect();
        let results = generator.generate(&texts, config)?;
        let written = write_pictures(generator, &out, &results, &layout, &missing)?;
        let seconds = chunk_started.elapsed().as_secs_f64() / missing.len() as f64;
        for (index, mut claim) in missing.iter().zip(written) {
            claim.seconds = seconds;
            done[*index] = Some(claim);
        }
        let claims: Vec<&Claim> = done[layout.range(chunk)].iter().flatten().collect();
        let digests: Map<String, Value> = claims
            .iter()
            .flat_map(|claim| &claim.digests)
            .map(|(file, digest)| (file.clone(), Value::String(digest.clone())))
            .collect();
        let entries: Vec<Value> = claims
            .iter()
            .map(|claim| {
                let mut entry = claim.entry.clone();
                entry["seconds"] = json!(claim.seconds);
                entry
            })
            .collect();
        let record = json!({
            "key": key,
            "sampled_with": identity,
            "prompts": entries,
            "digests": digests,
        });
        // Last, so a prompt without a record naming its files' digests is not done, whatever
        // state a killed run left its files in.
        let range = layout.range(chunk);
        out.join(&format!(
            "chunks/prompts-{:06}-{:06}.json",
            range.start, range.end
        ))
        .put(pretty_json(&record)?)?;
        bar.inc(range.len() as u64);
    }
    bar.finish_and_clear();
    // The other jobs' prompts, by the records they have written by now, their files checked:
    // a record may be older than files another run rewrote since. Every job writes its records
    // before reading the others', so of jobs finishing together at least one sees them all.
    // Files are read only when every prompt left has a record: otherwise no index can come of
    // it, and a bucket would be read through for nothing. `counted`: whether each prompt is
    // done, or (when no index can come of it yet) recorded as done.
    let mut counted: Vec<bool> = done.iter().map(Option::is_some).collect();
    if counted.contains(&false) {
        let mut found = claims(&out, &key, &layout, kept_per_prompt)?;
        let recorded = counted
            .iter()
            .zip(&found)
            .all(|(done, claims)| *done || !claims.is_empty());
        for (index, slot) in done.iter_mut().enumerate() {
            if slot.is_none() {
                let claims = std::mem::take(&mut found[index]);
                counted[index] = !claims.is_empty();
                if recorded {
                    *slot = verified(&out, claims)?;
                    counted[index] = slot.is_some();
                }
            }
        }
    }
    let done_now = (0..chunks)
        .filter(|&chunk| counted[layout.range(chunk)].iter().all(|&done| done))
        .count();
    let all_done = done.iter().all(Option::is_some);
    let index = if all_done {
        let done: Vec<Claim> = done.into_iter().flatten().collect();
        let mut index = index_of(generator, list, sampling, &done, started)?;
        index["key"] = json!(key);
        index["sampled_with"] = identity;
        index["list"] = json!(list_digest);
        index_location.put(pretty_json(&index)?)?;
        Some(index)
    } else {
        if index_kept {
            // It named files that another job's record no longer vouches for.
            index_location.delete()?;
        }
        None
    };
    Ok(Generation {
        prompts: list.prompts.len(),
        chunks,
        job_chunks: mine.len(),
        done_before,
        done_now,
        index,
    })
}

/// Writes the pictures of the prompts at `indices` (`results` in the same order); returns each
/// prompt's claim (its record entry and its files' digests; its time is the caller's to share
/// out).
fn write_pictures(
    generator: &Generator,
    out: &Location,
    results: &[PromptImages],
    layout: &Layout,
    indices: &[usize],
) -> Result<Vec<Claim>, Error> {
    let size = generator.vqgan_config.image_size;
    // Only the kept pictures are enlarged: the grids show every sample at the VQGAN's size.
    let kept: Vec<Vec<f32>> = results
        .iter()
        .flat_map(|result| result.kept.iter().map(|&i| result.images[i].clone()))
        .collect();
    let kept = match &generator.upscaler {
        Some(_) => generator.upscale(&kept)?,
        None => kept,
    };
    let kept_size = generator.upscaled_size();
    let mut kept = kept.into_iter();
    let write = |digests: &mut Vec<(String, String)>, name: String, bytes: Vec<u8>| {
        digests.push((name.clone(), digest_bytes(&bytes)));
        out.join(&name).put(Bytes::from(bytes)).map(|()| name)
    };
    let mut claims = Vec::with_capacity(results.len());
    for (result, &index) in results.iter().zip(indices) {
        let mut digests = Vec::new();
        let mut files = Vec::new();
        for (rank, &i) in result.kept.iter().enumerate() {
            let pixels = kept
                .next()
                .ok_or_else(|| Error::Data("fewer enlarged pictures than kept ones".into()))?;
            let name = write(
                &mut digests,
                layout.file(index, &format!("sample-{rank}")),
                png(&pixels, kept_size)?,
            )?;
            files.push(json!({"file": name, "sample": i,
                "score": result.scores.as_ref().map(|s| s[i])}));
        }
        let grid = write(
            &mut digests,
            layout.file(index, "grid"),
            grid_png(result, size)?,
        )?;
        let entry = json!({"index": index, "prompt": result.prompt, "kept": files,
            "grid": grid, "scores": result.scores, "reranked": result.scores.is_some()});
        claims.push(Claim {
            entry,
            digests,
            seconds: 0.0,
        });
    }
    Ok(claims)
}

/// `generations.json`: every prompt's record in list order, and what they were sampled with.
fn index_of(
    generator: &Generator,
    list: &PromptList,
    sampling: &SamplingSettings,
    done: &[Claim],
    started: Instant,
) -> Result<Value, Error> {
    if done.len() != list.prompts.len() {
        return Err(Error::Data(format!(
            "{} prompts done, the list has {}",
            done.len(),
            list.prompts.len()
        )));
    }
    // A row's other fields come from the list as it is now: they do not change the pictures,
    // so a corrected `Category` column takes effect without sampling again.
    let prompts: Vec<Value> = done
        .iter()
        .zip(&list.prompts)
        .map(|(claim, prompt)| {
            let mut entry = claim.entry.clone();
            if let Some(entry) = entry.as_object_mut() {
                entry.remove("fields");
                if !prompt.fields.is_empty() {
                    entry.insert("fields".into(), Value::Object(prompt.fields.clone()));
                }
            }
            entry
        })
        .collect();
    let sampling_seconds: f64 = done.iter().map(|claim| claim.seconds).sum();
    let rerank_summary = rerank_summary(&prompts);
    let size = generator.vqgan_config.image_size;
    Ok(json!({
        "prompts": prompts,
        "rerank_summary": rerank_summary,
        "prompts_from": list.source,
        "settings": sampling.settings,
        "settings_from": sampling.source,
        "image_size": generator.upscaled_size(),
        "upscaled_by": generator.upscaler.as_ref().map(|u| json!({"manifest": u.uri,
            "from": size, "to": u.config.output_size()})),
        "model": generator.name,
        "manifests": generator.provenance.iter().map(|(uri, digest)| json!({"uri": uri, "digest": digest})).collect::<Vec<_>>(),
        "backend": nn::backend::backend_name(),
        "sampling_seconds": sampling_seconds,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// The best kept picture's rerank score (the contrastive pair's similarity of picture and
/// prompt), averaged over every prompt, and over the prompts of each value of each text field
/// (PartiPrompts' `Category`, `Challenge`): how one model compares with another by kind of
/// prompt. `None` without a reranker.
fn rerank_summary(prompts: &[Value]) -> Option<Value> {
    let best: Vec<f64> = prompts
        .iter()
        .map(|entry| entry["kept"][0]["score"].as_f64())
        .collect::<Option<_>>()?;
    let summary = |scores: &[f64]| {
        json!({"prompts": scores.len(),
            "mean_best_score": scores.iter().sum::<f64>() / scores.len().max(1) as f64})
    };
    let mut groups: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    for (entry, &score) in prompts.iter().zip(&best) {
        for (name, value) in entry["fields"].as_object().into_iter().flatten() {
            if let Some(value) = value.as_str() {
                groups
                    .entry(name)
                    .or_default()
                    .entry(value)
                    .or_default()
                    .push(score);
            }
        }
    }
    let by_field: Map<String, Value> = groups
        .into_iter()
        .map(|(name, values)| {
            let values: Map<String, Value> = values
                .into_iter()
                .map(|(value, scores)| (value.to_string(), summary(&scores)))
                .collect();
            (name.to_string(), Value::Object(values))
        })
        .collect();
    let mut all = summary(&best);
    all["by_field"] = Value::Object(by_field);
    Some(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, text: &str, column: Option<&str>) -> Result<PromptList, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Data(e.to_string()))?;
        let path = dir.path().join(name);
        std::fs::write(&path, text).map_err(|e| Error::Data(e.to_string()))?;
        PromptList::read(path.to_str().unwrap_or_default(), column)
    }

    fn texts(list: &PromptList) -> Vec<&str> {
        list.prompts.iter().map(|p| p.text.as_str()).collect()
    }

    #[test]
    fn plain_lists_skip_blank_lines_and_carriage_returns() {
        let list = read("prompts.txt", "a red circle\r\n\n  a blue square \n", None).unwrap();
        assert_eq!(texts(&list), ["a red circle", "a blue square"]);
        assert!(list.prompts.iter().all(|p| p.fields.is_empty()));
        let source = list.source.unwrap();
        assert!(source["uri"].as_str().unwrap().ends_with("prompts.txt"));
        assert!(source["digest"].as_str().unwrap().starts_with("blake3:"));
        let error = read("prompts.txt", "a\n", Some("Prompt")).unwrap_err();
        assert!(error.to_string().contains("--prompt-column"), "{error}");
        let error = read("empty.txt", "\n \n", None).unwrap_err();
        assert!(
            error.to_string().contains("empty.txt: no prompts"),
            "{error}"
        );
    }

    #[test]
    fn parti_prompts_tsv_keeps_its_other_columns() {
        // PartiPrompts' header; TSV has no quoting, so quotes stay in the prompt.
        let tsv = "Prompt\tCategory\tChallenge\tNote\n\
                   a \"red\" circle\tAbstract\tBasic\t\n\
                   \t\t\t\n\
                   a blue square\tArtifacts\tPerspective\tfrom DrawBench\n";
        let list = read("PartiPrompts.tsv", tsv, None).unwrap();
        assert_eq!(texts(&list), ["a \"red\" circle", "a blue square"]);
        assert_eq!(list.prompts[1].fields["Category"], "Artifacts");
        assert_eq!(list.prompts[1].fields["Note"], "from DrawBench");
        assert!(!list.prompts[0].fields.contains_key("Prompt"));

        let error = read("list.tsv", "Prompt\tCategory\n\tPeople\n", None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("list.tsv, line 2: no prompt in column 'Prompt'"),
            "{error}"
        );
        let error = read("list.tsv", "id\tdescription\n1\ta cat\n", None).unwrap_err();
        assert!(
            error.to_string().contains("--prompt-column")
                && error.to_string().contains("id, description"),
            "{error}"
        );
        let list = read(
            "list.tsv",
            "id\tdescription\n1\ta cat\n",
            Some("description"),
        )
        .unwrap();
        assert_eq!(texts(&list), ["a cat"]);
        assert_eq!(list.prompts[0].fields["id"], "1");
    }

    #[test]
    fn the_device_kind_leaves_out_the_device_number() {
        let cuda = device_kind("Device<LibTorch(Cuda(0))>");
        assert_eq!(cuda, device_kind("Device<LibTorch(Cuda(3))>"));
        assert_ne!(cuda, device_kind("Device<LibTorch(Cpu)>"));
        assert!(cuda.contains("Cuda"), "{cuda}");
    }

    #[test]
    fn csv_quotes_and_jsonl_objects_are_read() {
        let csv = "caption,seed\n\"a cat, on a mat\",1\n";
        let list = read("list.csv", csv, None).unwrap();
        assert_eq!(texts(&list), ["a cat, on a mat"]);
        let error = read("list.csv", "caption,seed\nb,2\n\"a cat,1\nc,3\n", None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("list.csv, line 3: a field runs over several lines"),
            "{error}"
        );
        // Open in another column, or at the end of the file.
        let error = read("list.csv", "caption,seed\na cat,\"1\nb,2\n", None).unwrap_err();
        assert!(
            error.to_string().contains("line 2: a field runs over"),
            "{error}"
        );
        let error = read("list.csv", "caption,seed\nb,2\n\"a cat,1\n", None).unwrap_err();
        assert!(
            error.to_string().contains("line 3: a field runs over"),
            "{error}"
        );
        // A byte-order mark is not part of the first prompt, nor of the header's first name.
        let list = read("list.txt", "\u{feff}a cat\n", None).unwrap();
        assert_eq!(texts(&list), ["a cat"]);
        let list = read(
            "list.tsv",
            "\u{feff}Prompt\tCategory\na cat\tAnimals\n",
            None,
        )
        .unwrap();
        assert_eq!(texts(&list), ["a cat"]);
        assert_eq!(list.prompts[0].fields["Category"], "Animals");

        let jsonl = "{\"text\": \"a cat\", \"id\": 7}\n\n{\"text\": \"a dog\"}\n";
        let list = read("list.jsonl", jsonl, None).unwrap();
        assert_eq!(texts(&list), ["a cat", "a dog"]);
        assert_eq!(list.prompts[0].fields["id"], 7);
        let error = read("list.jsonl", "{\"text\": \"a\"}\n[1]\n", None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("list.jsonl, line 2: not a JSON object"),
            "{error}"
        );
        let error = read("list.jsonl", "{\"text\": 3}\n", None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("line 1: 'text' is not a non-empty string"),
            "{error}"
        );
    }
}
