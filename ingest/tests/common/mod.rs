#![allow(dead_code)]
pub mod buckets;

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use manifests::shards::pairs::{self, PairRow as Row};
use manifests::shards::text::{self, TextRow};
use manifests::{Manifest, Upstream};

/// A picture with a distinct colour per seed, so every test image has unique bytes.
pub fn picture(width: u32, height: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([seed, (x % 256) as u8, (y % 256) as u8])
    })
}

pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

pub fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(
        &DynamicImage::ImageRgb8(picture(width, height, seed)),
        ImageFormat::Png,
    )
}

pub fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(
        &DynamicImage::ImageRgb8(picture(width, height, seed)),
        ImageFormat::Jpeg,
    )
}

pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Every row of a manifest's `kind` shards, read through digest-checked artifacts by `read`.
fn shard_rows<T>(
    out: &str,
    kind: &str,
    read: fn(&Upstream, &manifests::Artifact) -> Result<Vec<T>, manifests::Error>,
) -> (Manifest, Vec<T>) {
    let (upstream, _) = Upstream::read(out).unwrap();
    let shards = upstream.artifacts_of_kind(kind);
    let rows = shards.iter().flat_map(|a| read(&upstream, a).unwrap());
    (upstream.manifest.clone(), rows.collect())
}

pub fn pairs_rows(out: &str) -> (Manifest, Vec<Row>) {
    shard_rows(out, pairs::KIND, pairs::read)
}

pub fn text_rows(out: &str) -> (Manifest, Vec<TextRow>) {
    shard_rows(out, text::KIND, text::read)
}

pub fn ingest(args: &[&str]) -> (i32, String) {
    manifests::testing::output_of(env!("CARGO_BIN_EXE_ingest"), args)
}

pub fn rejected(manifest: &Manifest) -> serde_json::Value {
    manifest.metrics["rejected"].clone()
}

pub fn sorted_keys(rows: &[Row]) -> Vec<String> {
    let mut keys: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys
}

/// A tar of `(name, bytes)` members, in order; a name ending in `/` is a folder.
/// A good 40x40 PNG followed by `padding` zero bytes, which decoders ignore: a file that only
/// a cap on its length refuses.
pub fn padded_png(seed: u8, padding: usize) -> Vec<u8> {
    let mut bytes = png(40, 40, seed);
    bytes.resize(bytes.len() + padding, 0);
    bytes
}

pub fn tar_of(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        if name.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
        }
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

/// A webdataset tar: `KEY.png` + `KEY.txt` for each (key, png bytes), members adjacent.
pub fn webdataset_tar(samples: &[(String, Vec<u8>)]) -> Vec<u8> {
    let members: Vec<(String, Vec<u8>)> = samples
        .iter()
        .flat_map(|(key, png)| {
            [
                (format!("{key}.png"), png.clone()),
                (
                    format!("{key}.txt"),
                    format!("caption of {key}").into_bytes(),
                ),
            ]
        })
        .collect();
    tar_of(&members)
}

/// An img2dataset-style parquet (`key`, `caption`, `png` bytes), `row_group` rows per group.
pub fn img2dataset_parquet(samples: &[(String, Vec<u8>)], row_group: usize) -> Vec<u8> {
    use arrow_array::{BinaryArray, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("png", DataType::Binary, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(samples.iter().map(|s| &s.0))),
            Arc::new(StringArray::from_iter_values(
                samples.iter().map(|s| format!("caption of {}", s.0)),
            )),
            Arc::new(BinaryArray::from_iter_values(samples.iter().map(|s| &s.1))),
        ],
    )
    .unwrap();
    parquet_of(schema, batch, row_group)
}

fn parquet_of(
    schema: arrow_schema::SchemaRef,
    batch: arrow_array::RecordBatch,
    row_group: usize,
) -> Vec<u8> {
    let properties = manifests::table::writer_properties(row_group, false);
    manifests::table::write_parquet("test", schema, &[batch], properties)
        .unwrap()
        .to_vec()
}

/// A parquet URL list (`url`, `caption`), `row_group` rows per group.
pub fn url_list_parquet(urls: &[&str], row_group: usize) -> Vec<u8> {
    use arrow_array::{RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("url", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(urls)),
            Arc::new(StringArray::from_iter_values(
                urls.iter().map(|url| format!("caption of {url}")),
            )),
        ],
    )
    .unwrap();
    parquet_of(schema, batch, row_group)
}

/// A PNG of seeded noise: incompressible, so its size is what a test means it to be.
pub fn noise_png(side: u32, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let image = RgbImage::from_fn(side, side, |_, _| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let [r, g, b, ..] = (state >> 24).to_le_bytes();
        Rgb([r, g, b])
    });
    encode(&DynamicImage::ImageRgb8(image), ImageFormat::Png)
}

/// `ingest pairs --input SRC --out OUT` plus `extra`, as owned arguments.
pub fn pairs_args(src: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    stage_args("pairs", src, out, extra)
}

pub fn text_args(src: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    stage_args("text", src, out, extra)
}

fn stage_args(stage: &str, src: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let (src, out) = (src.to_str().unwrap(), out.to_str().unwrap());
    [stage, "--input", src, "--out", out]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

pub fn ingest_owned(args: &[String]) -> (i32, String) {
    ingest(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

pub fn spawn_quiet(args: &[String]) -> std::process::Child {
    use std::process::Stdio;
    Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `ingest args(out)` to the end once, then again into a second folder killed (SIGKILL,
/// no cleanup) once the folder of `first_shard` (`pairs/...`, `text/...`) holds
/// `shards_before_kill` files, and resumes it: the resumed run must keep `first_shard` as it
/// was and end with exactly the uninterrupted run's rows (as `rows_of` reads them), artifacts
/// and metrics, and no resume records left.
pub fn assert_killed_run_resumes_exactly<R: PartialEq + std::fmt::Debug>(
    dir: &Path,
    args: impl Fn(&Path) -> Vec<String>,
    shards_before_kill: usize,
    first_shard: &str,
    expected_rows: usize,
    rows_of: impl Fn(&str) -> (Manifest, Vec<R>),
) {
    let reference = dir.join("reference");
    let (code, text) = ingest_owned(&args(&reference));
    assert_eq!(code, 0, "{text}");

    let out = dir.join("killed");
    let (folder, first_shard) = first_shard.split_once('/').unwrap();
    let shards = out.join(folder);
    kill_mid_run(&args(&out), &out, || {
        std::fs::read_dir(&shards).map(|d| d.count()).unwrap_or(0) >= shards_before_kill
    });
    let first = shards.join(first_shard);
    let kept_before = std::fs::metadata(&first).unwrap().modified().unwrap();

    let (code, text) = ingest_owned(&args(&out));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        kept_before,
        "finished shards are kept, not redone"
    );
    assert_same_as_reference(&out, &reference, expected_rows, rows_of);
    let leftovers = manifests::testing::files_below(&out.join("_work"));
    assert!(
        leftovers.is_empty(),
        "resume records are cleaned up after publishing: {leftovers:?}"
    );
}

/// Starts `ingest args` (writing to `out`) and kills it (SIGKILL, no cleanup) once `ready`
/// says so; from scratch again, up to five times, until a kill lands before the run published.
pub fn kill_mid_run(args: &[String], out: &Path, ready: impl Fn() -> bool) {
    use std::time::{Duration, Instant};
    for _attempt in 0..5 {
        let _ = std::fs::remove_dir_all(out);
        let mut child = spawn_quiet(args);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !ready() {
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if !out.join("manifest.json").exists() {
            return;
        }
    }
    panic!("could not kill the run before it finished");
}

/// The run in `out` has exactly the rows (as `rows_of` reads them, `expected_rows` of them),
/// artifacts and metrics (but the wall time) of the run in `reference`.
pub fn assert_same_as_reference<R: PartialEq + std::fmt::Debug>(
    out: &Path,
    reference: &Path,
    expected_rows: usize,
    rows_of: impl Fn(&str) -> (Manifest, Vec<R>),
) {
    let (resumed_manifest, resumed) = rows_of(out.to_str().unwrap());
    let (reference_manifest, expected) = rows_of(reference.to_str().unwrap());
    assert_eq!(resumed.len(), expected_rows);
    assert_eq!(
        resumed, expected,
        "resumed run has exactly the rows of the uninterrupted one"
    );
    assert_eq!(resumed_manifest.artifacts, reference_manifest.artifacts);
    // Everything but the wall time, which stages that report it report per run.
    let without_seconds = |manifest: &Manifest| {
        let mut metrics = manifest.metrics.clone();
        metrics.remove("seconds");
        metrics
    };
    assert_eq!(
        without_seconds(&resumed_manifest),
        without_seconds(&reference_manifest)
    );
}
