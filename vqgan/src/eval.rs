//! Reconstruction quality on held-out images: PSNR, SSIM, codebook usage and perplexity, and a
//! side-by-side grid a person can look at.

use burn::tensor::Device;
use models::vqgan::VitVqgan;
use models::vqgan::quantize::perplexity;
use nn::images::{ImageSet, floats, png_bytes, to_rgb};

use crate::Error;

pub fn psnr_db(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-10)).log10()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    pub mse: f64,
    pub psnr_db: f64,
    pub ssim: f64,
    /// Share of the codebook chosen for the held-out images.
    pub codebook_usage: f64,
    pub perplexity: f64,
}

/// Reconstructs `images` in batches and scores them against the originals.
pub fn evaluate(model: &VitVqgan, images: &ImageSet, device: &Device) -> Result<Quality, Error> {
    let (mut squared, mut ssim_sum, mut count) = (0.0, 0.0, 0usize);
    let mut counts = vec![0u64; model.quantizer.codebook_size()];
    for start in (0..images.len()).step_by(32) {
        let indices: Vec<usize> = (start..(start + 32).min(images.len())).collect();
        let x = images.batch(&indices, device);
        let out = model.forward(x.clone());
        let y = out.images.detach().clamp(0.0, 1.0);
        let (xs, ys) = (floats(x)?, floats(y)?);
        let per_image = 3 * images.size * images.size;
        for (a, b) in xs.chunks(per_image).zip(ys.chunks(per_image)) {
            squared += a
                .iter()
                .zip(b)
                .map(|(p, q)| f64::from(p - q).powi(2))
                .sum::<f64>()
                / per_image as f64;
            ssim_sum += ssim(a, b, images.size);
            count += 1;
        }
        let values = out
            .quantized
            .indices
            .into_data_as::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default();
        for v in values {
            if let Some(c) = usize::try_from(v).ok().and_then(|v| counts.get_mut(v)) {
                *c += 1;
            }
        }
    }
    let count = count.max(1) as f64;
    let mse = squared / count;
    Ok(Quality {
        mse,
        psnr_db: psnr_db(mse),
        ssim: ssim_sum / count,
        codebook_usage: counts.iter().filter(|c| **c > 0).count() as f64
            / counts.len().max(1) as f64,
        perplexity: perplexity(&counts),
    })
}

/// Mean SSIM (Wang et al. 2004, constants for a [0, 1] range) over 7x7 windows with stride 2,
/// averaged over the three channels of one channel-first `[3, size, size]` image.
pub fn ssim(a: &[f32], b: &[f32], size: usize) -> f64 {
    const WINDOW: usize = 7;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    if size < WINDOW {
        return f64::NAN;
    }
    let plane = size * size;
    let (mut total, mut windows) = (0.0, 0usize);
    for channel in 0..3 {
        let (pa, pb) = (
            &a[channel * plane..(channel + 1) * plane],
            &b[channel * plane..(channel + 1) * plane],
        );
        for top in (0..=size - WINDOW).step_by(2) {
            for left in (0..=size - WINDOW).step_by(2) {
                let (mut sa, mut sb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for y in top..top + WINDOW {
                    for x in left..left + WINDOW {
                        let (p, q) = (f64::from(pa[y * size + x]), f64::from(pb[y * size + x]));
                        sa += p;
                        sb += q;
                        saa += p * p;
                        sbb += q * q;
                        sab += p * q;
                    }
                }
                let n = (WINDOW * WINDOW) as f64;
                let (ma, mb) = (sa / n, sb / n);
                let (va, vb) = (saa / n - ma * ma, sbb / n - mb * mb);
                let cov = sab / n - ma * mb;
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                windows += 1;
            }
        }
    }
    total / windows.max(1) as f64
}

/// Originals (left) beside reconstructions (right), up to eight held-out images, one per row.
pub fn reconstruction_grid(
    model: &VitVqgan,
    images: &ImageSet,
    device: &Device,
) -> Result<Vec<u8>, Error> {
    let rows = images.len().min(8);
    let size = images.size;
    let indices: Vec<usize> = (0..rows).collect();
    let x = images.batch(&indices, device);
    let y = model.forward(x.clone()).images.detach().clamp(0.0, 1.0);
    side_by_side(&[floats(x)?, floats(y)?], rows, size)
}

/// `rows` pictures of `size` px from each of `columns` (channel-first pixels, picture after
/// picture), one picture per row and one source per column, as a PNG.
pub fn side_by_side(columns: &[Vec<f32>], rows: usize, size: usize) -> Result<Vec<u8>, Error> {
    let per_image = 3 * size * size;
    let mut grid = image::RgbImage::new((columns.len() * size) as u32, (rows * size) as u32);
    for row in 0..rows {
        for (column, pixels) in columns.iter().enumerate() {
            let picture = to_rgb(&pixels[row * per_image..(row + 1) * per_image], size);
            image::imageops::replace(
                &mut grid,
                &picture,
                (column * size) as i64,
                (row * size) as i64,
            );
        }
    }
    png_bytes(&grid)
}
