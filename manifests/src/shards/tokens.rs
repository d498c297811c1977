//! `parquet/tokens`: one tokenised image per row (`vqgan encode`), with its caption. The
//! schema's metadata records the token grid and the codebook size.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::types::UInt16Type;
use arrow_array::{Array, ListArray, StringArray, UInt16Array};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;

use crate::{Artifact, Error, Upstream, table};

/// One encoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub key: String,
    pub caption: String,
    /// `grid * grid` codes in raster order.
    pub tokens: Vec<u16>,
}

pub const KIND: &str = "parquet/tokens";

pub fn schema(grid: usize, codebook_size: usize) -> Arc<Schema> {
    let metadata: HashMap<String, String> = [
        ("parti.grid".to_string(), grid.to_string()),
        ("parti.codebook_size".to_string(), codebook_size.to_string()),
    ]
    .into_iter()
    .collect();
    Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("caption", DataType::Utf8, false),
            Field::new(
                "tokens",
                DataType::List(Arc::new(Field::new("item", DataType::UInt16, true))),
                false,
            ),
        ],
        metadata,
    ))
}

/// Encodes rows as one Parquet file; `uri` is what errors name.
pub fn to_parquet(
    uri: &str,
    rows: &[TokenRow],
    grid: usize,
    codebook_size: usize,
) -> Result<Bytes, Error> {
    let schema = schema(grid, codebook_size);
    let tokens = ListArray::from_iter_primitive::<UInt16Type, _, _>(
        rows.iter()
            .map(|r| Some(r.tokens.iter().map(|t| Some(*t)).collect::<Vec<_>>())),
    );
    let batch = super::batch(
        uri,
        &schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.key))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.caption),
            )),
            Arc::new(tokens),
        ],
    )?;
    table::write_parquet(uri, schema, &[batch], table::writer_properties(8192, true))
}

pub fn from_parquet(uri: &str, bytes: Bytes) -> Result<Vec<TokenRow>, Error> {
    let mut rows = Vec::new();
    for batch in table::read_parquet(uri, bytes)? {
        let keys = table::column::<StringArray>(uri, &batch, "key")?;
        let captions = table::column::<StringArray>(uri, &batch, "caption")?;
        let tokens = table::column::<ListArray>(uri, &batch, "tokens")?;
        for row in 0..batch.num_rows() {
            let list = tokens.value(row);
            let values =
                list.as_any()
                    .downcast_ref::<UInt16Array>()
                    .ok_or_else(|| Error::Table {
                        uri: uri.to_string(),
                        reason: "column 'tokens' is not list<uint16>".into(),
                    })?;
            rows.push(TokenRow {
                key: keys.value(row).to_string(),
                caption: captions.value(row).to_string(),
                tokens: values.values().to_vec(),
            });
        }
    }
    Ok(rows)
}

/// The rows of one token shard of `stage` (digest-checked).
pub fn read(stage: &Upstream, artifact: &Artifact) -> Result<Vec<TokenRow>, Error> {
    let uri = stage.artifact_location(artifact)?.uri();
    from_parquet(&uri, stage.read_artifact(artifact)?)
}

/// Every token row of `stage` (digest-checked), in shard order.
pub fn read_all(stage: &Upstream) -> Result<Vec<TokenRow>, Error> {
    let mut rows = Vec::new();
    for artifact in stage.artifacts_of_kind(KIND) {
        rows.extend(read(stage, artifact)?);
    }
    Ok(rows)
}
