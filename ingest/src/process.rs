//! One sample: decode, orient, filter, crop, resize, re-encode, and clean its caption.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, Rgb, RgbImage, RgbaImage,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Reason, jpeg};
use manifests::shards::pairs::PairRow;

/// How a source image becomes `size` pixels (img2dataset's resize modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Crop the centred square, then resize it to size x size.
    CenterCrop,
    /// Pad to a square with the background colour, then resize to size x size.
    Border,
    /// Resize so the shorter side is `size`, keeping the aspect ratio.
    KeepRatio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    Jpeg,
    Png,
    Webp,
}

/// Everything that decides what one sample becomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub size: u32,
    pub resize_mode: ResizeMode,
    /// Sources whose shorter side is below this are rejected (`too_small`).
    pub min_source_size: u32,
    /// Sources longer than this many times their width (or vice versa) are rejected.
    pub max_aspect_ratio: f32,
    /// Sources above this many pixels are refused before decoding (`too_large`), which bounds
    /// memory whatever a file claims.
    pub max_source_pixels: u64,
    pub max_caption_chars: usize,
    pub output_format: OutputFormat,
    pub jpeg_quality: u8,
    /// JPEG chroma subsampling: "4:2:0" (Pillow's, OpenCV's and so img2dataset's default at
    /// every quality) or "4:4:4" (full-resolution colour, larger files).
    pub jpeg_subsampling: JpegSubsampling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JpegSubsampling {
    #[serde(rename = "4:2:0")]
    Yuv420,
    #[serde(rename = "4:4:4")]
    Yuv444,
}

impl ImageConfig {
    /// Source files longer than this are refused unread (`too_large`): no picture within
    /// `max_source_pixels` takes more, 8 bytes a pixel (16-bit RGBA) and a MiB of metadata.
    pub fn max_source_bytes(&self) -> u64 {
        self.max_source_pixels
            .saturating_mul(8)
            .saturating_add(1 << 20)
    }

    pub fn with_size(size: u32) -> ImageConfig {
        ImageConfig {
            size,
            resize_mode: ResizeMode::CenterCrop,
            // Fixed rather than derived from `size`, so overriding the size alone never
            // silently starts rejecting a data set.
            min_source_size: 32,
            max_aspect_ratio: 3.0,
            max_source_pixels: 64 * 1024 * 1024,
            max_caption_chars: 1000,
            output_format: OutputFormat::Jpeg,
            jpeg_quality: 95,
            jpeg_subsampling: JpegSubsampling::Yuv420,
        }
    }
}

/// Alpha is composited on white, as img2dataset does, so transparent logos stay legible.
const BACKGROUND: [u8; 3] = [255, 255, 255];

/// A sample as found in the source, before any checks.
pub struct RawSample<'a> {
    pub key: String,
    pub source: String,
    pub image: &'a [u8],
    /// None when the source has no caption for this sample.
    pub caption: Option<&'a [u8]>,
    pub metadata: Option<String>,
}

/// Trims, collapses runs of white space and checks the caption.
pub fn clean_caption(raw: Option<&[u8]>, max_chars: usize) -> Result<String, Reason> {
    let raw = raw.ok_or("no_caption")?;
    let text = std::str::from_utf8(raw).map_err(|_| "invalid_utf8")?;
    // Control characters other than white space, and a byte-order mark (a caption file saved
    // by a Windows editor), go before the white space is collapsed, so that no run of it is
    // left where they stood.
    let visible: String = text
        .chars()
        .filter(|c| (c.is_whitespace() || !c.is_control()) && *c != '\u{FEFF}')
        .collect();
    let cleaned = visible.split_whitespace().collect::<Vec<_>>().join(" ");
    if cleaned.is_empty() {
        return Err("empty_caption");
    }
    if cleaned.chars().count() > max_chars {
        return Err("caption_too_long");
    }
    Ok(cleaned)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn process(sample: RawSample<'_>, config: &ImageConfig) -> Result<PairRow, Reason> {
    // Caption first: it is cheap, and a sample without one is useless whatever its image.
    let caption = clean_caption(sample.caption, config.max_caption_chars)?;
    if sample.image.is_empty() {
        return Err("empty_file");
    }
    let (image, original_width, original_height) = decode(sample.image, config)?;
    let resized = resize(image, config)?;
    let encoded = encode(&resized, config)?;
    Ok(PairRow {
        key: sample.key,
        caption,
        width: resized.width(),
        height: resized.height(),
        image: encoded,
        original_width,
        original_height,
        sha256: sha256_hex(sample.image),
        source: sample.source,
        metadata: sample.metadata,
    })
}

/// Checks a source's declared size against the filters, before any pixel is decoded.
fn check_dimensions(width: u32, height: u32, config: &ImageConfig) -> Result<(), Reason> {
    if u64::from(width) * u64::from(height) > config.max_source_pixels {
        return Err("too_large");
    }
    if width.min(height) < config.min_source_size.max(1) {
        return Err("too_small");
    }
    let aspect = width.max(height) as f32 / width.min(height) as f32;
    if aspect > config.max_aspect_ratio {
        return Err("bad_aspect_ratio");
    }
    Ok(())
}

/// Decodes with a pixel limit checked from the header, applies EXIF orientation and flattens
/// every colour type (16-bit, palette, grey, CMYK, alpha) to 8-bit RGB. Returns the picture
/// (possibly already downscaled) and the source's full size.
fn decode(bytes: &[u8], config: &ImageConfig) -> Result<(RgbImage, u32, u32), Reason> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        && let Some(decoded) = decode_jpeg(bytes, config)?
    {
        return Ok(decoded);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| "decode_error")?;
    match reader.format() {
        None => return Err("not_an_image"),
        // A picture in a format this build does not decode (GIF, TIFF): not damaged, refused.
        Some(format) if !format.reading_enabled() => return Err("unsupported_format"),
        Some(_) => {}
    }
    let mut header = reader;
    let mut limits = Limits::default();
    limits.max_alloc = Some(config.max_source_pixels.saturating_mul(8));
    header.limits(limits);
    let mut decoder = header.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => "too_large",
        _ => "decode_error",
    })?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, config)?;
    let orientation = decoder.orientation().map_err(|_| "decode_error")?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(_) => "too_large",
        _ => "decode_error",
    })?;
    image.apply_orientation(orientation);
    let (original_width, original_height) = (image.width(), image.height());
    let rgb = if image.color().has_alpha() {
        flatten_alpha(&image.to_rgba8())
    } else {
        image.into_rgb8()
    };
    Ok((rgb, original_width, original_height))
}

/// JPEG through libjpeg-turbo, decoded at the smallest DCT scale (1/8, 1/4, 1/2 or 1) that
/// still leaves the output its `size` pixels (what Pillow's `draft()` does): decoding
/// dominates the per-image work, and a reduced inverse DCT skips most of it. EXIF orientation
/// applied. `None` for colour types left to the general decoder (CMYK, YCCK).
fn decode_jpeg(bytes: &[u8], config: &ImageConfig) -> Result<Option<(RgbImage, u32, u32)>, Reason> {
    let header = jpeg::read_header(bytes).ok_or("decode_error")?;
    let (width, height) = (header.width, header.height);
    check_dimensions(width, height, config)?;
    if !header.rgb {
        return Ok(None);
    }
    // The side that must keep at least `size` pixels after cropping or padding.
    let limiting = match config.resize_mode {
        ResizeMode::CenterCrop | ResizeMode::KeepRatio => width.min(height),
        ResizeMode::Border => width.max(height),
    };
    let eighths = jpeg::scale_eighths(limiting, config.size);
    let rgb = jpeg::decode(bytes, &header, eighths)?;
    let orientation = jpeg::orientation(bytes);
    if orientation == Orientation::NoTransforms {
        return Ok(Some((rgb, width, height)));
    }
    let decoded_width = rgb.width();
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    // The source's size as it is shown: a quarter turn swaps the sides.
    let (shown_width, shown_height) = if image.width() != decoded_width {
        (height, width)
    } else {
        (width, height)
    };
    Ok(Some((image.into_rgb8(), shown_width, shown_height)))
}

fn flatten_alpha(rgba: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let blend = |c: u8, bg: u8| {
            ((u16::from(c) * u16::from(a) + u16::from(bg) * (255 - u16::from(a)) + 127) / 255) as u8
        };
        Rgb([
            blend(r, BACKGROUND[0]),
            blend(g, BACKGROUND[1]),
            blend(b, BACKGROUND[2]),
        ])
    })
}

/// Lanczos3 through fast_image_resize (SIMD), cropping inside the resampler so the crop is
/// never copied.
fn lanczos(
    image: RgbImage,
    crop: (u32, u32, u32, u32),
    out_w: u32,
    out_h: u32,
) -> Result<RgbImage, Reason> {
    use fast_image_resize::{
        FilterType as Filter, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image,
    };
    let (src_w, src_h) = image.dimensions();
    if crop == (0, 0, src_w, src_h) && (src_w, src_h) == (out_w, out_h) {
        return Ok(image);
    }
    let (x, y, w, h) = crop;
    let mut raw = image.into_raw();
    let source = Image::from_slice_u8(src_w, src_h, &mut raw, PixelType::U8x3)
        .map_err(|_| "resize_error")?;
    let mut target = Image::new(out_w, out_h, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(Filter::Lanczos3))
        .crop(f64::from(x), f64::from(y), f64::from(w), f64::from(h));
    Resizer::new()
        .resize(&source, &mut target, &options)
        .map_err(|_| "resize_error")?;
    RgbImage::from_raw(out_w, out_h, target.into_vec()).ok_or("resize_error")
}

fn resize(image: RgbImage, config: &ImageConfig) -> Result<RgbImage, Reason> {
    let size = config.size;
    let (w, h) = image.dimensions();
    match config.resize_mode {
        ResizeMode::CenterCrop => {
            let side = w.min(h);
            lanczos(
                image,
                ((w - side) / 2, (h - side) / 2, side, side),
                size,
                size,
            )
        }
        ResizeMode::Border => {
            let side = w.max(h);
            let mut canvas = RgbImage::from_pixel(side, side, Rgb(BACKGROUND));
            image::imageops::replace(
                &mut canvas,
                &image,
                i64::from((side - w) / 2),
                i64::from((side - h) / 2),
            );
            lanczos(canvas, (0, 0, side, side), size, size)
        }
        ResizeMode::KeepRatio => {
            let scale = size as f64 / w.min(h) as f64;
            let new_w = ((w as f64 * scale).round() as u32).max(1);
            let new_h = ((h as f64 * scale).round() as u32).max(1);
            lanczos(image, (0, 0, w, h), new_w, new_h)
        }
    }
}

pub fn encode(image: &RgbImage, config: &ImageConfig) -> Result<Vec<u8>, Reason> {
    let mut out = Vec::new();
    let result = match config.output_format {
        OutputFormat::Jpeg => {
            return jpeg::encode(
                image,
                config.jpeg_quality,
                config.jpeg_subsampling == JpegSubsampling::Yuv420,
            );
        }
        OutputFormat::Png => image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png),
        OutputFormat::Webp => image.write_to(&mut Cursor::new(&mut out), ImageFormat::WebP),
    };
    result.map_err(|_| "encode_error")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_are_trimmed_collapsed_and_checked() {
        assert_eq!(
            clean_caption(Some(b"  a\t red \n\n circle "), 100),
            Ok("a red circle".into())
        );
        assert_eq!(clean_caption(Some(b" \n "), 100), Err("empty_caption"));
        assert_eq!(clean_caption(None, 100), Err("no_caption"));
        assert_eq!(clean_caption(Some(b"caf\xff"), 100), Err("invalid_utf8"));
        assert_eq!(
            clean_caption(Some("caf\u{e9} \u{1F600}".as_bytes()), 6),
            Ok("caf\u{e9} \u{1F600}".into())
        );
        assert_eq!(clean_caption(Some(b"abcdefg"), 6), Err("caption_too_long"));
        assert_eq!(
            clean_caption(Some("\u{FEFF}a \u{0} red\tcircle\u{7}".as_bytes()), 100),
            Ok("a red circle".to_string())
        );
    }

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn center_crop_keeps_the_middle_and_alpha_goes_on_white() {
        // 40x20: left quarter red, middle half transparent, right quarter blue.
        let rgba = RgbaImage::from_fn(40, 20, |x, _| match x {
            0..10 => image::Rgba([255, 0, 0, 255]),
            10..30 => image::Rgba([0, 0, 0, 0]),
            _ => image::Rgba([0, 0, 255, 255]),
        });
        let bytes = png(&DynamicImage::ImageRgba8(rgba));
        let mut config = ImageConfig::with_size(10);
        config.output_format = OutputFormat::Png;
        config.min_source_size = 8;
        let sample = RawSample {
            key: "k".into(),
            source: "s".into(),
            image: &bytes,
            caption: Some(b"x"),
            metadata: None,
        };
        let row = process(sample, &config).unwrap();
        assert_eq!(
            (
                row.width,
                row.height,
                row.original_width,
                row.original_height
            ),
            (10, 10, 40, 20)
        );
        let out = image::load_from_memory(&row.image).unwrap().to_rgb8();
        assert_eq!(
            out.get_pixel(5, 5).0,
            [255, 255, 255],
            "centre is the transparent middle, on white"
        );
    }

    fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
        let mse: f64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum::<f64>()
            / a.as_raw().len() as f64;
        10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
    }

    #[test]
    fn dct_scaled_jpeg_decode_matches_a_full_decode() {
        // A photo-like pattern: smooth gradients plus mid-frequency texture.
        let source = RgbImage::from_fn(800, 600, |x, y| {
            let t = ((x as f32 / 9.0).sin() * (y as f32 / 13.0).cos() * 40.0) as i32;
            Rgb([
                (x * 255 / 800) as u8,
                (y * 255 / 600) as u8,
                (128 + t).clamp(0, 255) as u8,
            ])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&source)
            .unwrap();
        let mut config = ImageConfig::with_size(128);
        config.output_format = OutputFormat::Png;
        let (scaled, w, h) = decode_jpeg(&jpeg, &config).unwrap().unwrap();
        assert_eq!(
            (w, h),
            (800, 600),
            "the source size is reported, not the decoded one"
        );
        assert_eq!(
            scaled.dimensions(),
            (200, 150),
            "decoded at 1/4: still >= 128 on the short side"
        );
        let fast = resize(scaled, &config).unwrap();
        let full = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        let crop = image::imageops::crop_imm(&full, 100, 0, 600, 600).to_image();
        let reference =
            image::imageops::resize(&crop, 128, 128, image::imageops::FilterType::Lanczos3);
        let quality = psnr(&fast, &reference);
        assert!(
            quality > 30.0,
            "scaled decode differs from a full decode: {quality:.1} dB"
        );
        // At full scale: the same pixels as the image crate's decoder gives, within the
        // rounding of two inverse-DCT implementations.
        let whole_config = ImageConfig::with_size(600);
        let (whole, w, h) = decode_jpeg(&jpeg, &whole_config).unwrap().unwrap();
        assert_eq!((whole.dimensions(), w, h), ((800, 600), 800, 600));
        let agreement = psnr(&whole, &full);
        assert!(agreement > 45.0, "full decode differs: {agreement:.1} dB");
    }

    #[test]
    fn dct_scale_is_the_smallest_that_keeps_the_size() {
        assert_eq!(jpeg::scale_eighths(2048, 256), 1);
        assert_eq!(jpeg::scale_eighths(2041, 256), 1, "libjpeg rounds up: 256");
        assert_eq!(jpeg::scale_eighths(2040, 256), 2, "1/8 would leave 255");
        assert_eq!(jpeg::scale_eighths(632, 256), 4);
        assert_eq!(jpeg::scale_eighths(511, 256), 4);
        assert_eq!(jpeg::scale_eighths(510, 256), 8);
        assert_eq!(
            jpeg::scale_eighths(100, 256),
            8,
            "never upscaled in the IDCT"
        );
    }

    /// The luma component's sampling factors in a baseline JPEG's SOF0 header.
    fn luma_sampling(jpeg: &[u8]) -> u8 {
        let sof = jpeg
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("a baseline JPEG");
        // FFC0, length (2), precision (1), height (2), width (2), components (1), then per
        // component: id, sampling (h << 4 | v), table.
        jpeg[sof + 11]
    }

    #[test]
    fn jpeg_chroma_subsampling_follows_the_config() {
        let image = RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 90]));
        let mut config = ImageConfig::with_size(64);
        assert_eq!(config.jpeg_subsampling, JpegSubsampling::Yuv420);
        let quarter = encode(&image, &config).unwrap();
        config.jpeg_subsampling = JpegSubsampling::Yuv444;
        let full = encode(&image, &config).unwrap();
        assert_eq!(
            luma_sampling(&quarter),
            0x22,
            "4:2:0: luma sampled 2x2 per chroma"
        );
        assert_eq!(luma_sampling(&full), 0x11);
        assert!(quarter.len() < full.len());
    }
}
