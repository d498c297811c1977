//! The pairs and text shard schemas, and rows to and from Parquet.

use std::sync::Arc;

use arrow_array::{Array, BinaryArray, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use manifests::table;

use crate::Error;
use crate::process::Row;

pub const PAIRS_KIND: &str = "parquet/pairs";
pub const TEXT_KIND: &str = "parquet/text";

pub fn pairs_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        Field::new("width", DataType::Int32, false),
        Field::new("height", DataType::Int32, false),
        Field::new("original_width", DataType::Int32, false),
        Field::new("original_height", DataType::Int32, false),
        Field::new("sha256", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, true),
    ]))
}

fn dimension(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Encodes rows (already in their final order) as one Parquet file.
pub fn pairs_to_parquet(uri: &str, rows: &[Row]) -> Result<Bytes, Error> {
    let schema = pairs_schema();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.key))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.caption),
            )),
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| &r.image))),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| dimension(r.width)),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| dimension(r.height)),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| dimension(r.original_width)),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| dimension(r.original_height)),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.sha256),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.source),
            )),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.metadata.as_deref()),
            )),
        ],
    )
    .map_err(|e| Error::Io(format!("{uri}: {e}")))?;
    // ~256 images of 256 px JPEG per row group: a few MB, a good read unit for loaders.
    let properties = table::writer_properties(256, false);
    Ok(table::write_parquet(uri, schema, &[batch], properties)?)
}

/// Reads a pairs shard back into rows.
pub fn pairs_from_parquet(uri: &str, bytes: Bytes) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    for batch in table::read_parquet(uri, bytes)? {
        let text = |name| table::column::<StringArray>(uri, &batch, name);
        let int = |name| table::column::<Int32Array>(uri, &batch, name);
        let (key, caption, sha256, source, metadata) = (
            text("key")?,
            text("caption")?,
            text("sha256")?,
            text("source")?,
            text("metadata")?,
        );
        let image = table::column::<BinaryArray>(uri, &batch, "image")?;
        let (width, height) = (int("width")?, int("height")?);
        let (original_width, original_height) = (int("original_width")?, int("original_height")?);
        for i in 0..batch.num_rows() {
            rows.push(Row {
                key: key.value(i).to_string(),
                caption: caption.value(i).to_string(),
                image: image.value(i).to_vec(),
                width: width.value(i) as u32,
                height: height.value(i) as u32,
                original_width: original_width.value(i) as u32,
                original_height: original_height.value(i) as u32,
                sha256: sha256.value(i).to_string(),
                source: source.value(i).to_string(),
                metadata: (!metadata.is_null(i)).then(|| metadata.value(i).to_string()),
            });
        }
    }
    Ok(rows)
}

/// One document of a text corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRow {
    pub key: String,
    pub text: String,
    pub url: Option<String>,
    pub timestamp: Option<String>,
}

pub fn text_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("url", DataType::Utf8, true),
        Field::new("timestamp", DataType::Utf8, true),
    ]))
}

pub fn text_to_parquet(uri: &str, rows: &[TextRow]) -> Result<Bytes, Error> {
    let schema = text_schema();
    let batch = RecordBatch::try_new(
        schema.clone(),
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
    )
    .map_err(|e| Error::Io(format!("{uri}: {e}")))?;
    let properties = table::writer_properties(8192, true);
    Ok(table::write_parquet(uri, schema, &[batch], properties)?)
}

pub fn text_from_parquet(uri: &str, bytes: Bytes) -> Result<Vec<TextRow>, Error> {
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
