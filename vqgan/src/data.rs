//! Images from an `ingest pairs` manifest, as `[3, size, size]` tensors in [0, 1]: streamed
//! for training (shuffled, decoded in the background, resumable), loaded whole for evaluation.

use burn::tensor::{Device, Tensor};
use image::RgbImage;
use manifests::{Artifact, Upstream, table};
use nn::data::{HeldOutSample, RowStream, StreamConfig};

use crate::Error;

/// Decoded pictures, channel-first, row after row.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub size: usize,
    pub pixels: Vec<f32>,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn push(&mut self, key: String, caption: String, image: &RgbImage) {
        self.pixels.extend(channel_first(image));
        self.keys.push(key);
        self.captions.push(caption);
    }

    /// The images at `indices` as a `[batch, 3, size, size]` tensor.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Tensor<4> {
        let image = 3 * self.size * self.size;
        let mut data = Vec::with_capacity(indices.len() * image);
        for &i in indices {
            data.extend_from_slice(&self.pixels[i * image..(i + 1) * image]);
        }
        to_tensor(data, indices.len(), self.size, device)
    }
}

fn channel_first(image: &RgbImage) -> Vec<f32> {
    let plane = (image.width() * image.height()) as usize;
    let mut pixels = vec![0.0; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            pixels[c * plane + i] = f32::from(pixel.0[c]) / 255.0;
        }
    }
    pixels
}

fn to_tensor(data: Vec<f32>, batch: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::<1>::from_floats(data.as_slice(), device).reshape([batch, 3, size, size])
}

fn decode(uri: &str, key: &str, bytes: &[u8], size: usize) -> Result<RgbImage, Error> {
    let image = image::load_from_memory(bytes)
        .map_err(|e| Error::Data(format!("{uri}: row '{key}': {e}")))?
        .to_rgb8();
    if image.dimensions() != (size as u32, size as u32) {
        return Err(Error::Data(format!(
            "{uri}: row '{key}' is {}x{}, the model expects {size}x{size} (ingest with --size {size})",
            image.width(),
            image.height()
        )));
    }
    Ok(image)
}

/// Held out by the image's sha256 (`nn::data::is_held_out`): the same picture is held out
/// whichever caption or shard it comes with.
fn is_held_out(sha256: &str) -> bool {
    nn::data::is_held_out(sha256)
}

/// A pairs row as stored: what training needs before decoding.
struct RawImage {
    uri: String,
    key: String,
    sha256: String,
    image: Vec<u8>,
}

/// One pairs row as stored.
struct Row<'a> {
    uri: &'a str,
    key: &'a str,
    sha256: &'a str,
    caption: &'a str,
    image: &'a [u8],
}

/// Calls `visit` on each row of `artifacts` (digest-checked) in order, until it says stop.
fn visit_rows(
    upstream: &Upstream,
    artifacts: &[&Artifact],
    mut visit: impl FnMut(Row<'_>) -> Result<bool, Error>,
) -> Result<(), Error> {
    for artifact in artifacts {
        let uri = upstream.artifact_location(artifact)?.uri();
        for batch in table::read_parquet(&uri, upstream.read_artifact(artifact)?)? {
            let keys = table::column::<arrow_array::StringArray>(&uri, &batch, "key")?;
            let hashes = table::column::<arrow_array::StringArray>(&uri, &batch, "sha256")?;
            let captions = table::column::<arrow_array::StringArray>(&uri, &batch, "caption")?;
            let images = table::column::<arrow_array::BinaryArray>(&uri, &batch, "image")?;
            for row in 0..batch.num_rows() {
                let row = Row {
                    uri: &uri,
                    key: keys.value(row),
                    sha256: hashes.value(row),
                    caption: captions.value(row),
                    image: images.value(row),
                };
                if !visit(row)? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn read_shard(upstream: &Upstream, artifact: &Artifact) -> Result<Vec<RawImage>, Error> {
    let mut rows = Vec::new();
    visit_rows(upstream, &[artifact], |row| {
        rows.push(RawImage {
            uri: row.uri.to_string(),
            key: row.key.to_string(),
            sha256: row.sha256.to_string(),
            image: row.image.to_vec(),
        });
        Ok(true)
    })?;
    Ok(rows)
}

fn empty_set(size: usize) -> ImageSet {
    ImageSet {
        size,
        pixels: Vec::new(),
        keys: Vec::new(),
        captions: Vec::new(),
    }
}

fn push_row(set: &mut ImageSet, row: &Row<'_>) -> Result<(), Error> {
    let image = decode(row.uri, row.key, row.image, set.size)?;
    set.push(row.key.to_string(), row.caption.to_string(), &image);
    Ok(())
}

/// Training images streamed from the pairs shards (held-out rows left out), decoded on a
/// background thread, in an order fixed by the seed: `position()` after a step is what a
/// checkpoint stores, and a stream started there continues exactly.
pub struct ImageStream {
    rows: RowStream<Vec<f32>>,
    size: usize,
}

impl ImageStream {
    pub fn open(
        upstream: &Upstream,
        size: usize,
        config: StreamConfig,
        start: u64,
    ) -> Result<ImageStream, Error> {
        let artifacts: Vec<Artifact> = upstream
            .artifacts_of_kind("parquet/pairs")
            .into_iter()
            .cloned()
            .collect();
        let sizes = nn::data::shard_sizes(&upstream.location.uri(), &artifacts)
            .map_err(|e| Error::Data(e.to_string()))?;
        let reader = upstream.clone();
        let rows = RowStream::spawn(
            sizes,
            config,
            start,
            move |shard| read_shard(&reader, &artifacts[shard]).map_err(|e| e.to_string()),
            move |_, raw: RawImage| {
                if is_held_out(&raw.sha256) {
                    return Ok(None);
                }
                let image =
                    decode(&raw.uri, &raw.key, &raw.image, size).map_err(|e| e.to_string())?;
                Ok(Some(channel_first(&image)))
            },
        )
        .map_err(|e| Error::Data(format!("{}: {e}", upstream.location.uri())))?;
        Ok(ImageStream { rows, size })
    }

    /// The next `batch` training images as `[batch, 3, size, size]`.
    pub fn batch(&mut self, batch: usize, device: &Device) -> Result<Tensor<4>, Error> {
        let images = self
            .rows
            .next_items(batch)
            .map_err(|e| Error::Data(e.to_string()))?;
        Ok(to_tensor(images.concat(), batch, self.size, device))
    }

    /// Rows consumed so far (held-out ones included).
    pub fn position(&self) -> u64 {
        self.rows.position()
    }
}

/// Up to `limit` held-out images, read shard by shard until there are enough (a large data
/// set is not read whole for them). Tiny inputs may hold out
/// nothing: then the first training images stand in, and the flag says so.
pub fn held_out(upstream: &Upstream, size: usize, limit: usize) -> Result<(ImageSet, bool), Error> {
    let mut sample = HeldOutSample::new(limit);
    visit_rows(
        upstream,
        &upstream.artifacts_of_kind("parquet/pairs"),
        |row| {
            let held_out = is_held_out(row.sha256);
            if sample.wants(held_out) {
                let image = decode(row.uri, row.key, row.image, size)?;
                sample.offer(
                    held_out,
                    (row.key.to_string(), row.caption.to_string(), image),
                );
            }
            Ok(!sample.is_full())
        },
    )?;
    let (rows, stand_in) = sample.finish();
    let mut set = empty_set(size);
    for (key, caption, image) in rows {
        set.push(key, caption, &image);
    }
    Ok((set, stand_in))
}

/// Reads every pairs shard (digest-checked) and splits train / held-out by image hash.
pub fn load(upstream: &Upstream, size: usize) -> Result<(ImageSet, ImageSet), Error> {
    let (mut train, mut held_out) = (empty_set(size), empty_set(size));
    visit_rows(
        upstream,
        &upstream.artifacts_of_kind("parquet/pairs"),
        |row| {
            let set = if is_held_out(row.sha256) {
                &mut held_out
            } else {
                &mut train
            };
            push_row(set, &row)?;
            Ok(true)
        },
    )?;
    Ok((train, held_out))
}
