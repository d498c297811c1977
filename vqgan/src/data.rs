//! Images from an `ingest pairs` manifest, as `[3, size, size]` tensors in [0, 1].

use burn::tensor::{Device, Tensor};
use image::RgbImage;
use manifests::{Upstream, table};

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
        let plane = self.size * self.size;
        let start = self.pixels.len();
        self.pixels.resize(start + 3 * plane, 0.0);
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                self.pixels[start + c * plane + i] = f32::from(pixel.0[c]) / 255.0;
            }
        }
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
        Tensor::<1>::from_floats(data.as_slice(), device).reshape([
            indices.len(),
            3,
            self.size,
            self.size,
        ])
    }
}

/// Rows whose sha256 starts with a byte below this go to the held-out set (~5%): the split
/// depends only on the image, so it is the same however the data was sharded.
const HELD_OUT_BELOW: u8 = 13;

/// Reads every pairs shard (digest-checked) and splits train / held-out by image hash.
pub fn load(upstream: &Upstream, size: usize) -> Result<(ImageSet, ImageSet), Error> {
    let empty = || ImageSet {
        size,
        pixels: Vec::new(),
        keys: Vec::new(),
        captions: Vec::new(),
    };
    let (mut train, mut held_out) = (empty(), empty());
    for artifact in upstream.artifacts_of_kind("parquet/pairs") {
        let uri = upstream.artifact_location(artifact)?.uri();
        for batch in table::read_parquet(&uri, upstream.read_artifact(artifact)?)? {
            let keys = table::column::<arrow_array::StringArray>(&uri, &batch, "key")?;
            let hashes = table::column::<arrow_array::StringArray>(&uri, &batch, "sha256")?;
            let captions = table::column::<arrow_array::StringArray>(&uri, &batch, "caption")?;
            let images = table::column::<arrow_array::BinaryArray>(&uri, &batch, "image")?;
            for row in 0..batch.num_rows() {
                let key = keys.value(row).to_string();
                let image = image::load_from_memory(images.value(row))
                    .map_err(|e| Error::Data(format!("{uri}: row '{key}': {e}")))?
                    .to_rgb8();
                if image.dimensions() != (size as u32, size as u32) {
                    return Err(Error::Data(format!(
                        "{uri}: row '{key}' is {}x{}, the model expects {size}x{size} (ingest with --size {size})",
                        image.width(),
                        image.height()
                    )));
                }
                let first_byte = u8::from_str_radix(hashes.value(row).get(..2).unwrap_or("ff"), 16)
                    .unwrap_or(255);
                let set = if first_byte < HELD_OUT_BELOW {
                    &mut held_out
                } else {
                    &mut train
                };
                set.push(key, captions.value(row).to_string(), &image);
            }
        }
    }
    Ok((train, held_out))
}
