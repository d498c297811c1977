//! `make pipeline PAIRS=... TEXT=...` on real captioned photographs (not the shapes generator):
//! the photographs scikit-image ships in its wheel (`make venv` takes them out of the pinned
//! wheel), cropped and captioned here. Every stage runs at smoke size, the second run finds every
//! stage up to date, and `infer eval` reports the caption evaluation and no shapes metrics.

use std::path::{Path, PathBuf};
use std::process::Command;

use image::imageops::{self, FilterType};
use image::{DynamicImage, RgbImage};

/// The real photographs among scikit-image's data files, with what they show.
const PHOTOS: [(&str, &str); 18] = [
    ("astronaut.png", "an astronaut in a white space suit"),
    ("brick.png", "a wall of grey bricks"),
    ("camera.png", "a man with a camera on a tripod"),
    ("cell.png", "a living cell under a microscope"),
    ("chelsea.png", "a ginger cat looking to the side"),
    ("clock_motion.png", "a clock on a wall blurred by motion"),
    ("coffee.png", "a cup of coffee on a saucer"),
    ("coins.png", "old coins on a dark background"),
    ("grass.png", "a patch of grass"),
    ("gravel.png", "a patch of gravel"),
    ("hubble_deep_field.jpg", "galaxies in the deep sky"),
    ("ihc.png", "a stained tissue sample"),
    ("moon.png", "the surface of the moon"),
    ("motorcycle_left.png", "a red motorcycle in a workshop"),
    ("motorcycle_right.png", "a motorcycle seen from the right"),
    ("page.png", "a page of printed text"),
    ("retina.jpg", "the retina of an eye with its blood vessels"),
    ("rocket.jpg", "a rocket on its launch pad"),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Six views of every photograph (three crops, a close-up, a mirror image, a darker copy), each with
/// its own caption, as a folder of PNGs with `.txt` captions; and a plain-text corpus.
fn build_data(photos: &Path, out: &Path) -> (PathBuf, PathBuf) {
    let pairs = out.join("photos");
    let text = out.join("text");
    std::fs::create_dir_all(&pairs).unwrap();
    std::fs::create_dir_all(&text).unwrap();
    let mut corpus = String::new();
    for (file, subject) in PHOTOS {
        let path = photos.join(file);
        let photo = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `make venv`)", path.display()))
            .to_rgb8();
        let (width, height) = photo.dimensions();
        let side = width.min(height);
        let square = |x: u32, y: u32, side: u32| -> RgbImage {
            imageops::crop_imm(&photo, x, y, side, side).to_image()
        };
        let centre = square((width - side) / 2, (height - side) / 2, side);
        let mut darker = centre.clone();
        for pixel in darker.pixels_mut() {
            pixel.0 = pixel.0.map(|v| (u16::from(v) * 3 / 5) as u8);
        }
        let views: [(&str, RgbImage); 6] = [
            ("a photograph of", centre.clone()),
            (
                "the top left of a photograph of",
                square(0, 0, side * 3 / 4),
            ),
            (
                "the bottom right of a photograph of",
                square(width - side * 3 / 4, height - side * 3 / 4, side * 3 / 4),
            ),
            (
                "a close-up of",
                square((width - side / 2) / 2, (height - side / 2) / 2, side / 2),
            ),
            (
                "a mirrored photograph of",
                imageops::flip_horizontal(&centre),
            ),
            ("a dark photograph of", darker),
        ];
        let stem = file.split('.').next().unwrap();
        for (k, (view, picture)) in views.into_iter().enumerate() {
            let small =
                DynamicImage::ImageRgb8(picture).resize_exact(128, 128, FilterType::Triangle);
            small.save(pairs.join(format!("{stem}-{k}.png"))).unwrap();
            std::fs::write(
                pairs.join(format!("{stem}-{k}.txt")),
                format!("{view} {subject}"),
            )
            .unwrap();
        }
        corpus.push_str(&format!(
            "This is {subject}. People take pictures of {subject} and write about it.\n\n\
             A caption names what a picture shows, for example {subject}.\n\n"
        ));
    }
    std::fs::write(text.join("corpus.txt"), corpus).unwrap();
    (pairs, text)
}

/// `make pipeline` with `variables` on the binaries this test was built with (`-o build`: the
/// test build is the build); the exit status and everything it printed.
fn make_pipeline(bin: &Path, variables: &[String]) -> (bool, String) {
    let output = Command::new("make")
        .current_dir(workspace_root())
        .args(["--no-print-directory", "-o", "build", "pipeline"])
        .arg(format!("BIN={}", bin.display()))
        .arg(format!("BACKEND={}", nn::backend::backend_name()))
        .args(variables)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn make_pipeline_on_real_captioned_photographs() {
    let photos = workspace_root().join(".venv/skimage-data");
    let dir = tempfile::tempdir().unwrap();
    let (pairs, text) = build_data(&photos, dir.path());
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_infer"));
    let run = dir.path().join("run");
    let variables = [
        format!("RUN={}", run.display()),
        format!("PAIRS={}", pairs.display()),
        format!("TEXT={}", text.display()),
        "STEPS=5".to_string(),
        "EVAL_PROMPTS=4".to_string(),
    ];
    let (ok, said) = make_pipeline(&bin, &variables);
    assert!(ok, "{said}");
    // No synthetic data: `ingest synth` never ran.
    assert!(!run.join("synth").exists(), "{said}");
    let (ok, again) = make_pipeline(&bin, &variables);
    assert!(ok, "{again}");
    // The twelve stages of the own-data pipeline (no `ingest synth`), each found up to date.
    assert_eq!(again.matches("up to date").count(), 12, "{again}");
    let (code, status) =
        manifests::testing::output_of(bin.join("manifests"), &["status", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{status}");

    let pairs_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("pairs/manifest.json")).unwrap()).unwrap();
    let pairs_metrics = &pairs_manifest["metrics"];
    let rejected: u64 = pairs_metrics["rejected"].as_object().map_or(0, |reasons| {
        reasons.values().filter_map(|v| v.as_u64()).sum()
    });
    assert_eq!(
        pairs_metrics["rows"].as_u64().unwrap() + rejected,
        (PHOTOS.len() * 6) as u64,
        "{pairs_metrics}"
    );
    // Every view differs from the others: none is refused as a duplicate.
    assert_eq!(rejected, 0, "{pairs_metrics}");
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval/manifest.json")).unwrap()).unwrap();
    let metrics = &eval["metrics"];
    // Photographs are not shapes: no shapes metrics, the data-agnostic evaluation instead.
    assert_eq!(metrics["data"], "other", "{metrics}");
    assert!(metrics.get("all_accuracy").is_none(), "{metrics}");
    let captions = &metrics["captions"];
    assert_eq!(captions["captions"], 4, "{captions}");
    for side in ["generated", "real"] {
        let similarity = captions[side]["similarity"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&similarity), "{captions}");
        let top1 = captions[side]["retrieval_top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{captions}");
    }
    // The held-out captions are the photographs' own.
    let lines = std::fs::read_to_string(run.join("eval/captions.jsonl")).unwrap();
    for line in lines.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let caption = record["caption"].as_str().unwrap();
        assert!(
            PHOTOS.iter().any(|(_, subject)| caption.ends_with(subject)),
            "{caption}"
        );
    }
}
