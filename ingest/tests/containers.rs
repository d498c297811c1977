//! Containers (webdataset tars, img2dataset parquet) of any size stream through bounded memory
//! into shards of `--shard-rows` samples, and a killed run over them resumes exactly.

mod common;

use std::time::Duration;

use common::*;

fn samples(count: usize, side: u32) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| (format!("{i:09}"), noise_png(side, i as u64)))
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
    let shard_rows: Vec<u64> = manifest
        .artifacts
        .iter()
        .filter(|a| a.kind == "parquet/pairs")
        .map(|a| a.rows.unwrap())
        .collect();
    assert_eq!(
        shard_rows,
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
    let rows_per_shard: Vec<u64> = manifest.artifacts.iter().map(|a| a.rows.unwrap()).collect();
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
        "part-00000-00000-0000.parquet",
        150,
    );
}
