//! The synthetic shapes world of parti's default data: flat circles, squares and triangles in
//! eight colours at nine positions on a mid-gray background, how a caption names them, and how
//! a scene is drawn. `ingest synth` draws the data set with it; `infer eval` asks for the same
//! objects and checks what the model drew.

use image::{Rgb, RgbImage};

pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 220, 40]),
    ("purple", [140, 60, 190]),
    ("orange", [245, 140, 30]),
    ("white", [250, 250, 250]),
    ("black", [15, 15, 15]),
];
/// Row-major 3x3 grid, the phrase used in captions.
pub const POSITIONS: [&str; 9] = [
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
];
pub const BACKGROUND: [u8; 3] = [128, 128, 128];

/// One object in a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub color: usize,
    pub position: usize,
}

pub fn describe(object: &Object) -> String {
    format!(
        "a {} {} {}",
        COLORS[object.color].0, SHAPES[object.shape], POSITIONS[object.position]
    )
}

fn inside(shape: usize, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        _ => {
            // Upward triangle: apex at (0, -r), base at y = 0.8 r from -r to r.
            let t = (dy + r) / (1.8 * r);
            (0.0..=1.0).contains(&t) && dx.abs() <= t * r
        }
    }
}

/// Draws the scene with 4x4 supersampling, so edges are anti-aliased.
pub fn render(objects: &[Object], size: u32, jitter: &[(f32, f32, f32)]) -> RgbImage {
    let mut image = RgbImage::from_pixel(size, size, Rgb(BACKGROUND));
    let s = size as f32;
    for (object, &(jx, jy, jr)) in objects.iter().zip(jitter) {
        let (row, col) = ((object.position / 3) as f32, (object.position % 3) as f32);
        let (cx, cy) = ((col + 0.5 + jx) * s / 3.0, (row + 0.5 + jy) * s / 3.0);
        let r = s * 0.15 * jr;
        let color = COLORS[object.color].1;
        let (x0, x1) = (
            ((cx - r - 1.0).max(0.0)) as u32,
            ((cx + r + 1.0).min(s - 1.0)) as u32,
        );
        let (y0, y1) = (
            ((cy - r - 1.0).max(0.0)) as u32,
            ((cy + r + 1.0).min(s - 1.0)) as u32,
        );
        for y in y0..=y1 {
            for x in x0..=x1 {
                let mut covered = 0u32;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let px = x as f32 + (sx as f32 + 0.5) / 4.0;
                        let py = y as f32 + (sy as f32 + 0.5) / 4.0;
                        covered += u32::from(inside(object.shape, px - cx, py - cy, r));
                    }
                }
                if covered > 0 {
                    let alpha = covered as f32 / 16.0;
                    let pixel = image.get_pixel_mut(x, y);
                    for (channel, target) in pixel.0.iter_mut().zip(color) {
                        *channel =
                            (*channel as f32 * (1.0 - alpha) + target as f32 * alpha).round() as u8;
                    }
                }
            }
        }
    }
    image
}
