//! Containers (webdataset tars, img2dataset parquet) and text files of any size stream through
//! bounded memory into shards of `--shard-rows` samples, and a killed run over them resumes
//! exactly.

mod common;

use std::time::Duration;

use common::*;

fn samples(count: usize, side: u32) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| (format!("{i:09}"), noise_png(side, i as u64)))
        .collect()
}

/// Rows of each shard of `kind`, in the manifest's order.
fn rows_per_shard(manifest: &manifests::Manifest, kind: &str) -> Vec<u64> {
    manifest
        .artifacts
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.rows.unwrap())
        .collect()
}

/// Runs `ingest` and returns its exit code and peak resident memory in bytes, read from the
/// kernel's high-water mark of the child's own address space (VmHWM: reset at exec, so the
/// memory this test process holds does not count).
fn ingest_peak_memory(args: &[String]) -> (i32, u64) {
    let mut child = spawn_quiet(args);
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(kb) = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), peak_kb * 1024);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_large_tar_streams_into_shards_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // ~1300 incompressible 128 px PNGs: a ~64 MB tar.
    let tar = webdataset_tar(&samples(1300, 128));
    write(dir.path(), "src/00000.tar", &tar);
    let tar_bytes = tar.len() as u64;
    let out = dir.path().join("out");
    let (code, peak) = ingest_peak_memory(&pairs_args(
        &dir.path().join("src"),
        &out,
        &["--size", "32", "--shard-rows", "400"],
    ));
    assert_eq!(code, 0);
    assert!(peak > 0, "no memory reading for the child");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(rows.len(), 1300);
    assert_eq!(
        rows_per_shard(&manifest, manifests::shards::pairs::KIND),
        [400, 400, 400, 100],
        "one container, shards of --shard-rows samples"
    );
    assert!(
        manifest.artifacts[0]
            .uri
            .ends_with("part-00000-00000-0000.parquet"),
        "{}",
        manifest.artifacts[0].uri
    );
    assert!(
        peak < tar_bytes / 2,
        "peak memory {} MB for a {} MB tar: the container was held whole",
        peak >> 20,
        tar_bytes >> 20
    );
}

#[test]
fn parquet_containers_stream_by_row_group_into_shards() {
    let dir = tempfile::tempdir().unwrap();
    let all = samples(50, 24);
    write(
        dir.path(),
        "src/00000.parquet",
        img2dataset_parquet(&all, 7),
    );
    let out = dir.path().join("out");
    let (code, text) = ingest_owned(&pairs_args(
        &dir.path().join("src"),
        &out,
        &[
            "--size",
            "16",
            "--min-source-size",
            "8",
            "--shard-rows",
            "20",
        ],
    ));
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    let rows_per_shard = rows_per_shard(&manifest, manifests::shards::pairs::KIND);
    assert_eq!(rows_per_shard, [20, 20, 10]);
    assert_eq!(
        sorted_keys(&rows),
        all.iter().map(|s| s.0.clone()).collect::<Vec<_>>()
    );
    assert!(
        rows.iter()
            .all(|r| r.caption == format!("caption of {}", r.key))
    );
}

#[test]
fn a_killed_run_over_a_tar_resumes_to_exactly_the_uninterrupted_rows() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "src/00000.tar",
        webdataset_tar(&samples(150, 256)),
    );
    let src = dir.path().join("src");
    assert_killed_run_resumes_exactly(
        dir.path(),
        |out| pairs_args(&src, out, &["--size", "32", "--shard-rows", "5"]),
        3,
        "pairs/part-00000-00000-0000.parquet",
        150,
        pairs_rows,
    );
}

/// 30000 JSON lines of ~2 KB (~63 MB, a few MB gzipped), as a C4 file: lines 20000 on repeat
/// the first 20000 and every thousandth line is broken.
fn large_c4_file() -> (Vec<u8>, u64) {
    use std::io::Write;
    let filler = "lorem ipsum ".repeat(170);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut plain_bytes = 0u64;
    for i in 0..30_000 {
        let line = if i % 1000 == 999 {
            "{broken".to_string()
        } else {
            serde_json::json!({"text": format!("document {} {filler}", i % 20_000)}).to_string()
        };
        plain_bytes += line.len() as u64 + 1;
        writeln!(gz, "{line}").unwrap();
    }
    (gz.finish().unwrap(), plain_bytes)
}

#[test]
fn a_large_text_file_is_written_a_part_at_a_time_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (gz, plain_bytes) = large_c4_file();
    write(dir.path(), "src/c4-train.00000-of-01024.json.gz", &gz);
    let src = dir.path().join("src");
    let out = dir.path().join("out");
    let (code, peak) = ingest_peak_memory(&text_args(&src, &out, &["--shard-rows", "1000"]));
    assert_eq!(code, 0);
    assert!(peak > 0, "no memory reading for the child");
    let (manifest, rows) = text_rows(out.to_str().unwrap());
    // 20000 distinct documents, less the 20 whose every copy sits on a broken line.
    assert_eq!(rows.len(), 19_980);
    assert_eq!(rows[0].key, "c4-train-000000001");
    let expected: Vec<u64> = [999; 20].into_iter().chain([0; 10]).collect();
    assert_eq!(
        rows_per_shard(&manifest, manifests::shards::text::KIND),
        expected,
        "parts of 1000 lines; the last 10 hold only repeats of earlier parts"
    );
    assert_eq!(
        manifest.artifacts[29].uri,
        "text/part-00000-00000-0029.parquet"
    );
    let rejected = rejected(&manifest);
    assert_eq!(rejected["duplicate"], serde_json::json!(9_990));
    assert_eq!(rejected["malformed_line"], serde_json::json!(30));
    assert!(
        peak < plain_bytes / 2,
        "peak resident memory {} MB against {} MB of text",
        peak >> 20,
        plain_bytes >> 20
    );
}

#[test]
fn killed_text_run_resumes_to_exactly_the_uninterrupted_documents() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "src/c4-train.00000-of-01024.json.gz",
        large_c4_file().0,
    );
    write(
        dir.path(),
        "src/notes.txt",
        "a plain paragraph long enough\n\nanother plain paragraph\n",
    );
    let src = dir.path().join("src");
    assert_killed_run_resumes_exactly(
        dir.path(),
        |out| text_args(&src, out, &["--shard-rows", "500"]),
        3,
        "text/part-00000-00000-0000.parquet",
        19_982,
        text_rows,
    );
}
