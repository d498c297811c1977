//! Parquet in and out of memory, with errors that name the file and column.
//!
//! Shards are bounded by a stage's rows-per-shard setting, so a shard is read whole (which also
//! lets its digest be checked) and written whole (one atomic put).

use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::Schema;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::Error;

/// Row groups sized for the payload: images want a few hundred rows, tokens thousands.
pub fn writer_properties(row_group_rows: usize, compress: bool) -> WriterProperties {
    let compression = if compress {
        Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default())
    } else {
        // Image bytes are already compressed; recompressing costs time and saves nothing.
        Compression::UNCOMPRESSED
    };
    WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_compression(compression)
        .build()
}

pub fn write_parquet(
    uri: &str,
    schema: Arc<Schema>,
    batches: &[RecordBatch],
    properties: WriterProperties,
) -> Result<Bytes, Error> {
    let fail = |e: parquet::errors::ParquetError| Error::Table {
        uri: uri.to_string(),
        reason: e.to_string(),
    };
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, schema, Some(properties)).map_err(fail)?;
    for batch in batches {
        writer.write(batch).map_err(fail)?;
    }
    writer.close().map_err(fail)?;
    Ok(Bytes::from(buffer))
}

pub fn read_parquet(uri: &str, bytes: Bytes) -> Result<Vec<RecordBatch>, Error> {
    let fail = |reason: String| Error::Table {
        uri: uri.to_string(),
        reason,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| fail(format!("not a readable parquet file: {e}")))?
        .with_batch_size(1024)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))
}

/// Parquet key-value metadata of a file (e.g. the token grid size).
pub fn parquet_metadata(uri: &str, bytes: Bytes) -> Result<Vec<(String, String)>, Error> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| Error::Table {
        uri: uri.to_string(),
        reason: format!("not a readable parquet file: {e}"),
    })?;
    Ok(builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default())
}

/// A typed column, or an error naming the file, the column and what was found instead.
pub fn column<'a, T: Array + 'static>(
    uri: &str,
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a T, Error> {
    let array = batch.column_by_name(name).ok_or_else(|| Error::Table {
        uri: uri.to_string(),
        reason: format!("no column '{name}'"),
    })?;
    array
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| Error::Table {
            uri: uri.to_string(),
            reason: format!(
                "column '{name}' has type {} (expected {})",
                array.data_type(),
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("?")
            ),
        })
}
