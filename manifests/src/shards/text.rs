//! `parquet/text`: one document of a text corpus per row (`ingest text`).

use std::sync::Arc;

use arrow_array::{Array, StringArray};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;

use crate::{Artifact, Error, Upstream, table};

/// One document of a text corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRow {
    pub key: String,
    pub text: String,
    pub url: Option<String>,
    pub timestamp: Option<String>,
}

pub const KIND: &str = "parquet/text";

pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("url", DataType::Utf8, true),
        Field::new("timestamp", DataType::Utf8, true),
    ]))
}

/// Encodes rows (in their final order) as one Parquet file; `uri` is what errors name.
pub fn to_parquet(uri: &str, rows: &[TextRow]) -> Result<Bytes, Error> {
    let schema = schema();
    let batch = super::batch(
        uri,
        &schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.key))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.text))),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.url.as_deref()),
            )),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.timestamp.as_deref()),
            )),
        ],
    )?;
    table::write_parquet(uri, schema, &[batch], table::writer_properties(8192, true))
}

pub fn from_parquet(uri: &str, bytes: Bytes) -> Result<Vec<TextRow>, Error> {
    let mut rows = Vec::new();
    for batch in table::read_parquet(uri, bytes)? {
        let text = |name| table::column::<StringArray>(uri, &batch, name);
        let (key, body, url, timestamp) = (
            text("key")?,
            text("text")?,
            text("url")?,
            text("timestamp")?,
        );
        let optional =
            |array: &StringArray, i: usize| (!array.is_null(i)).then(|| array.value(i).to_string());
        for i in 0..batch.num_rows() {
            rows.push(TextRow {
                key: key.value(i).to_string(),
                text: body.value(i).to_string(),
                url: optional(url, i),
                timestamp: optional(timestamp, i),
            });
        }
    }
    Ok(rows)
}

/// The rows of one text shard of `stage` (digest-checked).
pub fn read(stage: &Upstream, artifact: &Artifact) -> Result<Vec<TextRow>, Error> {
    let uri = stage.artifact_location(artifact)?.uri();
    from_parquet(&uri, stage.read_artifact(artifact)?)
}
