//! Parquet in and out of memory, with errors that name the file and column.
//!
//! Shards are bounded by a stage's rows-per-shard setting, so a shard is read whole (which also
//! lets its digest be checked) and written whole (one atomic put). Parquet files from outside
//! the pipeline (img2dataset's) can be any size: `stream_parquet` reads those a row group's
//! columns at a time.

use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::Schema;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::{Error, Location};

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

/// A parquet file in a bucket, read by ranges: the footer, then the column chunks the reader
/// asks for.
struct RangedParquet {
    location: Location,
    size: u64,
}

impl parquet::file::reader::Length for RangedParquet {
    fn len(&self) -> u64 {
        self.size
    }
}

impl parquet::file::reader::ChunkReader for RangedParquet {
    type T = Box<dyn std::io::Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.location.ranged_reader(start, self.size))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.location
            .get_range(start..start + length as u64)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}

/// Hands `each` the record batches of a parquet file of any size, `batch_rows` rows at a time,
/// holding at most one row group's column chunks in memory.
pub fn stream_parquet(
    location: &Location,
    batch_rows: usize,
    each: &mut dyn FnMut(RecordBatch) -> Result<(), Error>,
) -> Result<(), Error> {
    let uri = location.uri();
    let fail = |reason: String| Error::Table {
        uri: uri.clone(),
        reason,
    };
    let reader = match location.local_path() {
        Some(path) => {
            let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
            ParquetRecordBatchReaderBuilder::try_new(file)
                .map(|b| b.with_batch_size(batch_rows).build())
        }
        None => {
            let size = location.size()?;
            ParquetRecordBatchReaderBuilder::try_new(RangedParquet {
                location: location.clone(),
                size,
            })
            .map(|b| b.with_batch_size(batch_rows).build())
        }
    }
    .map_err(|e| fail(format!("not a readable parquet file: {e}")))?
    .map_err(|e| fail(e.to_string()))?;
    for batch in reader {
        each(batch.map_err(|e| fail(e.to_string()))?)?;
    }
    Ok(())
}
