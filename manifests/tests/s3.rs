//! Storage and stages against a real S3 API server (moto) on loopback.
//! One test per file: it sets the process environment that object_store reads.

use bytes::Bytes;
use manifests::{Location, Manifest, ShardSpec, StageRun, Tool, Upstream};
use serde_json::{Map, json};

const SECRET: &str = "parti-SECRET-do-not-print-4711";

#[test]
fn s3_put_get_list_and_stages_without_leaking_credentials() {
    let server = manifests::testing::start_moto().expect("moto S3 server");
    for (key, value) in server.env(SECRET) {
        // SAFETY: this file holds a single test, so no other thread reads the environment now.
        unsafe { std::env::set_var(key, value) };
    }
    server.create_bucket("parti-test").unwrap();

    let base = Location::parse("s3://parti-test/runs/a").unwrap();
    let big = Bytes::from(vec![7u8; 20 * 1024 * 1024]); // above the multipart threshold
    base.join("big.bin").put(big.clone()).unwrap();
    base.join("small.txt")
        .put(Bytes::from_static(b"hello"))
        .unwrap();
    assert_eq!(base.join("big.bin").get().unwrap(), big);
    assert_eq!(
        base.join("small.txt").get_range(1..4).unwrap().as_ref(),
        b"ell"
    );
    let listed: Vec<(String, u64)> = base
        .list()
        .unwrap()
        .into_iter()
        .map(|o| (o.location.uri(), o.size))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "s3://parti-test/runs/a/big.bin".to_string(),
                big.len() as u64
            ),
            ("s3://parti-test/runs/a/small.txt".to_string(), 5)
        ]
    );

    // A whole stage run on the bucket: artifacts, manifest, skip, verify.
    let tool = Tool {
        name: "test".into(),
        version: "0".into(),
    };
    let run = StageRun::new(
        "demo",
        tool.clone(),
        "s3://parti-test/runs/stage",
        &json!({"x": 1}),
        ShardSpec::single(),
    )
    .unwrap();
    assert!(run.begin(false).unwrap().is_none());
    let artifact = run
        .write_artifact(
            "shard-0.bin",
            "blob",
            Bytes::from_static(b"payload"),
            Some(1),
        )
        .unwrap();
    run.publish(vec![artifact], Map::new()).unwrap();
    let again = StageRun::new(
        "demo",
        tool,
        "s3://parti-test/runs/stage",
        &json!({"x": 1}),
        ShardSpec::single(),
    )
    .unwrap();
    assert!(
        again.begin(false).unwrap().is_some(),
        "unchanged stage on S3 skips"
    );
    let (upstream, _) = Upstream::read("s3://parti-test/runs/stage").unwrap();
    assert!(
        upstream
            .manifest
            .verify(&upstream.location, true)
            .is_empty()
    );

    let manifest_text = String::from_utf8(upstream.location.get().unwrap().to_vec()).unwrap();
    assert!(!manifest_text.contains(SECRET) && !manifest_text.contains("parti-test\""));
    let missing = Location::parse("s3://parti-test/nope")
        .unwrap()
        .get()
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("s3://parti-test/nope") && !missing.contains(SECRET),
        "{missing}"
    );
    let no_bucket = Location::parse("s3://no-such-bucket/x")
        .unwrap()
        .get()
        .unwrap_err()
        .to_string();
    assert!(!no_bucket.contains(SECRET), "{no_bucket}");
    assert_eq!(Manifest::read(&upstream.location).unwrap().0.stage, "demo");
}
