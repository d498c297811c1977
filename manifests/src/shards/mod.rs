//! The shard formats the stages hand each other, one module per format: its artifact kind, its
//! Arrow schema, its row type, one writer and one reader. Every producer and every consumer goes
//! through these, so a format (and a policy such as what a wrong-sized image means) is decided
//! in one place.
//!
//! | kind | written by | read by |
//! |---|---|---|
//! | [`pairs::KIND`] `parquet/pairs` | `ingest pairs`, `ingest dedup` | `vqgan *`, `train tokenizer`, `train text-encoder`, `infer eval` |
//! | [`text::KIND`] `parquet/text` | `ingest text` | `train tokenizer`, `train text-encoder` |
//! | [`tokens::KIND`] `parquet/tokens` | `vqgan encode` | `train tokenizer`, `train parti`, `vqgan decode` |

pub mod pairs;
pub mod text;
pub mod tokens;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use serde_json::Value;

use crate::Error;

/// Shards with a `caption` column (what `train tokenizer --captions` reads).
pub const CAPTION_KINDS: [&str; 2] = [pairs::KIND, tokens::KIND];

/// Whether a row whose identifying digest (hex, an optional `algo:` prefix allowed) is this
/// belongs to the held-out ~5% (first byte below 13): a rule of the row alone, so the split is
/// the same however the data is sharded or shuffled, and for every stage that reads it (a pairs
/// row is identified by its image's sha256). Unreadable digests are training rows.
pub fn is_held_out(hex_digest: &str) -> bool {
    let hex = hex_digest
        .split_once(':')
        .map_or(hex_digest, |(_, hex)| hex);
    hex.get(..2)
        .and_then(|first| u8::from_str_radix(first, 16).ok())
        .is_some_and(|first| first < HELD_OUT_BELOW)
}

const HELD_OUT_BELOW: u8 = 13;

/// Rows a stage refused, by reason: the `rejected` metric of its manifest, and the note kept
/// with each shard it writes so a resumed run counts them again.
pub type Rejected = BTreeMap<String, u64>;

/// Adds `counts` to `into`.
pub fn add_rejected(into: &mut Rejected, counts: &Rejected) {
    for (reason, count) in counts {
        *into.entry(reason.clone()).or_default() += count;
    }
}

/// Adds the `rejected` (`{reason: count}`) of a shard note or a manifest's metrics to `into`.
pub fn add_rejected_note(into: &mut Rejected, note: &Value) {
    if let Some(counts) = note.get("rejected").and_then(Value::as_object) {
        for (reason, count) in counts {
            *into.entry(reason.clone()).or_default() += count.as_u64().unwrap_or(0);
        }
    }
}

/// One record batch of `columns` under `schema`; a mismatch names the shard.
fn batch(
    uri: &str,
    schema: &Arc<arrow_schema::Schema>,
    columns: Vec<arrow_array::ArrayRef>,
) -> Result<RecordBatch, Error> {
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::Table {
        uri: uri.to_string(),
        reason: e.to_string(),
    })
}
