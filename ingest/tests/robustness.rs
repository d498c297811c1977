//! Broken inputs, batch-array sharding and kill -9 resume.

mod common;

use std::process::Command;

use common::*;
use manifests::{Location, Manifest};
use serde_json::json;

/// A PNG whose header declares 30000 x 30000 pixels (2.7 GB decoded) in a few bytes.
fn huge_png_header() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // The first rows' worth of compressed zeros, as a real decompression bomb would start.
    let mut idat = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut idat, &vec![0u8; 4 * 90001]).unwrap();
    chunk(b"IDAT", &idat.finish().unwrap());
    chunk(b"IEND", &[]);
    out
}

/// A real JPEG whose frame header is rewritten to declare 30000 x 30000 pixels.
fn huge_jpeg_header() -> Vec<u8> {
    let mut bytes = jpeg(40, 40, 7);
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    // FFC0, length (2), precision (1), then height and width.
    bytes[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]);
    bytes
}

#[test]
fn broken_inputs_are_counted_and_never_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..3u8 {
        write(&src, &format!("good{i}.png"), png(40, 40, i));
        write(&src, &format!("good{i}.txt"), format!("good {i}"));
    }
    write(&src, "good3.jpg", jpeg(40, 40, 3));
    write(&src, "good3.txt", "good 3");
    let good_png = png(40, 40, 99);
    let good_jpeg = jpeg(48, 48, 98);
    // (file name, file bytes, caption file contents if any)
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a [u8]>);
    let cases: [Case; 12] = [
        ("zero.png", vec![], Some(b"zero bytes")),
        (
            "truncated.png",
            good_png[..good_png.len() * 3 / 5].to_vec(),
            Some(b"cut short"),
        ),
        (
            "random.jpg",
            (0..5000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            Some(b"noise"),
        ),
        (
            "text.png",
            b"this is not an image at all".to_vec(),
            Some(b"text"),
        ),
        (
            "cut.jpg",
            good_jpeg[..good_jpeg.len() * 3 / 5].to_vec(),
            Some(b"cut short"),
        ),
        ("huge.png", huge_png_header(), Some(b"a bomb")),
        ("hugejpeg.jpg", huge_jpeg_header(), Some(b"a jpeg bomb")),
        ("nocap.png", png(40, 40, 50), None),
        ("blank.png", png(40, 40, 51), Some(b"  \n\t ")),
        ("badutf.png", png(40, 40, 52), Some(b"caf\xff\xfe")),
        ("small.png", png(4, 4, 53), Some(b"tiny")),
        ("thin.png", png(200, 20, 54), Some(b"a banner")),
    ];
    for (name, bytes, caption) in &cases {
        write(&src, name, bytes);
        if let Some(caption) = caption {
            write(
                &src,
                &format!("{}.txt", name.rsplit_once('.').unwrap().0),
                caption,
            );
        }
    }
    write(&src, "orphan.txt", "a caption whose image is missing");
    let out = dir.path().join("out");
    let (code, text) = ingest(&[
        "pairs",
        "--input",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--size",
        "32",
        "--min-source-size",
        "8",
    ]);
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(sorted_keys(&rows), ["good0", "good1", "good2", "good3"]);
    assert_eq!(
        rejected(&manifest),
        json!({"bad_aspect_ratio": 1, "decode_error": 2, "empty_caption": 1, "empty_file": 1, "invalid_utf8": 1,
               "no_caption": 1, "no_image": 1, "not_an_image": 2, "too_large": 2, "too_small": 1})
    );
    assert!(
        text.contains("huge") && text.contains("too_large"),
        "rejections are logged with their key: {text}"
    );
}

/// An image file, or a tar's image member, longer than the byte cap (8 bytes for each pixel
/// `--max-source-pixels` allows, and a MiB) is refused as `too_large` before it is read: a
/// picture padded past the cap decodes fine (the first run keeps it), so only the cap refuses
/// it. A caption over 16 MiB is refused the same way (`caption_too_long`), though white space
/// would have collapsed it to a short one.
#[test]
fn images_and_captions_over_their_byte_caps_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 64 * 64 * 8 + (1 << 20);
    let samples = [
        (
            "padded",
            padded_png(1, cap),
            "caption of padded".to_string(),
        ),
        ("plain", png(40, 40, 2), "caption of plain".to_string()),
        (
            "spaced",
            png(40, 40, 3),
            " ".repeat(16 << 20) + "a caption after much white space",
        ),
    ];
    let folder = dir.path().join("folder");
    let mut members = Vec::new();
    for (key, bytes, caption) in &samples {
        write(&folder, &format!("{key}.png"), bytes);
        write(&folder, &format!("{key}.txt"), caption);
        members.push((format!("{key}.png"), bytes.clone()));
        members.push((format!("{key}.txt"), caption.clone().into_bytes()));
    }
    let tars = dir.path().join("tars");
    write(&tars, "00000.tar", tar_of(&members));
    for (name, input) in [("folder", &folder), ("tars", &tars)] {
        let run = |out: &str, extra: &[&str]| {
            let out = dir.path().join(out);
            let mut args = pairs_args(input, &out, &["--size", "32"]);
            args.extend(extra.iter().map(|s| s.to_string()));
            let (code, text) = ingest_owned(&args);
            assert_eq!(code, 0, "{text}");
            pairs_rows(out.to_str().unwrap())
        };
        let (manifest, rows) = run(&format!("{name}-uncapped"), &[]);
        assert_eq!(sorted_keys(&rows), ["padded", "plain"], "{name}");
        assert_eq!(
            rejected(&manifest),
            json!({"caption_too_long": 1}),
            "{name}"
        );
        let (manifest, rows) = run(&format!("{name}-capped"), &["--max-source-pixels", "4096"]);
        assert_eq!(sorted_keys(&rows), ["plain"], "{name}");
        assert_eq!(
            rejected(&manifest),
            json!({"caption_too_long": 1, "too_large": 1}),
            "{name}"
        );
    }
}

fn folder_of(n: u8, size: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        write(dir.path(), &format!("src/{i:03}.png"), png(size, size, i));
        write(
            dir.path(),
            &format!("src/{i:03}.txt"),
            format!("caption {i}"),
        );
    }
    dir
}

#[test]
fn batch_array_jobs_merge_to_exactly_the_single_job_rows() {
    let dir = folder_of(23, 48);
    write(
        dir.path(),
        "src/021b.png",
        std::fs::read(dir.path().join("src/002.png")).unwrap(),
    );
    write(
        dir.path(),
        "src/021b.txt",
        "a copy of image 2 under another name",
    );
    let src = dir.path().join("src");
    let src = src.to_str().unwrap();
    let single = dir.path().join("single");
    // A shard a row, so that `ingest dedup` reads more shards than it holds at once (16).
    let common_args = ["--size", "32", "--shard-rows", "1", "--input", src];
    let (code, text) = ingest(
        &[
            &["pairs", "--out", single.to_str().unwrap()][..],
            &common_args,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{text}");

    let sharded = dir.path().join("sharded");
    let sharded_uri = sharded.to_str().unwrap();
    for index in 0..3 {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
        command.args(
            [
                &["pairs", "--out", sharded_uri, "--num-shards", "3"][..],
                &common_args,
            ]
            .concat(),
        );
        // Job 1 takes its index from the batch environment, as on Kubernetes.
        if index == 1 {
            command.env("JOB_COMPLETION_INDEX", "1");
        } else {
            command.args(["--shard-index", &index.to_string()]);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        !sharded.join("manifest.json").exists(),
        "jobs write partial manifests only"
    );
    let target = Location::parse(sharded_uri).unwrap().join("manifest.json");
    let parts: Vec<(Location, Manifest)> = (0..3)
        .map(|i| {
            let location = target
                .parent()
                .join(&format!("manifest.part-{i:05}-of-00003.json"));
            let (manifest, _) = Manifest::read(&location).unwrap();
            (location, manifest)
        })
        .collect();
    let merged = manifests::merge::merge(&target, &parts).unwrap();
    merged.write(&target).unwrap();

    // Job 2 holds a copy of an image that job 0 has: no job can see that alone.
    let (_, merged_rows) = pairs_rows(sharded_uri);
    assert_eq!(
        merged_rows.len(),
        24,
        "the merged jobs still hold the cross-job duplicate"
    );
    let deduped = dir.path().join("deduped");
    let (code, text) = ingest(&[
        "dedup",
        "--pairs",
        sharded_uri,
        "--out",
        deduped.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");

    let (single_manifest, mut single_rows) = pairs_rows(single.to_str().unwrap());
    let (deduped_manifest, mut deduped_rows) = pairs_rows(deduped.to_str().unwrap());
    single_rows.sort_by(|a, b| a.key.cmp(&b.key));
    deduped_rows.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        single_rows.len(),
        23,
        "{text} {:?}",
        single_manifest.metrics
    );
    assert_eq!(
        single_rows, deduped_rows,
        "the union of the jobs equals the single run, row for row"
    );
    assert_eq!(
        single_manifest.metrics["rows"],
        deduped_manifest.metrics["rows"]
    );
    assert_eq!(
        single_manifest.metrics["rejected"],
        deduped_manifest.metrics["rejected"]
    );
    let (merged_manifest, _) = pairs_rows(sharded_uri);
    assert_eq!(
        deduped_manifest
            .artifacts
            .iter()
            .filter(|a| a.uri.contains("dedup-"))
            .count(),
        1,
        "only the shard with the duplicate is rewritten"
    );
    assert_eq!(single_manifest.config_hash, merged_manifest.config_hash);
}

#[test]
fn killed_run_resumes_to_exactly_the_uninterrupted_rows() {
    let dir = folder_of(120, 384);
    let src = dir.path().join("src");
    assert_killed_run_resumes_exactly(
        dir.path(),
        |out| pairs_args(&src, out, &["--size", "32", "--shard-rows", "3"]),
        2,
        "pairs/part-00000-00000.parquet",
        120,
        pairs_rows,
    );
}

#[test]
fn synth_output_is_ingested_through_its_manifest_and_tampering_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("synth");
    let (code, text) = ingest(&[
        "synth",
        "--out",
        synth.to_str().unwrap(),
        "--images",
        "30",
        "--documents",
        "40",
    ]);
    assert_eq!(code, 0, "{text}");
    // Deterministic: a second generator run into another folder writes identical files.
    let again = dir.path().join("again");
    ingest(&[
        "synth",
        "--out",
        again.to_str().unwrap(),
        "--images",
        "30",
        "--documents",
        "40",
    ]);
    for name in [
        "pairs/000000007.png",
        "pairs/000000007.txt",
        "text/c4-train.00000-of-00001.json.gz",
    ] {
        assert_eq!(
            std::fs::read(synth.join(name)).unwrap(),
            std::fs::read(again.join(name)).unwrap(),
            "{name}"
        );
    }
    let caption = std::fs::read_to_string(synth.join("pairs/000000007.txt")).unwrap();
    assert!(
        caption.contains(" at the ")
            || caption.contains(" on the ")
            || caption.contains(" in the center"),
        "{caption}"
    );

    let out = dir.path().join("pairs");
    let input = synth.join("pairs");
    let (code, text) = ingest(&[
        "pairs",
        "--preset",
        "tiny",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(
        rows.len() as u64
            + manifest.metrics["rejected"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>(),
        30
    );
    assert_eq!(manifest.inputs[0].kind, "manifest");
    assert_eq!(manifest.inputs[0].stage.as_deref(), Some("ingest.synth"));
    assert!(rows.iter().all(|r| (r.width, r.height) == (64, 64)));

    // A synth file changed after the fact: the next stage refuses it, naming the file.
    std::fs::write(synth.join("pairs/000000003.txt"), "tampered").unwrap();
    let (code, text) = ingest(&[
        "pairs",
        "--preset",
        "tiny",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        text.contains("000000003.txt") && text.contains("ingest.synth"),
        "{text}"
    );
}

/// A named image that the disk fails to read (a symlink loop, which fails even for root, as a
/// permission or I/O error would) stops the run with an error naming the file: the manifest
/// never silently lacks the sample. A missing image is still the sample's rejection.
#[test]
fn an_image_the_disk_fails_to_read_fails_the_run_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src, "good.png", png(40, 40, 1));
    std::os::unix::fs::symlink("loop.png", src.join("loop.png")).unwrap();
    write(
        &src,
        "list.csv",
        "image,caption\ngood.png,a good one\ngone.png,missing\n",
    );
    let out = dir.path().join("out");
    let args = |out: &std::path::Path| {
        pairs_args(
            &src.join("list.csv"),
            out,
            &["--size", "32", "--min-source-size", "8"],
        )
    };
    let (code, text) = ingest_owned(&args(&out));
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = pairs_rows(out.to_str().unwrap());
    assert_eq!(rows.len(), 1);
    assert_eq!(rejected(&manifest), json!({"missing_file": 1}));

    write(
        &src,
        "list.csv",
        "image,caption\ngood.png,a good one\nloop.png,unreadable\n",
    );
    let failed = dir.path().join("failed");
    let (code, text) = ingest_owned(&args(&failed));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("loop.png"),
        "the error names the file: {text}"
    );
    assert!(!failed.join("manifest.json").exists());
}

/// Flag values a stage would drop or ignore are refused, naming the flag: a non-finite or
/// below-1 `--max-aspect-ratio` (a JSON config cannot hold `inf`/`NaN`, so it used to be
/// dropped for the preset's value), an unknown `--preset` for `ingest text`, and `--seed` for
/// stages that draw nothing at random.
#[test]
fn flags_a_stage_would_drop_or_ignore_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src, "a.png", png(40, 40, 1));
    write(&src, "a.txt", "a caption");
    write(
        &src,
        "corpus.jsonl",
        "{\"text\": \"a document long enough to keep\"}\n",
    );
    let out = dir.path().join("out");
    let refused = |args: Vec<String>, flag: &str| {
        let (code, text) = ingest_owned(&args);
        assert_ne!(code, 0, "{args:?} was accepted: {text}");
        assert!(text.contains(flag), "the error names {flag}: {text}");
        assert!(!out.join("manifest.json").exists());
    };
    for ratio in ["inf", "NaN", "-inf", "0.5"] {
        let flag = format!("--max-aspect-ratio={ratio}");
        refused(pairs_args(&src, &out, &[&flag]), "--max-aspect-ratio");
    }
    refused(pairs_args(&src, &out, &["--seed", "3"]), "--seed");
    let corpus = src.join("corpus.jsonl");
    refused(text_args(&corpus, &out, &["--preset", "bogus"]), "bogus");
    refused(text_args(&corpus, &out, &["--seed", "3"]), "--seed");

    let (code, text) = ingest_owned(&text_args(&corpus, &out, &["--preset", "tiny"]));
    assert_eq!(code, 0, "{text}");
}
