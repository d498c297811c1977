//! Reading sources from and writing shards to a real S3 API server (moto) on loopback.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use manifests::Location;
use serde_json::json;

const SECRET: &str = "ingest-SECRET-never-logged-9931";

#[test]
fn pairs_and_text_from_and_to_a_bucket() {
    let server = manifests::testing::start_moto().expect("moto S3 server");
    let env = server.env(SECRET);
    for (key, value) in &env {
        // SAFETY: this file holds a single test; no other thread reads the environment.
        unsafe { std::env::set_var(key, value) };
    }
    server.create_bucket("data").unwrap();
    let src = Location::parse("s3://data/src").unwrap();
    for i in 0..5u8 {
        src.join(&format!("{i}.png"))
            .put(Bytes::from(png(40, 40, i)))
            .unwrap();
        src.join(&format!("{i}.txt"))
            .put(Bytes::from(format!("caption {i}")))
            .unwrap();
    }
    src.join("5.png")
        .put(Bytes::from_static(b"broken"))
        .unwrap();
    src.join("5.txt")
        .put(Bytes::from_static(b"broken image"))
        .unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
            .args(args)
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{text}");
        assert!(
            !text.contains(SECRET),
            "credentials leaked into output: {text}"
        );
        text
    };
    let pairs = [
        "pairs",
        "--input",
        "s3://data/src",
        "--out",
        "s3://data/run/pairs",
        "--size",
        "32",
        "--min-source-size",
        "8",
    ];
    run(&pairs);
    let (manifest, rows) = pairs_rows("s3://data/run/pairs");
    assert_eq!(sorted_keys(&rows), ["0", "1", "2", "3", "4"]);
    assert_eq!(rejected(&manifest), json!({"not_an_image": 1}));
    assert!(manifest.inputs[0].uri.starts_with("s3://data/src"));
    let text = run(&pairs);
    assert!(text.contains("up to date"), "{text}");
    // The same prefix with a trailing slash is the same input; an object rewritten with other
    // bytes of the same length is not (its ETag changed).
    let mut slashed = pairs;
    slashed[2] = "s3://data/src/";
    let text = run(&slashed);
    assert!(text.contains("up to date"), "{text}");
    src.join("3.txt")
        .put(Bytes::from_static(b"caption 9"))
        .unwrap();
    let text = run(&slashed);
    assert!(text.contains("s3://data/src/3.txt changed"), "{text}");

    let corpus = b"{\"text\": \"a document that lives in a bucket\"}\n{\"text\": \"and another one in the bucket\"}\n";
    Location::parse("s3://data/c4/part.jsonl")
        .unwrap()
        .put(Bytes::from_static(corpus))
        .unwrap();
    run(&[
        "text",
        "--input",
        "s3://data/c4/",
        "--out",
        "s3://data/run/text",
    ]);
    let (_, rows) = text_rows("s3://data/run/text");
    assert_eq!(rows.len(), 2);
    // No corpus of its own (`make pipeline PAIRS=s3://...` without TEXT): the captions of the
    // pairs stage in the bucket, its held-out rows left out.
    run(&[
        "text",
        "--input",
        "s3://data/run/pairs",
        "--out",
        "s3://data/run/captions",
        "--min-chars",
        "1",
    ]);
    let (captions_manifest, captions) = text_rows("s3://data/run/captions");
    let (_, pairs_now) = pairs_rows("s3://data/run/pairs");
    let mut expected: Vec<&str> = pairs_now
        .iter()
        .filter(|row| !manifests::shards::is_held_out(&row.sha256))
        .map(|row| row.caption.as_str())
        .collect();
    expected.sort_unstable();
    assert!(!expected.is_empty());
    let mut read: Vec<&str> = captions.iter().map(|row| row.text.as_str()).collect();
    read.sort_unstable();
    assert_eq!(read, expected);
    assert!(
        captions_manifest
            .inputs
            .iter()
            .any(|input| input.uri.starts_with("s3://data/run/pairs")),
        "{:?}",
        captions_manifest.inputs
    );
    // Containers are streamed from the bucket by ranged reads (tar front to back, parquet
    // footer first, then a row group's columns).
    let containers: Vec<(String, Vec<u8>)> = (0..12u8)
        .map(|i| (format!("c{i:03}"), png(40, 40, 100 + i)))
        .collect();
    Location::parse("s3://data/wds/00000.tar")
        .unwrap()
        .put(Bytes::from(webdataset_tar(&containers)))
        .unwrap();
    Location::parse("s3://data/i2d/00000.parquet")
        .unwrap()
        .put(Bytes::from(img2dataset_parquet(&containers, 5)))
        .unwrap();
    for (input, out) in [
        ("s3://data/wds/", "s3://data/run/wds"),
        ("s3://data/i2d/", "s3://data/run/i2d"),
    ] {
        run(&[
            "pairs",
            "--input",
            input,
            "--out",
            out,
            "--size",
            "32",
            "--shard-rows",
            "5",
        ]);
        let (manifest, rows) = pairs_rows(out);
        assert_eq!(rows.len(), 12, "{input}");
        assert_eq!(manifest.artifacts.len(), 3, "{input}");
        assert!(
            rows.iter()
                .all(|r| r.caption == format!("caption of {}", r.key))
        );
    }

    let manifest_text = Location::parse("s3://data/run/pairs/manifest.json")
        .unwrap()
        .get()
        .unwrap();
    assert!(!String::from_utf8_lossy(&manifest_text).contains(SECRET));
}
