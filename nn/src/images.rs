//! Pictures from `ingest pairs` shards as `[3, size, size]` tensors in [0, 1]: streamed for
//! training (shuffled, decoded in the background, resumable), loaded for evaluation, and back
//! to RGB images and PNG files.
//!
//! Rows go through [`manifests::shards::pairs`]'s reader and its image policy: a row whose image
//! does not decode, or is not `size` x `size`, is skipped, logged with its shard and key, and
//! counted by reason in [`Rejected`], which the consuming stage puts in its manifest.

use burn::tensor::{Device, Tensor};
use image::RgbImage;
use manifests::shards::pairs::{self, PairRow, decode_image};
use manifests::{Artifact, Upstream};
use tracing::warn;

use crate::Error;
use crate::data::{HeldOutSample, RowStream, StreamConfig};

/// Rows left out by the image policy, by reason (`undecodable`, `wrong_size`).
pub use manifests::shards::Rejected;

/// Decoded pictures, channel-first, row after row.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub size: usize,
    pub pixels: Vec<f32>,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    /// Rows whose image the policy refused.
    pub rejected: Rejected,
}

impl ImageSet {
    pub fn new(size: usize) -> ImageSet {
        ImageSet {
            size,
            pixels: Vec::new(),
            keys: Vec::new(),
            captions: Vec::new(),
            rejected: Rejected::new(),
        }
    }

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

    /// Decodes `row` under the image policy: pushed, or counted as rejected.
    fn offer(&mut self, uri: &str, row: PairRow) {
        match decode(uri, &row, self.size) {
            Ok(image) => self.push(row.key, row.caption, &image),
            Err(reason) => *self.rejected.entry(reason.into()).or_default() += 1,
        }
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

/// An RGB image as channel-first floats in [0, 1].
pub fn channel_first(image: &RgbImage) -> Vec<f32> {
    let plane = (image.width() * image.height()) as usize;
    let mut pixels = vec![0.0; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            pixels[c * plane + i] = f32::from(pixel.0[c]) / 255.0;
        }
    }
    pixels
}

/// Channel-first `[3, size, size]` floats in [0, 1] -> an RGB image.
pub fn to_rgb(pixels: &[f32], size: usize) -> RgbImage {
    let plane = size * size;
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let i = y as usize * size + x as usize;
        let value = |c: usize| (pixels[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgb([value(0), value(1), value(2)])
    })
}

pub fn png_bytes(image: &RgbImage) -> Result<Vec<u8>, Error> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("writing a PNG: {e}")))?;
    Ok(png)
}

/// A tensor's values, row-major.
pub fn floats<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, Error> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Data(format!("reading a tensor: {e:?}")))
}

fn to_tensor(data: Vec<f32>, batch: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::<1>::from_floats(data.as_slice(), device).reshape([batch, 3, size, size])
}

/// The policy's verdict on one row: its image, or the reason it is left out (logged).
pub fn decode(uri: &str, row: &PairRow, size: usize) -> Result<RgbImage, &'static str> {
    decode_image(&row.image, size).map_err(|rejection| {
        warn!("{uri}: row '{}' skipped: {rejection}", row.key);
        rejection.reason()
    })
}

/// Held out by the image's sha256 (`nn::data::is_held_out`): the same picture is held out
/// whichever caption or shard it comes with.
pub fn is_held_out(row: &PairRow) -> bool {
    crate::data::is_held_out(&row.sha256)
}

/// Calls `visit` on each row of the pairs shards of `upstream` (digest-checked) in order, with
/// the shard's location, until it says stop.
fn visit_rows(
    upstream: &Upstream,
    mut visit: impl FnMut(&str, PairRow) -> bool,
) -> Result<(), Error> {
    for artifact in pairs::shards(upstream) {
        let uri = upstream.artifact_location(artifact)?.uri();
        for row in pairs::read(upstream, artifact)? {
            if !visit(&uri, row) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Training images streamed from the pairs shards (held-out rows left out), decoded on a
/// background thread, in an order fixed by the seed: `position()` after a step is what a
/// checkpoint stores, and a stream started there continues exactly.
pub struct ImageStream {
    rows: RowStream<Result<Vec<f32>, &'static str>>,
    size: usize,
    rejected: Rejected,
}

impl ImageStream {
    /// Starts at row `start` of the seeded order; `rejected` carries the counts of the rows
    /// before it (from a checkpoint).
    pub fn open(
        upstream: &Upstream,
        size: usize,
        config: StreamConfig,
        start: u64,
        rejected: Rejected,
    ) -> Result<ImageStream, Error> {
        let artifacts: Vec<Artifact> = pairs::shards(upstream).into_iter().cloned().collect();
        let sizes = crate::data::shard_sizes(&upstream.location.uri(), &artifacts)
            .map_err(|e| Error::Data(e.to_string()))?;
        let uris = artifacts
            .iter()
            .map(|a| Ok(upstream.artifact_location(a)?.uri()))
            .collect::<Result<Vec<String>, Error>>()?;
        let reader = upstream.clone();
        let rows = RowStream::spawn(
            sizes,
            config,
            start,
            move |shard| pairs::read(&reader, &artifacts[shard]).map_err(|e| e.to_string()),
            move |at, row: PairRow| {
                if is_held_out(&row) {
                    return Ok(None);
                }
                Ok(Some(
                    decode(&uris[at.shard], &row, size).map(|image| channel_first(&image)),
                ))
            },
        )
        .map_err(|e| Error::Data(format!("{}: {e}", upstream.location.uri())))?;
        Ok(ImageStream {
            rows,
            size,
            rejected,
        })
    }

    /// The next `batch` training images as `[batch, 3, size, size]`; rows the image policy
    /// refuses are passed over, and counted the first time the stream meets them (a later
    /// epoch meets the same rows again). A whole pass without a usable image is an error.
    pub fn batch(&mut self, batch: usize, device: &Device) -> Result<Tensor<4>, Error> {
        let epoch = self.rows.rows_per_epoch();
        let mut images = Vec::with_capacity(batch);
        let mut since_last_image = 0u64;
        while images.len() < batch {
            let before = self.rows.position();
            let item = self
                .rows
                .next_item()
                .map_err(|e| Error::Data(e.to_string()))?;
            since_last_image += self.rows.position() - before;
            match item {
                Ok(pixels) => {
                    images.push(pixels);
                    since_last_image = 0;
                }
                Err(reason) => {
                    if self.rows.position() <= epoch {
                        *self.rejected.entry(reason.into()).or_default() += 1;
                    }
                    if since_last_image > epoch {
                        return Err(Error::Data(format!(
                            "no training image in a whole pass over the pairs: every one was \
                             refused ({:?})",
                            self.rejected
                        )));
                    }
                }
            }
        }
        Ok(to_tensor(images.concat(), batch, self.size, device))
    }

    /// Rows consumed so far (held-out ones included).
    pub fn position(&self) -> u64 {
        self.rows.position()
    }

    /// Training rows the image policy refused, by reason, each counted once.
    pub fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

/// Up to `limit` held-out images, read shard by shard until there are enough (a large data
/// set is not read whole for them), with the held-out rows the policy refused among those read.
/// Tiny inputs may hold out nothing: then the first training images stand in, and the flag
/// says so.
pub fn held_out(upstream: &Upstream, size: usize, limit: usize) -> Result<(ImageSet, bool), Error> {
    let mut sample = HeldOutSample::new(limit);
    let mut set = ImageSet::new(size);
    visit_rows(upstream, |uri, row| {
        let held_out = is_held_out(&row);
        if sample.wants(held_out) {
            match decode(uri, &row, size) {
                Ok(image) => sample.offer(held_out, (row.key, row.caption, image)),
                // Training rows are counted by whoever trains on them.
                Err(reason) if held_out => *set.rejected.entry(reason.into()).or_default() += 1,
                Err(_) => {}
            }
        }
        !sample.is_full()
    })?;
    let (rows, stand_in) = sample.finish();
    for (key, caption, image) in rows {
        set.push(key, caption, &image);
    }
    Ok((set, stand_in))
}

/// Reads every pairs shard (digest-checked) and splits train / held-out by image hash.
pub fn load(upstream: &Upstream, size: usize) -> Result<(ImageSet, ImageSet), Error> {
    let (mut train, mut held_out) = (ImageSet::new(size), ImageSet::new(size));
    visit_rows(upstream, |uri, row| {
        let set = if is_held_out(&row) {
            &mut held_out
        } else {
            &mut train
        };
        set.offer(uri, row);
        true
    })?;
    Ok((train, held_out))
}

/// The images of one pairs shard at `size`, in row order, with the rows the policy refused.
pub fn shard_images(
    upstream: &Upstream,
    artifact: &Artifact,
    size: usize,
) -> Result<ImageSet, Error> {
    let uri = upstream.artifact_location(artifact)?.uri();
    let mut set = ImageSet::new(size);
    for row in pairs::read(upstream, artifact)? {
        set.offer(&uri, row);
    }
    Ok(set)
}
