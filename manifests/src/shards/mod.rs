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

use std::sync::Arc;

use arrow_array::RecordBatch;

use crate::Error;

/// Shards with a `caption` column (what `train tokenizer --captions` reads).
pub const CAPTION_KINDS: [&str; 2] = [pairs::KIND, tokens::KIND];

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
