//! Pictures from pairs shards under the one image policy: a row whose image does not decode or
//! has the wrong size is skipped and counted by reason, by the loaders and by the training
//! stream alike.

use manifests::shards::pairs::{self, PairRow};
use manifests::{ShardSpec, StageRun, Tool, Upstream};
use nn::data::StreamConfig;
use nn::images::{ImageStream, held_out, load};

fn png(side: u32, shade: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_pixel(side, side, image::Rgb([shade, 0, 0]))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

fn row(key: &str, image: Vec<u8>, sha256: &str) -> PairRow {
    PairRow {
        key: key.into(),
        caption: format!("caption {key}"),
        image,
        width: 8,
        height: 8,
        original_width: 8,
        original_height: 8,
        sha256: sha256.into(),
        source: key.into(),
        metadata: None,
    }
}

/// A pairs manifest of three good 8x8 training rows, one held-out row, one 16x16 row and one
/// row whose bytes are no image.
fn pairs_manifest(dir: &std::path::Path) -> Upstream {
    // `ff..` is a training row, `00..` a held-out one (`nn::data::is_held_out`).
    publish(
        dir,
        vec![
            row("good0", png(8, 10), "ff01"),
            row("good1", png(8, 20), "ff02"),
            row("wrong_size", png(16, 30), "ff03"),
            row("good2", png(8, 40), "ff04"),
            row("undecodable", b"not an image".to_vec(), "ff05"),
            row("held", png(8, 50), "0001"),
        ],
    )
}

/// `rows` as the one shard of a pairs manifest under `dir/pairs`.
fn publish(dir: &std::path::Path, rows: Vec<PairRow>) -> Upstream {
    let out = dir.join("pairs").display().to_string();
    let tool = Tool {
        name: "test".into(),
        version: "0".into(),
    };
    let run = StageRun::new(
        "ingest.pairs",
        tool,
        &out,
        &serde_json::json!({}),
        ShardSpec::single(),
    )
    .unwrap();
    assert!(run.begin(false).unwrap().is_none());
    let bytes = pairs::to_parquet("part-0.parquet", &rows).unwrap();
    let artifact = run
        .write_artifact(
            "pairs/part-0.parquet",
            pairs::KIND,
            bytes,
            Some(rows.len() as u64),
        )
        .unwrap();
    run.publish(vec![artifact], serde_json::Map::new()).unwrap();
    Upstream::read(&out).unwrap().0
}

#[test]
fn loaders_skip_and_count_what_the_image_policy_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = pairs_manifest(dir.path());
    let (train, held) = load(&upstream, 8).unwrap();
    assert_eq!(train.keys, ["good0", "good1", "good2"]);
    assert_eq!(held.keys, ["held"]);
    assert_eq!(train.rejected["wrong_size"], 1);
    assert_eq!(train.rejected["undecodable"], 1);
    assert!(held.rejected.is_empty());
    assert_eq!(train.pixels.len(), 3 * 3 * 8 * 8);

    let (sample, stand_in) = held_out(&upstream, 8, 4).unwrap();
    assert!(!stand_in);
    assert_eq!(sample.keys, ["held"]);
    // Refused training rows are the training stream's to count.
    assert!(sample.rejected.is_empty());
}

#[test]
fn the_training_stream_passes_over_refused_rows_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = pairs_manifest(dir.path());
    let device = nn::backend::device("cpu").unwrap();
    let config = StreamConfig {
        seed: 3,
        shuffle_buffer: 0,
        prefetch: 4,
    };
    let mut stream =
        ImageStream::open(&upstream, 8, config.clone(), 0, Default::default()).unwrap();
    // Six good images take two passes over the three good rows, so both bad rows went by.
    let batch = stream.batch(6, &device).unwrap();
    assert_eq!(batch.dims(), [6, 3, 8, 8]);
    let rejected = stream.rejected().clone();
    // Each refused row counted once, though the second pass met them again.
    assert_eq!(rejected["wrong_size"], 1, "{rejected:?}");
    assert_eq!(rejected["undecodable"], 1, "{rejected:?}");
    // Resumed at its position with its counts, a stream goes on exactly as the whole one.
    let position = stream.position();
    let next = stream.batch(3, &device).unwrap();
    let mut resumed = ImageStream::open(&upstream, 8, config.clone(), position, rejected).unwrap();
    let again = resumed.batch(3, &device).unwrap();
    assert_eq!(
        next.into_data().try_to_vec::<f32>().unwrap(),
        again.into_data().try_to_vec::<f32>().unwrap()
    );
    assert_eq!(resumed.rejected(), stream.rejected());

    // Resumed within the first pass, with the counts so far: each refused row is still counted
    // exactly once, whether it came before the resume or after it.
    let mut early = ImageStream::open(&upstream, 8, config.clone(), 0, Default::default()).unwrap();
    early.batch(1, &device).unwrap();
    assert!(early.position() < 5, "{}", early.position());
    let mut resumed = ImageStream::open(
        &upstream,
        8,
        config,
        early.position(),
        early.rejected().clone(),
    )
    .unwrap();
    resumed.batch(6, &device).unwrap();
    assert_eq!(
        resumed.rejected()["wrong_size"],
        1,
        "{:?}",
        resumed.rejected()
    );
    assert_eq!(
        resumed.rejected()["undecodable"],
        1,
        "{:?}",
        resumed.rejected()
    );
}

#[test]
fn a_stream_whose_every_training_image_is_refused_stops_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = publish(
        dir.path(),
        vec![
            row("wrong_size", png(16, 30), "ff03"),
            row("undecodable", b"not an image".to_vec(), "ff05"),
            row("held", png(8, 50), "0001"),
        ],
    );
    let config = StreamConfig {
        seed: 0,
        shuffle_buffer: 0,
        prefetch: 2,
    };
    let mut stream = ImageStream::open(&upstream, 8, config, 0, Default::default()).unwrap();
    let device = nn::backend::device("cpu").unwrap();
    let error = stream.batch(1, &device).unwrap_err().to_string();
    assert!(error.contains("whole pass"), "{error}");
}
