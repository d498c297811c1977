//! JPEG through the system's libjpeg-turbo (`csrc/jpeg.c`): decoding with DCT scaling (what
//! Pillow's `draft()` does) and encoding. Every call is self-contained: libjpeg's errors come
//! back as return codes, never as a jump through Rust.

use image::RgbImage;

use crate::Reason;
use image::metadata::Orientation;
use std::os::raw::{c_int, c_uchar, c_uint, c_ulong};

const OK: c_int = 0;
const UNSUPPORTED: c_int = 2;

unsafe extern "C" {
    fn parti_jpeg_decode(
        data: *const c_uchar,
        size: c_ulong,
        width: *mut c_uint,
        height: *mut c_uint,
        rgb: *mut c_int,
        scale_eighths: c_uint,
        out: *mut c_uchar,
        out_width: c_uint,
        out_height: c_uint,
    ) -> c_int;
    fn parti_jpeg_encode(
        rgb: *const c_uchar,
        width: c_uint,
        height: c_uint,
        quality: c_int,
        subsample_420: c_int,
        out: *mut *mut c_uchar,
        out_size: *mut c_ulong,
    ) -> c_int;
    fn parti_jpeg_free(buffer: *mut c_uchar);
}

/// A JPEG's stored size, read from its header.
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// Whether the colour space converts to RGB here (CMYK and YCCK do not).
    pub rgb: bool,
}

pub fn read_header(bytes: &[u8]) -> Option<Header> {
    let (mut width, mut height, mut rgb) = (0, 0, 0);
    // SAFETY: the pointer and length describe `bytes`, which outlives the call; the outputs are
    // plain integers, and a null `out` makes the C side stop after the header.
    let status = unsafe {
        parti_jpeg_decode(
            bytes.as_ptr(),
            c_ulong::try_from(bytes.len()).ok()?,
            &mut width,
            &mut height,
            &mut rgb,
            8,
            std::ptr::null_mut(),
            0,
            0,
        )
    };
    matches!(status, OK | UNSUPPORTED).then_some(Header {
        width,
        height,
        rgb: rgb != 0,
    })
}

/// The scale, in eighths, libjpeg's reduced inverse DCT should decode at so that `side` keeps at
/// least `keep` pixels: the smallest of 1, 2, 4 (SIMD-accelerated in libjpeg-turbo) and 8.
pub fn scale_eighths(side: u32, keep: u32) -> u32 {
    [1, 2, 4]
        .into_iter()
        .find(|&eighths| scaled(side, eighths) >= keep)
        .unwrap_or(8)
}

/// A side at `eighths`/8, rounded up as libjpeg rounds it.
fn scaled(side: u32, eighths: u32) -> u32 {
    (u64::from(side) * u64::from(eighths)).div_ceil(8) as u32
}

/// Decodes to RGB at `eighths`/8 of the stored size; `header` is this file's and says `rgb`.
/// `decode_error` for anything libjpeg refuses, including a file that ends before its last
/// scan.
pub fn decode(bytes: &[u8], header: &Header, eighths: u32) -> Result<RgbImage, Reason> {
    let (width, height) = (
        scaled(header.width, eighths),
        scaled(header.height, eighths),
    );
    let len = (width as usize)
        .checked_mul(height as usize)
        .and_then(|pixels| pixels.checked_mul(3))
        .ok_or("too_large")?;
    let mut pixels = vec![0u8; len];
    let size = c_ulong::try_from(bytes.len()).map_err(|_| "too_large")?;
    let (mut stored_width, mut stored_height, mut rgb) = (0, 0, 0);
    // SAFETY: `pixels` holds width * height * 3 bytes, the only size the C side writes (it
    // refuses any other output size before writing); the other outputs are plain integers.
    let status = unsafe {
        parti_jpeg_decode(
            bytes.as_ptr(),
            size,
            &mut stored_width,
            &mut stored_height,
            &mut rgb,
            eighths,
            pixels.as_mut_ptr(),
            width,
            height,
        )
    };
    if status != OK {
        return Err("decode_error");
    }
    RgbImage::from_raw(width, height, pixels).ok_or("decode_error")
}

/// Baseline JPEG at `quality` (1..=100), chroma 4:2:0 or 4:4:4.
pub fn encode(image: &RgbImage, quality: u8, subsample_420: bool) -> Result<Vec<u8>, Reason> {
    let mut buffer: *mut c_uchar = std::ptr::null_mut();
    let mut size: c_ulong = 0;
    // SAFETY: the input is the image's own width * height * 3 bytes; the C side allocates the
    // output and hands its ownership to us (freed below on every path).
    let status = unsafe {
        parti_jpeg_encode(
            image.as_raw().as_ptr(),
            image.width(),
            image.height(),
            c_int::from(quality.clamp(1, 100)),
            c_int::from(subsample_420),
            &mut buffer,
            &mut size,
        )
    };
    if buffer.is_null() {
        return Err("encode_error");
    }
    let out = usize::try_from(size)
        .ok()
        .filter(|_| status == OK)
        .map(|len| {
            // SAFETY: libjpeg wrote `size` bytes at `buffer`, which stays allocated until freed below.
            unsafe { std::slice::from_raw_parts(buffer, len) }.to_vec()
        });
    // SAFETY: `buffer` came from the C side's allocator and is freed exactly once.
    unsafe { parti_jpeg_free(buffer) };
    out.ok_or("encode_error")
}

/// The EXIF orientation stored in an APP1 segment before the first scan, if any.
pub fn orientation(bytes: &[u8]) -> Orientation {
    let mut at = 2;
    while let (Some(&0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) {
        match marker {
            0xFF => at += 1,
            // Start of scan or end of image: no metadata segment follows.
            0xDA | 0xD9 => break,
            0x01 | 0xD0..=0xD7 => at += 2,
            _ => {
                let Some(&[high, low]) = bytes.get(at + 2..at + 4) else {
                    break;
                };
                let length = usize::from(u16::from_be_bytes([high, low]));
                let Some(segment) = bytes.get(at + 4..at + 2 + length.max(2)) else {
                    break;
                };
                if marker == 0xE1
                    && let Some(exif) = segment.strip_prefix(b"Exif\0\0")
                {
                    return Orientation::from_exif_chunk(exif).unwrap_or(Orientation::NoTransforms);
                }
                at += 2 + length.max(2);
            }
        }
    }
    Orientation::NoTransforms
}
