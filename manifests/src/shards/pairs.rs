//! `parquet/pairs`: one image-text pair per row (`ingest pairs`), the image stored as the
//! encoded file (JPEG at the ingest preset's size) with its sha256 and where it came from.
//!
//! **Image policy for consumers.** Ingest writes only images it could decode, at the size it
//! was asked for. A consumer that needs pixels calls [`decode_image`] with the size its model
//! expects; a row whose image does not decode, or decodes at another size, is a [`Rejection`]:
//! the consuming stage skips it, logs it with the shard and row key, and counts it by
//! [`Rejection::reason`] in its manifest's `rejected` metric. Nothing is resized behind the
//! user's back: a wrong size means the pairs were ingested for another model (`--size`).

use std::sync::Arc;

use arrow_array::{Array, BinaryArray, Int32Array, StringArray};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use image::RgbImage;

use crate::{Artifact, Error, Upstream, table};

/// One image-text pair as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    pub key: String,
    pub caption: String,
    /// The encoded image file.
    pub image: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub original_width: u32,
    pub original_height: u32,
    /// Of the stored image bytes (hex); decides the held-out split.
    pub sha256: String,
    pub source: String,
    pub metadata: Option<String>,
}

pub const KIND: &str = "parquet/pairs";

pub fn schema() -> Arc<Schema> {
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

/// Encodes rows (in their final order) as one Parquet file; `uri` is what errors name.
pub fn to_parquet(uri: &str, rows: &[PairRow]) -> Result<Bytes, Error> {
    let schema = schema();
    let int = |value: fn(&PairRow) -> u32| {
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| dimension(value(r))),
        )) as arrow_array::ArrayRef
    };
    let text = |value: fn(&PairRow) -> &str| {
        Arc::new(StringArray::from_iter_values(rows.iter().map(value))) as arrow_array::ArrayRef
    };
    let batch = super::batch(
        uri,
        &schema,
        vec![
            text(|r| &r.key),
            text(|r| &r.caption),
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| &r.image))),
            int(|r| r.width),
            int(|r| r.height),
            int(|r| r.original_width),
            int(|r| r.original_height),
            text(|r| &r.sha256),
            text(|r| &r.source),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.metadata.as_deref()),
            )),
        ],
    )?;
    // ~256 images of 256 px JPEG per row group: a few MB, a good read unit for loaders.
    let properties = table::writer_properties(256, false);
    table::write_parquet(uri, schema, &[batch], properties)
}

pub fn from_parquet(uri: &str, bytes: Bytes) -> Result<Vec<PairRow>, Error> {
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
            rows.push(PairRow {
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

/// The rows of one pairs shard of `stage` (digest-checked).
pub fn read(stage: &Upstream, artifact: &Artifact) -> Result<Vec<PairRow>, Error> {
    let uri = stage.artifact_location(artifact)?.uri();
    from_parquet(&uri, stage.read_artifact(artifact)?)
}

/// The pairs shards of `stage`, in order.
pub fn shards(stage: &Upstream) -> Vec<&Artifact> {
    stage.artifacts_of_kind(KIND)
}

/// Why a consumer could not use a row's image (see the module's policy).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("the image does not decode: {0}")]
    Undecodable(String),
    #[error(
        "the image is {width}x{height}, the model expects {expected}x{expected} (ingest with --size {expected})"
    )]
    WrongSize {
        width: u32,
        height: u32,
        expected: u32,
    },
}

impl Rejection {
    /// The key it is counted under in a manifest's `rejected` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Undecodable(_) => "undecodable",
            Rejection::WrongSize { .. } => "wrong_size",
        }
    }
}

/// The row's image as RGB at `size` x `size`, or why it cannot be used.
pub fn decode_image(image: &[u8], size: usize) -> Result<RgbImage, Rejection> {
    let decoded = image::load_from_memory(image)
        .map_err(|e| Rejection::Undecodable(e.to_string()))?
        .to_rgb8();
    let expected = u32::try_from(size).unwrap_or(u32::MAX);
    if decoded.dimensions() != (expected, expected) {
        return Err(Rejection::WrongSize {
            width: decoded.width(),
            height: decoded.height(),
            expected,
        });
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        RgbImage::new(width, height)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    }

    #[test]
    fn the_image_policy_names_each_rejection() {
        assert_eq!(decode_image(&png(8, 8), 8).unwrap().dimensions(), (8, 8));
        let wrong = decode_image(&png(16, 8), 8).unwrap_err();
        assert_eq!(wrong.reason(), "wrong_size");
        assert!(wrong.to_string().contains("16x8") && wrong.to_string().contains("--size 8"));
        let broken = decode_image(b"not an image", 8).unwrap_err();
        assert_eq!(broken.reason(), "undecodable");
    }

    #[test]
    fn rows_round_trip_through_parquet() {
        let row = PairRow {
            key: "k".into(),
            caption: "a red circle".into(),
            image: png(8, 8),
            width: 8,
            height: 8,
            original_width: 10,
            original_height: 12,
            sha256: "ab".into(),
            source: "src/k.png".into(),
            metadata: None,
        };
        let bytes = to_parquet("mem://pairs.parquet", std::slice::from_ref(&row)).unwrap();
        assert_eq!(from_parquet("mem://pairs.parquet", bytes).unwrap(), [row]);
    }
}
