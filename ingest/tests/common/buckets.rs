use std::process::Command;

use bytes::Bytes;
use manifests::Location;
use serde_json::json;

use super::*;

/// Runs `ingest pairs` and `ingest text` from and to `bucket` (`s3://data`, `az://data`): a
/// folder with a broken image, a rerun that is up to date, a prefix with and without its slash,
/// an object rewritten, text from a corpus and from the pairs' captions, and webdataset and
/// img2dataset containers streamed by ranged reads. `env` reaches the bucket; `secret`, the
/// credential in it, must appear in no output and no manifest.
pub fn pairs_and_text_through(bucket: &str, env: &[(String, String)], secret: &str) {
    let at = |path: &str| format!("{bucket}/{path}");
    let src = Location::parse(&at("src")).unwrap();
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
            !text.contains(secret),
            "credentials leaked into output: {text}"
        );
        text
    };
    let (src_uri, pairs_uri, slashed_uri) = (at("src"), at("run/pairs"), at("src/"));
    let pairs = [
        "pairs",
        "--input",
        &src_uri,
        "--out",
        &pairs_uri,
        "--size",
        "32",
        "--min-source-size",
        "8",
    ];
    run(&pairs);
    let (manifest, rows) = pairs_rows(&at("run/pairs"));
    assert_eq!(sorted_keys(&rows), ["0", "1", "2", "3", "4"]);
    assert_eq!(rejected(&manifest), json!({"not_an_image": 1}));
    assert!(manifest.inputs[0].uri.starts_with(&at("src")));
    let text = run(&pairs);
    assert!(text.contains("up to date"), "{text}");
    // The same prefix with a trailing slash is the same input; an object rewritten with other
    // bytes of the same length is not (its ETag changed).
    let mut slashed = pairs;
    slashed[2] = &slashed_uri;
    let text = run(&slashed);
    assert!(text.contains("up to date"), "{text}");
    src.join("3.txt")
        .put(Bytes::from_static(b"caption 9"))
        .unwrap();
    let text = run(&slashed);
    assert!(text.contains(&at("src/3.txt changed")), "{text}");

    let corpus = b"{\"text\": \"a document that lives in a bucket\"}\n{\"text\": \"and another one in the bucket\"}\n";
    Location::parse(&at("c4/part.jsonl"))
        .unwrap()
        .put(Bytes::from_static(corpus))
        .unwrap();
    run(&["text", "--input", &at("c4/"), "--out", &at("run/text")]);
    let (_, rows) = text_rows(&at("run/text"));
    assert_eq!(rows.len(), 2);
    // No corpus of its own (`make pipeline PAIRS=s3://...` without TEXT): the captions of the
    // pairs stage in the bucket, its held-out rows left out.
    run(&[
        "text",
        "--input",
        &at("run/pairs"),
        "--out",
        &at("run/captions"),
        "--min-chars",
        "1",
    ]);
    let (captions_manifest, captions) = text_rows(&at("run/captions"));
    let (_, pairs_now) = pairs_rows(&at("run/pairs"));
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
            .any(|input| input.uri.starts_with(&at("run/pairs"))),
        "{:?}",
        captions_manifest.inputs
    );
    // Containers are streamed from the bucket by ranged reads (tar front to back, parquet
    // footer first, then a row group's columns).
    let containers: Vec<(String, Vec<u8>)> = (0..12u8)
        .map(|i| (format!("c{i:03}"), png(40, 40, 100 + i)))
        .collect();
    Location::parse(&at("wds/00000.tar"))
        .unwrap()
        .put(Bytes::from(webdataset_tar(&containers)))
        .unwrap();
    // Incompressible pictures make the parquet file about 1 MB: its column chunks come by
    // ranged reads, and only its footer from the 64 KiB fetched at its end.
    let large: Vec<(String, Vec<u8>)> = (0..12u64)
        .map(|i| (format!("c{i:03}"), noise_png(160, i)))
        .collect();
    Location::parse(&at("i2d/00000.parquet"))
        .unwrap()
        .put(Bytes::from(img2dataset_parquet(&large, 5)))
        .unwrap();
    // `ingest pairs --input INPUT --out OUT --size 32` and `extra`.
    let pairs_of = |input: &str, out: &str, extra: &[&str]| {
        run(&[
            &["pairs", "--input", input, "--out", out, "--size", "32"],
            extra,
        ]
        .concat())
    };
    for (input, out) in [(at("wds/"), at("run/wds")), (at("i2d/"), at("run/i2d"))] {
        pairs_of(&input, &out, &["--shard-rows", "5"]);
        let (manifest, rows) = pairs_rows(&out);
        assert_eq!(rows.len(), 12, "{input}");
        assert_eq!(manifest.artifacts.len(), 3, "{input}");
        assert!(
            rows.iter()
                .all(|r| r.caption == format!("caption of {}", r.key))
        );
    }

    // Lists in the bucket, read by two jobs of a batch array: each counts the whole list and
    // builds its own share, a CSV streamed up to the end of its share and a parquet list
    // through the row groups of its share only.
    let list: String = std::iter::once("image,caption\n".to_string())
        .chain((0..5).map(|i| format!("src/{i}.png,listed {i}\n")))
        .collect();
    Location::parse(&at("list.csv"))
        .unwrap()
        .put(Bytes::from(list))
        .unwrap();
    Location::parse(&at("laion/part-0.parquet"))
        .unwrap()
        .put(Bytes::from(url_list_parquet(&["not a url"; 9], 4)))
        .unwrap();
    for (input, out, expected) in [
        (at("list.csv"), at("run/list"), [json!(2), json!(3)]),
        (at("laion/"), at("run/laion"), [json!(0), json!(0)]),
    ] {
        for index in 0..2 {
            let index_arg = index.to_string();
            let job = ["--num-shards", "2", "--shard-index", &index_arg];
            pairs_of(
                &input,
                &out,
                &[&["--min-source-size", "8"][..], &job].concat(),
            );
            let part = format!("{out}/manifest.part-{index:05}-of-00002.json");
            let (manifest, _) =
                manifests::Manifest::read(&Location::parse(&part).unwrap()).unwrap();
            assert_eq!(manifest.metrics["rows"], expected[index], "{part}");
            if input.ends_with("laion/") {
                let share = [4, 5][index];
                assert_eq!(rejected(&manifest), json!({ "bad_url": share }), "{part}");
            }
        }
    }

    // An image longer than the byte cap is refused from its size, its body not fetched.
    let big = Location::parse(&at("big")).unwrap();
    for (key, bytes) in [
        ("padded", padded_png(1, 64 * 64 * 8 + (1 << 20))),
        ("plain", png(40, 40, 2)),
    ] {
        big.join(&format!("{key}.png"))
            .put(Bytes::from(bytes))
            .unwrap();
        big.join(&format!("{key}.txt"))
            .put(Bytes::from(format!("caption of {key}")))
            .unwrap();
    }
    let (big_uri, capped_uri) = (at("big"), at("run/capped"));
    run(&[
        "pairs",
        "--input",
        &big_uri,
        "--out",
        &capped_uri,
        "--size",
        "32",
        "--max-source-pixels",
        "4096",
    ]);
    let (manifest, rows) = pairs_rows(&capped_uri);
    assert_eq!(sorted_keys(&rows), ["plain"]);
    assert_eq!(rejected(&manifest), json!({"too_large": 1}));

    let manifest_text = Location::parse(&at("run/pairs/manifest.json"))
        .unwrap()
        .get()
        .unwrap();
    assert!(!String::from_utf8_lossy(&manifest_text).contains(secret));
}
