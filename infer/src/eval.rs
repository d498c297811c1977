//! `infer eval` for the shapes data: generate images for captions whose facts are known and
//! check them automatically. The largest non-background blob gives the colour (nearest palette
//! colour), the position (its centroid's cell of the 3x3 grid) and the shape (its fill ratio:
//! squares fill their bounding box, circles about pi/4 of it, triangles about half).

use shapes::{BACKGROUND, COLORS, Object, POSITIONS, SHAPES, describe};

/// What the scorer read from one picture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub color: usize,
    pub shape: usize,
    pub position: usize,
}

/// Reads the largest blob of an RGB picture (`size * size * 3`, row-major). `None` when the
/// picture is all background.
pub fn read_picture(rgb: &[u8], size: usize) -> Option<Reading> {
    let background = |p: &[u8]| {
        p.iter()
            .zip(BACKGROUND)
            .map(|(a, b)| (i32::from(*a) - i32::from(b)).abs())
            .max()
            .unwrap_or(0)
            < 40
    };
    let mut label = vec![usize::MAX; size * size];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..size * size {
        if label[start] != usize::MAX || background(&rgb[start * 3..start * 3 + 3]) {
            continue;
        }
        let mut blob = vec![start];
        label[start] = start;
        let mut next = 0;
        while next < blob.len() {
            let i = blob[next];
            next += 1;
            let (x, y) = (i % size, i / size);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < size).then(|| i + 1),
                (y > 0).then(|| i - size),
                (y + 1 < size).then(|| i + size),
            ];
            for j in neighbours.into_iter().flatten() {
                if label[j] == usize::MAX && !background(&rgb[j * 3..j * 3 + 3]) {
                    label[j] = start;
                    blob.push(j);
                }
            }
        }
        if blob.len() > best.len() {
            best = blob;
        }
    }
    // Specks (a few stray pixels) are not objects.
    if best.len() < 6 {
        return None;
    }
    let n = best.len() as f64;
    let mut mean = [0f64; 3];
    let (mut cx, mut cy) = (0f64, 0f64);
    let (mut x0, mut x1, mut y0, mut y1) = (size, 0, size, 0);
    for &i in &best {
        for (c, m) in mean.iter_mut().enumerate() {
            *m += f64::from(rgb[i * 3 + c]) / n;
        }
        let (x, y) = (i % size, i / size);
        cx += x as f64 / n;
        cy += y as f64 / n;
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let color = (0..COLORS.len())
        .min_by(|&a, &b| {
            let distance = |k: usize| {
                COLORS[k]
                    .1
                    .iter()
                    .zip(mean)
                    .map(|(p, m)| (f64::from(*p) - m).powi(2))
                    .sum::<f64>()
            };
            distance(a).total_cmp(&distance(b))
        })
        .unwrap_or(0);
    let cell = |v: f64| ((v + 0.5) * 3.0 / size as f64).floor().clamp(0.0, 2.0) as usize;
    let position = cell(cy) * 3 + cell(cx);
    let fill = n / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    let shape = if fill > 0.88 {
        1 // square
    } else if fill > 0.64 {
        0 // circle
    } else {
        2 // triangle
    };
    Some(Reading {
        color,
        shape,
        position,
    })
}

/// The single object a shapes caption describes (paraphrases included), `None` for two
/// objects or a caption that is not from the shapes data.
pub fn caption_object(caption: &str) -> Option<Object> {
    if caption.contains(" and ") {
        return None;
    }
    let mut best: Option<(usize, Object)> = None;
    for color in 0..COLORS.len() {
        for shape in 0..SHAPES.len() {
            for position in 0..POSITIONS.len() {
                let object = Object {
                    color,
                    shape,
                    position,
                };
                // "at the top" is inside "at the top left": the longest description wins.
                let text = describe(&object);
                if caption.contains(&text) && best.is_none_or(|(len, _)| text.len() > len) {
                    best = Some((text.len(), object));
                }
            }
        }
    }
    best.map(|(_, object)| object)
}

/// Whether `caption` is a shapes caption: each of its objects (" and " between two) one the
/// shapes data describes.
pub fn is_shapes_caption(caption: &str) -> bool {
    caption
        .split(" and ")
        .all(|object| caption_object(object).is_some())
}

/// Prompts covering every colour, shape and position at least once: `count` objects, spread
/// over the grid of all combinations by a fixed stride.
pub fn eval_objects(count: usize) -> Vec<Object> {
    let total = COLORS.len() * SHAPES.len() * POSITIONS.len();
    // Co-prime with every factor, so the walk visits each colour, shape and position evenly.
    let stride = 97;
    (0..count.min(total))
        .map(|k| {
            let i = (k * stride) % total;
            Object {
                color: i % COLORS.len(),
                shape: (i / COLORS.len()) % SHAPES.len(),
                position: i / (COLORS.len() * SHAPES.len()),
            }
        })
        .collect()
}

pub fn prompt(object: &Object) -> String {
    describe(object)
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accuracy {
    pub color: f64,
    pub shape: f64,
    pub position: f64,
    pub all: f64,
    pub images: usize,
    /// All-attribute accuracy over the objects asked with each shape (`None`: none asked).
    /// The 64 px tokenizer's errors are not spread evenly, and these say where they fall.
    pub all_by_shape: [Option<f64>; SHAPES.len()],
    /// The same over the objects asked at each position of the 3x3 grid.
    pub all_by_position: [Option<f64>; POSITIONS.len()],
}

/// Scores readings against the objects asked for (a missing reading counts as wrong).
pub fn accuracy(asked: &[Object], read: &[Option<Reading>]) -> Accuracy {
    let n = asked.len().max(1) as f64;
    let (mut color, mut shape, mut position, mut all) = (0.0, 0.0, 0.0, 0.0);
    // (right, asked) per shape and per position.
    let mut per_shape = [(0usize, 0usize); SHAPES.len()];
    let mut per_position = [(0usize, 0usize); POSITIONS.len()];
    for (object, reading) in asked.iter().zip(read) {
        // A missing reading gets every attribute wrong.
        let (c, s, p) = reading.map_or((false, false, false), |r| {
            (
                r.color == object.color,
                r.shape == object.shape,
                r.position == object.position,
            )
        });
        let right = c && s && p;
        color += f64::from(u8::from(c));
        shape += f64::from(u8::from(s));
        position += f64::from(u8::from(p));
        all += f64::from(u8::from(right));
        for (tally, index) in [
            (&mut per_shape[..], object.shape),
            (&mut per_position[..], object.position),
        ] {
            if let Some((hits, count)) = tally.get_mut(index) {
                *hits += usize::from(right);
                *count += 1;
            }
        }
    }
    Accuracy {
        color: color / n,
        shape: shape / n,
        position: position / n,
        all: all / n,
        images: asked.len(),
        all_by_shape: per_shape.map(share),
        all_by_position: per_position.map(share),
    }
}

fn share((hits, count): (usize, usize)) -> Option<f64> {
    (count > 0).then(|| hits as f64 / count as f64)
}
