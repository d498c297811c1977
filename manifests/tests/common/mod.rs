//! What every bucket provider must do for the stages, run against each provider's real API
//! server on loopback by its own test file (one test per file: each sets the process
//! environment that object_store reads).

use bytes::Bytes;
use manifests::{Location, Manifest, ShardSpec, StageRun, Tool, Upstream};
use serde_json::{Map, json};

/// Puts (one above the multipart threshold), gets, ranged gets and lists in bucket `name` of
/// `scheme`, runs a stage there (artifacts, manifest, skip, verify), and checks that `secret`
/// (the credential the environment holds) appears in no manifest and no error.
pub fn storage_and_stages(scheme: &str, name: &str, secret: &str) {
    let bucket = format!("{scheme}://{name}");
    let stage_uri = format!("{bucket}/runs/stage");
    let base = Location::parse(&format!("{bucket}/runs/a")).unwrap();
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
            (format!("{bucket}/runs/a/big.bin"), big.len() as u64),
            (format!("{bucket}/runs/a/small.txt"), 5)
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
        &stage_uri,
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
        &stage_uri,
        &json!({"x": 1}),
        ShardSpec::single(),
    )
    .unwrap();
    assert!(
        again.begin(false).unwrap().is_some(),
        "an unchanged stage on {scheme} skips"
    );
    let (upstream, _) = Upstream::read(&stage_uri).unwrap();
    assert!(
        upstream
            .manifest
            .verify(&upstream.location, true)
            .is_empty()
    );

    let manifest_text = String::from_utf8(upstream.location.get().unwrap().to_vec()).unwrap();
    assert!(!manifest_text.contains(secret) && !manifest_text.contains(&format!("{name}\"")));
    let missing = Location::parse(&format!("{bucket}/nope"))
        .unwrap()
        .get()
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains(&format!("{bucket}/nope")) && !missing.contains(secret),
        "{missing}"
    );
    let no_bucket = Location::parse(&format!("{scheme}://no-such-bucket/x"))
        .unwrap()
        .get()
        .unwrap_err()
        .to_string();
    assert!(!no_bucket.contains(secret), "{no_bucket}");
    assert_eq!(Manifest::read(&upstream.location).unwrap().0.stage, "demo");
}
