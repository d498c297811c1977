use bytes::Bytes;
use manifests::lineage::lineage;
use manifests::merge::merge;
use manifests::{Freshness, Location, Manifest, ShardSpec, StageRun, Tool, Upstream};
use serde_json::{Map, Value, json};

fn tool() -> Tool {
    Tool {
        name: "test".into(),
        version: "0.0.1".into(),
    }
}

fn metrics(rows: u64, rejected: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("rows".into(), json!(rows));
    m.insert("rejected".into(), rejected);
    m
}

/// Runs a one-artifact stage the way every stage binary does.
fn run_stage(out: &str, config: &Value, payload: &'static [u8], force: bool) -> (bool, Manifest) {
    let run = StageRun::new("demo", tool(), out, config, ShardSpec::single()).unwrap();
    if let Some(existing) = run.begin(force).unwrap() {
        return (false, existing);
    }
    let artifact = run
        .write_artifact(
            "data/part-0.bin",
            "blob",
            Bytes::from_static(payload),
            Some(3),
        )
        .unwrap();
    (
        true,
        run.publish(vec![artifact], metrics(3, json!({}))).unwrap(),
    )
}

#[test]
fn manifest_round_trips_through_storage() {
    let (ran, manifest) = run_stage(
        "memory://roundtrip/run",
        &json!({"b": 1, "a": [1, 2]}),
        b"abc",
        false,
    );
    assert!(ran);
    let location = Location::parse("memory://roundtrip/run/manifest.json").unwrap();
    let (read, digest) = Manifest::read(&location).unwrap();
    assert_eq!(read, manifest);
    assert_eq!(digest, manifests::digest_bytes(&location.get().unwrap()));
    assert_eq!(read.schema, "parti.manifest/v2");
    assert_eq!(read.artifacts[0].rows, Some(3));
    assert_eq!(read.metrics["rejected"], json!({}));
    // The hash is of the canonical config: key order does not matter.
    assert_eq!(
        manifests::manifest::config_hash(&json!({"a": [1, 2], "b": 1})),
        read.config_hash
    );
}

#[test]
fn unchanged_stage_skips_and_force_reruns() {
    let out = "memory://skip/run";
    let config = json!({"size": 64});
    assert!(run_stage(out, &config, b"abc", false).0, "first run works");
    let (ran, _) = run_stage(out, &config, b"abc", false);
    assert!(!ran, "second run with same config and inputs skips");
    assert!(run_stage(out, &config, b"abc", true).0, "--force reruns");
    assert!(
        run_stage(out, &json!({"size": 65}), b"abc", false).0,
        "changed config reruns"
    );

    // A modified artifact makes the stage stale: it never trusts a digest mismatch.
    Location::parse(out)
        .unwrap()
        .join("data/part-0.bin")
        .put(Bytes::from_static(b"abd"))
        .unwrap();
    let run = StageRun::new(
        "demo",
        tool(),
        out,
        &json!({"size": 65}),
        ShardSpec::single(),
    )
    .unwrap();
    match run.freshness().unwrap() {
        Freshness::Stale(reason) => assert!(reason.contains("artifact changed"), "{reason}"),
        Freshness::UpToDate(_) => panic!("a tampered artifact must not be up to date"),
    }
}

#[test]
fn changed_upstream_makes_downstream_stale() {
    run_stage("memory://chain/up", &json!({"v": 1}), b"abc", false);
    let down = |expect_run: bool| {
        let mut run = StageRun::new(
            "down",
            tool(),
            "memory://chain/down",
            &json!({}),
            ShardSpec::single(),
        )
        .unwrap();
        run.upstream("up", "memory://chain/up").unwrap();
        let skipped = run.begin(false).unwrap().is_some();
        assert_eq!(!skipped, expect_run);
        if !skipped {
            run.publish(vec![], metrics(0, json!({}))).unwrap();
        }
    };
    down(true);
    down(false);
    run_stage("memory://chain/up", &json!({"v": 2}), b"xyz", false);
    down(true);
}

#[test]
fn crash_between_artifacts_and_manifest_leaves_no_manifest_and_resumes() {
    let out = "memory://crash/run";
    run_stage(out, &json!({"v": 1}), b"old", false);
    let manifest = Location::parse(out).unwrap().join("manifest.json");
    assert!(manifest.exists().unwrap());

    // A new config starts; the process dies after writing one artifact.
    {
        let run =
            StageRun::new("demo", tool(), out, &json!({"v": 2}), ShardSpec::single()).unwrap();
        assert!(run.begin(false).unwrap().is_none());
        run.write_artifact(
            "data/part-0.bin",
            "blob",
            Bytes::from_static(b"new"),
            Some(1),
        )
        .unwrap();
        // no publish: simulated crash
    }
    assert!(
        !manifest.exists().unwrap(),
        "no manifest may point at half-rewritten artifacts"
    );

    // The rerun keeps the finished artifact (digest-checked) and publishes.
    let run = StageRun::new("demo", tool(), out, &json!({"v": 2}), ShardSpec::single()).unwrap();
    assert!(run.begin(false).unwrap().is_none());
    let kept = run
        .finished_artifact("data/part-0.bin")
        .unwrap()
        .expect("finished artifact is kept");
    assert_eq!(kept.rows, Some(1));
    assert!(run.finished_artifact("data/part-1.bin").unwrap().is_none());
    // A finished artifact that was corrupted afterwards is redone.
    Location::parse(out)
        .unwrap()
        .join("data/part-0.bin")
        .put(Bytes::from_static(b"bad"))
        .unwrap();
    assert!(run.finished_artifact("data/part-0.bin").unwrap().is_none());
    // A different config never reuses another run's records.
    let other = StageRun::new("demo", tool(), out, &json!({"v": 3}), ShardSpec::single()).unwrap();
    assert!(
        other
            .finished_artifact("data/part-0.bin")
            .unwrap()
            .is_none()
    );
}

fn partial(
    out: &str,
    index: u32,
    count: u32,
    config: &Value,
    rows: u64,
    rejected: Value,
) -> (Location, Manifest) {
    let run = StageRun::new("demo", tool(), out, config, ShardSpec { index, count }).unwrap();
    let name = format!("data/job{index}.bin");
    let artifact = run
        .write_artifact(&name, "blob", Bytes::from(vec![index as u8; 4]), Some(rows))
        .unwrap();
    let manifest = run
        .publish(vec![artifact], metrics(rows, rejected))
        .unwrap();
    (run.manifest_location(), manifest)
}

#[test]
fn partial_manifests_merge_into_one() {
    let out = "memory://merge/run";
    let config = json!({"k": 1});
    let parts = vec![
        partial(out, 1, 3, &config, 5, json!({"duplicate": 1})),
        partial(
            out,
            0,
            3,
            &config,
            7,
            json!({"decode_error": 2, "duplicate": 1}),
        ),
        partial(out, 2, 3, &config, 1, json!({})),
    ];
    assert_eq!(parts[0].0.file_name(), "manifest.part-00001-of-00003.json");
    let target = Location::parse(out).unwrap().join("manifest.json");
    let merged = merge(&target, &parts).unwrap();
    assert_eq!(merged.shard, None);
    assert_eq!(merged.metrics["rows"], json!(13));
    assert_eq!(
        merged.metrics["rejected"],
        json!({"decode_error": 2, "duplicate": 2})
    );
    let uris: Vec<&str> = merged.artifacts.iter().map(|a| a.uri.as_str()).collect();
    assert_eq!(uris, ["data/job0.bin", "data/job1.bin", "data/job2.bin"]);
    merged.write(&target).unwrap();
    assert!(merged.verify(&target, true).is_empty());

    let missing = merge(&target, &parts[..2]).unwrap_err().to_string();
    assert!(
        missing.contains("[2]") && missing.contains("missing"),
        "{missing}"
    );
    let twice = merge(
        &target,
        &[parts[0].clone(), parts[0].clone(), parts[2].clone()],
    )
    .unwrap_err();
    assert!(twice.to_string().contains("twice"), "{twice}");
    let other = partial("memory://merge/other", 2, 3, &json!({"k": 2}), 1, json!({}));
    let mixed = merge(&target, &[parts[0].clone(), parts[1].clone(), other]).unwrap_err();
    assert!(mixed.to_string().contains("different config"), "{mixed}");
}

/// How a job records a list and the local files its rows name, as `ingest pairs` does.
#[derive(Clone, Copy)]
enum Layout {
    /// A raw list: one input, the list file and the files named.
    OneInput,
    /// A list that is an upstream stage's artifact: the list's input, and the files named as
    /// an input of their own, left out when the job's rows name none.
    NamedApart,
}

/// The run of job `index` of `count` over `list`, its inputs recorded, naming `images` (its
/// share of the list's local files).
fn job_run(
    out: &str,
    [index, count]: [u32; 2],
    list: &std::path::Path,
    images: &[&str],
    layout: Layout,
) -> StageRun {
    let mut run =
        StageRun::new("demo", tool(), out, &json!({}), ShardSpec { index, count }).unwrap();
    let list = Location::parse(list.to_str().unwrap()).unwrap();
    let mut set = manifests::sources::SourceSet::new(None);
    set.list(&list).unwrap();
    if let Layout::NamedApart = layout {
        run.record_source(set.into_input("source", &list.uri()).unwrap());
        if images.is_empty() {
            return run;
        }
        set = manifests::sources::SourceSet::new(None);
    }
    for image in images {
        set.name(image.to_string(), &list.parent().join(image))
            .unwrap();
    }
    let name = match layout {
        Layout::OneInput => "source",
        Layout::NamedApart => "images",
    };
    run.record_source(set.into_input(name, &list.uri()).unwrap());
    run
}

/// Job `index` of `count` run to its end by [`job_run`]: its part manifest.
fn job_naming(
    out: &str,
    index: u32,
    count: u32,
    list: &std::path::Path,
    images: &[&str],
) -> (Location, Manifest) {
    publish_job(job_run(out, [index, count], list, images, Layout::OneInput))
}

fn publish_job(run: StageRun) -> (Location, Manifest) {
    let index = run.shard().index;
    let artifact = run
        .write_artifact(
            &format!("data/job{index}.bin"),
            "blob",
            Bytes::from(vec![index as u8]),
            Some(1),
        )
        .unwrap();
    let manifest = run.publish(vec![artifact], metrics(1, json!({}))).unwrap();
    (run.manifest_location(), manifest)
}

/// `(name, digest)` of each input and its files: what merging must keep (a file's recorded
/// time depends on when it was first looked at).
fn identities(inputs: &[manifests::Input]) -> Vec<String> {
    let mut lines = Vec::new();
    for input in inputs {
        lines.push(format!("{} {}", input.name, input.digest));
        for file in &input.files {
            lines.push(format!("  {} {} {}", file.name, file.named, file.digest));
        }
    }
    lines
}

/// `a.png` to `d.png` in a new folder and `list.csv` naming them, then `more_rows`.
fn four_images_and_their_list(more_rows: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.csv");
    std::fs::write(
        &list,
        format!("image\na.png\nb.png\nc.png\nd.png\n{more_rows}"),
    )
    .unwrap();
    for (name, bytes) in [
        ("a.png", "1"),
        ("b.png", "2"),
        ("c.png", "3"),
        ("d.png", "4"),
    ] {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    (dir, list)
}

#[test]
fn the_files_a_list_names_merge_into_what_one_job_records() {
    let (dir, list) = four_images_and_their_list("gone.png\n");
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (_, single) = job_naming(
        &out("single"),
        0,
        1,
        &list,
        &["a.png", "b.png", "c.png", "d.png", "gone.png"],
    );
    // Jobs name their own rows' images; a job of rows holding no local image names none.
    let shares: [&[&str]; 4] = [&["a.png", "b.png"], &["gone.png", "c.png"], &[], &["d.png"]];
    let parts: Vec<(Location, Manifest)> = shares
        .iter()
        .enumerate()
        .map(|(index, images)| job_naming(&out("array"), index as u32, 4, &list, images))
        .collect();
    assert_ne!(parts[0].1.inputs[0].digest, single.inputs[0].digest);
    let target = Location::parse(&out("array"))
        .unwrap()
        .join("manifest.json");
    let merged = merge(&target, &parts).unwrap();
    assert_eq!(
        identities(&merged.inputs),
        identities(&single.inputs),
        "the run's input is the one a single job records: the same files and identity"
    );

    // An image two jobs saw with different contents changed while the array ran.
    std::fs::write(dir.path().join("a.png"), "changed").unwrap();
    let late = job_naming(&out("late"), 2, 4, &list, &["a.png"]);
    let conflicting = [parts[0].clone(), parts[1].clone(), late, parts[3].clone()];
    let err = merge(&target, &conflicting).unwrap_err().to_string();
    assert!(
        err.contains("a.png") && err.contains("changed between those jobs' runs"),
        "{err}"
    );
    // Another list is another input, whatever images the jobs name.
    std::fs::write(&list, "image\na.png\n").unwrap();
    let other_list = job_naming(&out("other"), 2, 4, &list, &[]);
    let mixed = [
        parts[0].clone(),
        parts[1].clone(),
        other_list,
        parts[3].clone(),
    ];
    let err = merge(&target, &mixed).unwrap_err().to_string();
    assert!(err.contains("different set of inputs"), "{err}");
}

#[test]
fn a_job_whose_rows_name_no_file_of_an_upstream_list_still_merges() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.csv");
    std::fs::write(&list, "image\na.png\nhttps://example.com/b.png\n").unwrap();
    std::fs::write(dir.path().join("a.png"), "1").unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let single = job_run(
        &out("single"),
        [0, 1],
        &list,
        &["a.png"],
        Layout::NamedApart,
    );
    let (_, single) = publish_job(single);
    let parts: Vec<(Location, Manifest)> = [&["a.png"][..], &[]]
        .iter()
        .enumerate()
        .map(|(index, images)| {
            let run = job_run(
                &out("array"),
                [index as u32, 2],
                &list,
                images,
                Layout::NamedApart,
            );
            publish_job(run)
        })
        .collect();
    assert_eq!(
        parts[1].1.inputs.len(),
        1,
        "job 1's rows name no local file"
    );
    let target = Location::parse(&out("array"))
        .unwrap()
        .join("manifest.json");
    for order in [[0, 1], [1, 0]] {
        let parts = [parts[order[0]].clone(), parts[order[1]].clone()];
        let merged = merge(&target, &parts).unwrap();
        assert_eq!(identities(&merged.inputs), identities(&single.inputs));
    }
    // Only an input of named files alone may be missing from a job: not one of another name.
    let mut odd = job_run(&out("odd"), [1, 2], &list, &[], Layout::NamedApart);
    let mut extra = manifests::sources::SourceSet::new(None);
    extra
        .list(&Location::parse(list.to_str().unwrap()).unwrap())
        .unwrap();
    odd.record_source(extra.into_input("extra", "list.csv").unwrap());
    let err = merge(&target, &[parts[0].clone(), publish_job(odd)]).unwrap_err();
    assert!(
        err.to_string().contains("'extra' is not in every job"),
        "{err}"
    );
}

/// A job's part written when every job named every file of the list (before 2026-12-06) is up
/// to date for the job that names its own rows' files only, unless one of those changed; it is
/// rewritten naming those, so that a file of another job's rows changed since does not keep
/// the jobs from merging.
#[test]
fn a_job_that_named_every_file_of_the_list_is_up_to_date_and_rewritten() {
    let (dir, list) = four_images_and_their_list("");
    let out = dir.path().join("array");
    let out = out.to_str().unwrap();
    let every = ["a.png", "b.png", "c.png", "d.png"];
    let shares = [["a.png", "b.png"], ["c.png", "d.png"]];
    for index in 0..2 {
        publish_job(job_run(out, [index, 2], &list, &every, Layout::OneInput));
    }
    // An image of job 1's rows changes: job 0 is up to date, job 1 is not.
    std::fs::write(dir.path().join("d.png"), "changed").unwrap();
    let job0 = job_run(out, [0, 2], &list, &shares[0], Layout::OneInput);
    let kept = job0.begin(false).unwrap().expect("job 0 is up to date");
    let named = |inputs: &[manifests::Input]| -> Vec<String> {
        let files = inputs[0].files.iter().filter(|f| f.named);
        files.map(|f| f.name.clone()).collect()
    };
    assert_eq!(named(&kept.inputs), shares[0]);
    let (on_disk, _) = Manifest::read(&job0.manifest_location()).unwrap();
    assert_eq!(identities(&on_disk.inputs), identities(&kept.inputs));
    assert_eq!(on_disk.artifacts, kept.artifacts);
    assert!(job0.begin(false).unwrap().is_some(), "and stays up to date");

    let job1 = job_run(out, [1, 2], &list, &shares[1], Layout::OneInput);
    assert!(job1.begin(false).unwrap().is_none(), "d.png changed");
    let rerun = publish_job(job1);
    let target = Location::parse(out).unwrap().join("manifest.json");
    let merged = merge(&target, &[(job0.manifest_location(), on_disk), rerun]);
    let (_, single) = publish_job(job_run(
        dir.path().join("single").to_str().unwrap(),
        [0, 1],
        &list,
        &every,
        Layout::OneInput,
    ));
    assert_eq!(
        identities(&merged.unwrap().inputs),
        identities(&single.inputs)
    );

    // An image of its own rows changed since: the old part is stale as it always was.
    std::fs::write(dir.path().join("a.png"), "changed too").unwrap();
    let job0 = job_run(out, [0, 2], &list, &shares[0], Layout::OneInput);
    assert!(job0.begin(false).unwrap().is_none());

    // A list that is an upstream stage's artifact: a part's input of named files alone, where
    // the job's rows name none now, is up to date too, and rewritten without it.
    let apart = dir.path().join("apart");
    let apart = apart.to_str().unwrap();
    publish_job(job_run(apart, [1, 2], &list, &every, Layout::NamedApart));
    let job1 = job_run(apart, [1, 2], &list, &[], Layout::NamedApart);
    let kept = job1.begin(false).unwrap().expect("job 1 is up to date");
    assert_eq!(kept.inputs.len(), 1);
    assert_eq!(
        Manifest::read(&job1.manifest_location())
            .unwrap()
            .0
            .inputs
            .len(),
        1
    );
}

/// Jobs of a batch array over a folder each identify by content the files they read, the others
/// by name: merged, the run's input is the one a single job records; a file no job read, or two
/// contents of one file, is refused; a job's part from before, which read every file, is up to
/// date and rewritten.
#[test]
fn the_files_of_a_folder_each_job_reads_merge_into_what_one_job_records() {
    let (dir, _) = four_images_and_their_list("");
    let outs = tempfile::tempdir().unwrap();
    let folder = Location::parse(dir.path().to_str().unwrap()).unwrap();
    let out = |name: &str| outs.path().join(name).to_str().unwrap().to_string();
    let job_run = |out: &str, [index, count]: [u32; 2], reads: &[&str]| {
        let shard = ShardSpec { index, count };
        let mut run = StageRun::new("demo", tool(), out, &json!({}), shard).unwrap();
        let mut set = manifests::sources::SourceSet::new(None);
        let reads = |uri: &str| reads.iter().any(|name| uri.ends_with(&format!("/{name}")));
        set.list_reading(&folder, &reads).unwrap();
        run.record_source(set.into_input("source", &folder.uri()).unwrap());
        run
    };
    let every = ["list.csv", "a.png", "b.png", "c.png", "d.png"];
    let (_, single) = publish_job(job_run(&out("single"), [0, 1], &every));
    let shares: [&[&str]; 3] = [&["list.csv", "a.png"], &["b.png", "c.png"], &["d.png"]];
    let parts: Vec<(Location, Manifest)> = (0..3)
        .map(|index| publish_job(job_run(&out("array"), [index, 3], shares[index as usize])))
        .collect();
    let unread = |manifest: &Manifest| {
        let files = manifest.inputs[0].files.iter();
        files
            .filter(|file| file.digest == manifests::sources::UNREAD)
            .count()
    };
    assert_eq!(unread(&parts[1].1), 3);
    let target = Location::parse(&out("array"))
        .unwrap()
        .join("manifest.json");
    let merged = merge(&target, &parts).unwrap();
    assert_eq!(identities(&merged.inputs), identities(&single.inputs));

    let nobody_reads_d = job_run(&out("no-d"), [2, 3], &[]);
    let err = merge(
        &target,
        &[
            parts[0].clone(),
            parts[1].clone(),
            publish_job(nobody_reads_d),
        ],
    );
    let err = err.unwrap_err().to_string();
    assert!(err.contains("d.png, which no job read"), "{err}");
    std::fs::write(dir.path().join("b.png"), "changed").unwrap();
    let late = publish_job(job_run(&out("late"), [2, 3], &["b.png", "d.png"]));
    let err = merge(&target, &[parts[0].clone(), parts[1].clone(), late]).unwrap_err();
    assert!(err.to_string().contains("b.png, which"), "{err}");

    // A part that read every file: up to date for the job that reads its own, and rewritten.
    publish_job(job_run(&out("before"), [2, 3], &every));
    let now = job_run(&out("before"), [2, 3], shares[2]);
    let kept = now.begin(false).unwrap().expect("up to date");
    assert_eq!(unread(&kept), 4);
    let (on_disk, _) = Manifest::read(&now.manifest_location()).unwrap();
    assert_eq!(identities(&on_disk.inputs), identities(&kept.inputs));
    // A part that did not read a file the job reads now cannot vouch for it.
    publish_job(job_run(&out("fewer"), [2, 3], &[]));
    assert!(
        job_run(&out("fewer"), [2, 3], shares[2])
            .begin(false)
            .unwrap()
            .is_none()
    );
}

/// Metrics that describe the jobs' artifacts (a token grid's side) are kept, not summed, and
/// jobs that disagree on them do not merge.
#[test]
fn descriptive_metrics_are_kept_and_must_agree() {
    let out = "memory://merge/grid";
    let job = |index: u32, grid: u64| {
        let run = StageRun::new(
            "demo",
            tool(),
            out,
            &json!({}),
            ShardSpec { index, count: 2 },
        )
        .unwrap();
        let mut metrics = metrics(3, json!({}));
        metrics.insert("grid".into(), json!(grid));
        let manifest = run.publish(vec![], metrics).unwrap();
        (run.manifest_location(), manifest)
    };
    let target = Location::parse(out).unwrap().join("manifest.json");
    let merged = merge(&target, &[job(0, 8), job(1, 8)]).unwrap();
    assert_eq!(
        (
            merged.metrics["grid"].clone(),
            merged.metrics["rows"].clone()
        ),
        (json!(8), json!(6))
    );
    let err = merge(&target, &[job(0, 8), job(1, 16)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metric grid is 8") && err.contains("16"),
        "{err}"
    );
}

#[test]
fn reading_a_tampered_input_artifact_names_the_file() {
    run_stage("memory://tamper/run", &json!({}), b"abc", false);
    let (upstream, _) = Upstream::read("memory://tamper/run").unwrap();
    let artifact = &upstream.manifest.artifacts[0];
    assert_eq!(upstream.read_artifact(artifact).unwrap().as_ref(), b"abc");
    Location::parse("memory://tamper/run/data/part-0.bin")
        .unwrap()
        .put(Bytes::from_static(b"abx"))
        .unwrap();
    let err = upstream.read_artifact(artifact).unwrap_err().to_string();
    assert!(
        err.contains("memory://tamper/run/data/part-0.bin") && err.contains("digest"),
        "{err}"
    );
}

fn manifests_bin(args: &[&str]) -> (i32, String) {
    manifests::testing::output_of(env!("CARGO_BIN_EXE_manifests"), args)
}

#[test]
fn verify_command_exits_1_and_names_a_corrupt_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    run_stage(out, &json!({}), b"abc", false);
    let (code, text) = manifests_bin(&["verify", out]);
    assert_eq!(code, 0, "{text}");
    // Same size, different content: only the digest can tell.
    let file = dir.path().join("run/data/part-0.bin");
    std::fs::write(&file, b"abd").unwrap();
    let (code, text) = manifests_bin(&["verify", out]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(file.to_str().unwrap()) && text.contains("digest"),
        "{text}"
    );
    let (code, _) = manifests_bin(&["verify", "--sizes-only", out]);
    assert_eq!(code, 0, "a size-only check cannot see a same-size change");
    std::fs::write(&file, b"abcd").unwrap();
    let (code, text) = manifests_bin(&["verify", "--sizes-only", out]);
    assert_eq!(code, 1, "{text}");
}

#[test]
fn merge_and_lineage_commands_work_on_local_folders() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    let up = up.to_str().unwrap();
    let config = json!({"k": 1});
    partial(up, 0, 2, &config, 2, json!({}));
    partial(up, 1, 2, &config, 3, json!({"too_small": 1}));
    let (code, text) = manifests_bin(&["merge", up, up]);
    assert_eq!(code, 0, "{text}");
    let (merged, _) = Upstream::read(up).unwrap();
    assert_eq!(merged.manifest.metric_u64("rows"), Some(5));

    let down = dir.path().join("down");
    let mut run = StageRun::new(
        "down",
        tool(),
        down.to_str().unwrap(),
        &json!({}),
        ShardSpec::single(),
    )
    .unwrap();
    run.upstream("pairs", up).unwrap();
    run.publish(vec![], Map::new()).unwrap();
    let entries = lineage(down.to_str().unwrap()).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].stage.as_deref(), Some("demo"));
    assert_eq!(entries[1].status, "ok");
    let (code, text) = manifests_bin(&["lineage", down.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("pairs [demo]"), "{text}");

    // Rewriting the upstream manifest with the same artifacts keeps the link (early cutoff);
    // an upstream rerun with other settings breaks it.
    let (code, _) = manifests_bin(&["merge", up, up]);
    assert_eq!(code, 0);
    let (code, text) = manifests_bin(&["lineage", down.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let other = json!({"other": true});
    partial(up, 0, 2, &other, 2, json!({}));
    partial(up, 1, 2, &other, 3, json!({}));
    let (code, _) = manifests_bin(&["merge", up, up]);
    assert_eq!(code, 0);
    let (code, text) = manifests_bin(&["lineage", down.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("changed"), "{text}");
}

/// A checkpoint file that is gone or altered is a damaged checkpoint (the run starts afresh); a
/// file the storage fails to read is an error, so a passing failure neither restarts a run from
/// step 0 nor lets its next save delete the checkpoint it could not read.
#[test]
fn a_checkpoint_the_storage_fails_to_read_is_an_error_not_a_fresh_start() {
    fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()? {
            let path = entry.ok()?.path();
            if path.file_name().is_some_and(|n| n == name) {
                return Some(path);
            }
            if path.is_dir()
                && let Some(found) = find(&path, name)
            {
                return Some(found);
            }
        }
        None
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = StageRun::new(
        "demo",
        tool(),
        out.to_str().unwrap(),
        &json!({"steps": 10}),
        ShardSpec::single(),
    )
    .unwrap();
    let model = Bytes::from_static(b"model weights");
    run.save_checkpoint(4, vec![("model.bpk", model.clone())])
        .unwrap();
    let loaded = run.load_checkpoint().unwrap().unwrap();
    assert_eq!((loaded.step, &loaded.files[0].1), (4, &model));

    let file = find(&out, "model.bpk").unwrap();
    std::fs::remove_file(&file).unwrap();
    // A link to itself: opening it fails with ELOOP, for root too.
    std::os::unix::fs::symlink(&file, &file).unwrap();
    let failed = run.load_checkpoint();
    assert!(failed.is_err(), "{:?}", failed.map(|c| c.map(|c| c.step)));

    std::fs::remove_file(&file).unwrap();
    assert!(run.load_checkpoint().unwrap().is_none(), "a missing file");
    std::fs::write(&file, b"other weights").unwrap();
    assert!(run.load_checkpoint().unwrap().is_none(), "an altered file");
}

/// A job of an array that runs again (its config changed) withdraws the merged manifest of the
/// earlier run with its own part: the merged one lists the artifacts the job is rewriting.
#[test]
fn a_job_that_runs_again_withdraws_the_merged_manifest() {
    let out = "memory://rerun-job/run";
    let config = json!({"k": 1});
    let parts: Vec<_> = (0..2)
        .map(|index| partial(out, index, 2, &config, 3, json!({})))
        .collect();
    let target = Location::parse(out).unwrap().join("manifest.json");
    merge(&target, &parts).unwrap().write(&target).unwrap();
    assert!(target.exists().unwrap());

    // The same config: up to date, nothing withdrawn.
    let same = StageRun::new(
        "demo",
        tool(),
        out,
        &config,
        ShardSpec { index: 1, count: 2 },
    )
    .unwrap();
    assert!(same.begin(false).unwrap().is_some());
    assert!(target.exists().unwrap());

    let changed = json!({"k": 2});
    let rerun = StageRun::new(
        "demo",
        tool(),
        out,
        &changed,
        ShardSpec { index: 1, count: 2 },
    )
    .unwrap();
    assert!(rerun.begin(false).unwrap().is_none());
    assert!(
        !target.exists().unwrap(),
        "the merged manifest outlived the rerun"
    );
    assert!(!rerun.manifest_location().exists().unwrap());
}

/// `checkpoint_every` says only when a training run saves its progress: changing it keeps a
/// finished stage up to date and lets a killed run resume, and manifests and checkpoints written
/// while it was part of the config hash still count as the run's.
#[test]
fn the_checkpoint_interval_is_not_part_of_a_runs_identity() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let config = |steps: usize, every: usize| json!({"steps": steps, "checkpoint_every": every});
    let new_run = |config: &Value| {
        StageRun::new("demo", tool(), out, config, ShardSpec::single())
            .unwrap()
            .with_checkpoint_fields(&["/checkpoint_every"])
            .unwrap()
    };
    // As a run did before the field was left out of the hash.
    let earlier_run =
        |config: &Value| StageRun::new("demo", tool(), out, config, ShardSpec::single()).unwrap();
    let is_fresh = |run: &StageRun| matches!(run.freshness().unwrap(), Freshness::UpToDate(_));
    let model = Bytes::from_static(b"model weights at step 4");

    assert_eq!(
        new_run(&config(10, 2)).config_hash(),
        new_run(&config(10, 3)).config_hash()
    );
    assert_ne!(
        new_run(&config(10, 2)).config_hash(),
        new_run(&config(11, 2)).config_hash()
    );
    assert_ne!(
        earlier_run(&config(10, 2)).config_hash(),
        earlier_run(&config(10, 3)).config_hash()
    );

    // A run killed after a checkpoint resumes under another interval.
    new_run(&config(10, 2))
        .save_checkpoint(4, vec![("model.bpk", model.clone())])
        .unwrap();
    let resumed = new_run(&config(10, 3)).load_checkpoint().unwrap().unwrap();
    assert_eq!((resumed.step, &resumed.files[0].1), (4, &model));
    assert!(new_run(&config(11, 3)).load_checkpoint().unwrap().is_none());
    std::fs::remove_dir_all(std::path::Path::new(out).join("_work")).unwrap();

    // A run killed while the interval was hashed resumes from its checkpoint, once.
    earlier_run(&config(10, 2))
        .save_checkpoint(4, vec![("model.bpk", model.clone())])
        .unwrap();
    let upgraded = new_run(&config(10, 2));
    let resumed = upgraded.load_checkpoint().unwrap().unwrap();
    assert_eq!((resumed.step, &resumed.files[0].1), (4, &model));
    let artifact = upgraded
        .write_artifact("weights.bin", "blob", Bytes::from_static(b"w"), None)
        .unwrap();
    upgraded
        .publish(vec![artifact], metrics(1, json!({})))
        .unwrap();
    assert!(
        !std::path::Path::new(out).join("_work").exists(),
        "publishing removes both work folders"
    );
    assert!(new_run(&config(10, 2)).load_checkpoint().unwrap().is_none());
    assert!(is_fresh(&new_run(&config(10, 7))));
    assert!(!is_fresh(&new_run(&config(12, 2))));

    // A manifest published while the interval was hashed stays up to date after the upgrade,
    // with its interval or another; a changed config is still a changed config.
    let earlier = earlier_run(&config(10, 2));
    let artifact = earlier
        .write_artifact("weights.bin", "blob", Bytes::from_static(b"w"), None)
        .unwrap();
    let published = earlier
        .publish(vec![artifact], metrics(1, json!({})))
        .unwrap();
    assert_eq!(published.config_hash, earlier.config_hash());
    assert!(is_fresh(&new_run(&config(10, 2))));
    assert!(is_fresh(&new_run(&config(10, 5))));
    assert!(!is_fresh(&new_run(&config(11, 2))));
    // Only a manifest whose hash is its recorded config's is judged by the earlier rule.
    let manifest_path = std::path::Path::new(out).join("manifest.json");
    let mut edited: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    edited["config"]["steps"] = json!(11);
    std::fs::write(&manifest_path, edited.to_string()).unwrap();
    assert!(!is_fresh(&new_run(&config(11, 2))));
    assert!(!is_fresh(&new_run(&config(10, 2))));

    let misnamed = StageRun::new("demo", tool(), out, &config(10, 2), ShardSpec::single())
        .unwrap()
        .with_checkpoint_fields(&["/train/checkpoint_every"]);
    let error = misnamed.err().unwrap().to_string();
    assert!(error.contains("/train/checkpoint_every"), "{error}");
}

/// A run that finds no checkpoint of its own lists the checkpoints other runs left in its
/// output folder (killed runs of another config or other inputs), each with what differs.
#[test]
fn a_run_names_the_checkpoints_of_other_runs_and_how_they_differ() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let run = |config: &Value, weights: &[u8]| {
        let mut run = StageRun::new("demo", tool(), out, config, ShardSpec::single())
            .unwrap()
            .with_checkpoint_fields(&["/checkpoint_every"])
            .unwrap();
        let weights_file = dir.path().join("weights.bin");
        std::fs::write(&weights_file, weights).unwrap();
        run.source_bytes("weights", weights_file.to_str().unwrap(), weights)
            .unwrap();
        run
    };
    // `beta` as an f32 field is recorded: its exact f64 value.
    let config = |rate: f64, every: usize| {
        let optimizer = json!({"learning_rate": rate, "beta": 0.9f32 as f64});
        json!({"optimizer": optimizer, "checkpoint_every": every})
    };
    let checkpoint = Bytes::from_static(b"state");

    let first = run(&config(1e-3, 2), b"w1");
    first
        .save_checkpoint(6, vec![("model.bpk", checkpoint.clone())])
        .unwrap();
    assert_eq!(first.other_checkpoints().unwrap(), vec![]);
    // The same run under another interval is this run, not another.
    assert_eq!(
        run(&config(1e-3, 5), b"w1").other_checkpoints().unwrap(),
        vec![]
    );

    let mut changed_config = config(2e-3, 3);
    changed_config["optimizer"]["beta"] = json!(0.95f32 as f64);
    let changed = run(&changed_config, b"w2");
    assert!(changed.load_checkpoint().unwrap().is_none());
    let others = changed.other_checkpoints().unwrap();
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(others[0].step, 6);
    assert!(others[0].folder.contains("_work"), "{}", others[0].folder);
    assert_eq!(
        others[0].differences,
        Some(vec![
            "optimizer.beta: 0.9 there, 0.95 here".to_string(),
            "optimizer.learning_rate: 0.001 there, 0.002 here".to_string(),
            "input weights: other contents".to_string(),
        ])
    );

    // Its own checkpoint is not listed; the other run's still is after it publishes.
    changed
        .save_checkpoint(1, vec![("model.bpk", checkpoint.clone())])
        .unwrap();
    assert_eq!(changed.other_checkpoints().unwrap().len(), 1);
    changed.publish(vec![], metrics(0, json!({}))).unwrap();
    assert_eq!(changed.other_checkpoints().unwrap().len(), 1);

    // A checkpoint written before runs recorded their config: listed, differences unknown.
    let record = std::path::Path::new(&others[0].folder).join("_run.json");
    std::fs::remove_file(&record).unwrap();
    let others = run(&config(3e-3, 3), b"w2").other_checkpoints().unwrap();
    assert_eq!(others[0].differences, None);

    // A checkpoint of this run written while the interval was hashed is this run's, not
    // another's.
    std::fs::remove_dir_all(std::path::Path::new(out).join("_work")).unwrap();
    let mut earlier =
        StageRun::new("demo", tool(), out, &config(1e-3, 2), ShardSpec::single()).unwrap();
    let weights_file = dir.path().join("weights.bin");
    std::fs::write(&weights_file, b"w1").unwrap();
    earlier
        .source_bytes("weights", weights_file.to_str().unwrap(), b"w1")
        .unwrap();
    earlier
        .save_checkpoint(2, vec![("model.bpk", checkpoint.clone())])
        .unwrap();
    assert_eq!(
        run(&config(1e-3, 2), b"w1").other_checkpoints().unwrap(),
        vec![]
    );
    assert_eq!(
        run(&config(1e-3, 4), b"w1")
            .other_checkpoints()
            .unwrap()
            .len(),
        1
    );
}

/// `manifests diff`: two runs compared stage by stage. A stage with the same config, data,
/// artifacts and metrics is the same whatever its timings; a changed config field (with the
/// hash), input from outside the run, artifact or metric is named with both values, and a stage
/// only one run has is listed; a stage that reads a changed stage of its own run is not echoed.
/// Exit 1 on any difference, 0 for a run against itself, 2 for a folder without a run.
#[test]
fn diff_names_what_differs_between_two_runs() {
    let dir = tempfile::tempdir().unwrap();
    let folder = |path: &str| dir.path().join(path).to_str().unwrap().to_string();
    let stage = |out: &str,
                 config: Value,
                 source: &[u8],
                 upstream: Option<(&str, String)>,
                 payload: &'static [u8],
                 metrics: Value| {
        let mut stage =
            StageRun::new("demo", tool(), &folder(out), &config, ShardSpec::single()).unwrap();
        stage
            .source_bytes("captions", "file:///data/captions.txt", source)
            .unwrap();
        if let Some((name, uri)) = upstream {
            stage.upstream(name, &uri).unwrap();
        }
        let artifact = stage
            .write_artifact("data/part-0.bin", "blob", Bytes::from_static(payload), None)
            .unwrap();
        let Value::Object(metrics) = metrics else {
            panic!("metrics are an object")
        };
        stage.publish(vec![artifact], metrics).unwrap();
    };
    let config = json!({"learning_rate": 0.1, "model": {"layers": 2}});
    let metrics = |loss: f64, seconds: f64| {
        json!({"loss": loss, "seconds": seconds,
            "eval": {"accuracy": 0.5, "images_per_second": 1.0 / seconds}})
    };
    // Two stages outside both runs, with other contents.
    stage("shared-1", json!({}), b"x", None, b"one", json!({}));
    stage("shared-2", json!({}), b"x", None, b"two", json!({}));
    for (run, layers, data, payload, loss, seconds) in [
        ("a", 2, b"x", b"one" as &'static [u8], 0.75, 2.0),
        ("b", 3, b"y", b"two", 0.5, 9.0),
    ] {
        // The same stage, timed differently.
        stage(
            &format!("{run}/tokenizer"),
            config.clone(),
            b"x",
            None,
            b"same",
            metrics(1.5, seconds),
        );
        // Another depth, other data, another artifact and loss.
        stage(
            &format!("{run}/model"),
            json!({"learning_rate": 0.1, "model": {"layers": layers}}),
            data,
            Some(("tokenizer", folder(&format!("{run}/tokenizer")))),
            payload,
            metrics(loss, 1.0),
        );
        // Reads the changed model of its own run, and a stage outside the run.
        let outside = if run == "a" { "shared-1" } else { "shared-2" };
        stage(
            &format!("{run}/reader"),
            json!({}),
            b"x",
            Some(("model", folder(&format!("{run}/model")))),
            b"read",
            json!({}),
        );
        stage(
            &format!("{run}/outside-reader"),
            json!({}),
            b"x",
            Some(("shared", folder(outside))),
            b"read",
            json!({}),
        );
    }
    stage(
        "a/only-here",
        config.clone(),
        b"x",
        None,
        b"z",
        metrics(1.0, 1.0),
    );

    let (a, b) = (folder("a"), folder("b"));
    let (code, text) = manifests_bin(&["diff", &a, &b]);
    assert_eq!(code, 1, "{text}");
    for expected in [
        "same     demo  tokenizer/manifest.json",
        "same     demo  reader/manifest.json",
        "differs  demo  model/manifest.json",
        "config hash: blake3:",
        "config model.layers: 2 -> 3",
        "input captions: other contents",
        "artifact data/part-0.bin: other contents",
        "metric loss: 0.75 -> 0.5",
        "differs  demo  outside-reader/manifest.json",
        "input shared: other contents",
        "only-here/manifest.json",
        "4 stages in both: 2 the same, 2 differ; 1 only in the first, 0 only in the second",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(
        !text.contains("seconds"),
        "timings are no difference:\n{text}"
    );
    assert!(!text.contains("learning_rate"), "{text}");

    let (code, text) = manifests_bin(&["diff", &a, &a]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("5 stages in both: 5 the same, 0 differ"),
        "{text}"
    );
    // The same run named through a link: its manifests name their upstream stages by the
    // other spelling, and those are still inside it.
    let link = folder("a-link");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let (code, text) = manifests_bin(&["diff", &a, &link]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = manifests_bin(&["diff", "--show", "1", &a, &b]);
    assert_eq!(code, 1);
    assert!(text.contains("and 4 more"), "{text}");
    // A mistyped run is an error naming it, not a run whose every stage is missing.
    let typo = folder("typo");
    let (code, text) = manifests_bin(&["diff", &a, &typo]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&typo) && text.contains("no stage manifests"),
        "{text}"
    );
}

/// `manifests diff` counts a batch array's merged stage once (its partial manifests beside it
/// are not stages of their own), and says when a v1 manifest meets a v2 one rather than
/// reporting their differently computed hashes as a changed config.
#[test]
fn diff_skips_merged_parts_and_names_a_schema_change() {
    let dir = tempfile::tempdir().unwrap();
    let folder = |path: &str| dir.path().join(path).to_str().unwrap().to_string();
    let stage = folder("batch/pairs");
    partial(&stage, 0, 2, &json!({"k": 1}), 2, json!({}));
    partial(&stage, 1, 2, &json!({"k": 1}), 3, json!({}));
    let (code, text) = manifests_bin(&["merge", &stage, &stage]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = manifests_bin(&["diff", &folder("batch"), &folder("batch")]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 stages in both: 1 the same"), "{text}");

    let older = folder("older/pairs");
    std::fs::create_dir_all(&older).unwrap();
    for entry in std::fs::read_dir(&stage).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            let data = std::path::Path::new(&older).join(entry.file_name());
            std::fs::create_dir_all(&data).unwrap();
            for file in std::fs::read_dir(entry.path()).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), data.join(file.file_name())).unwrap();
            }
        }
    }
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(format!("{stage}/manifest.json")).unwrap()).unwrap();
    manifest["schema"] = json!("parti.manifest/v1");
    manifest["config_hash"] = json!("blake3:hashed-by-the-v1-rule");
    std::fs::write(
        format!("{older}/manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let (code, text) = manifests_bin(&["diff", &folder("older"), &folder("batch")]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("schema: parti.manifest/v1 -> parti.manifest/v2"),
        "{text}"
    );
    assert!(!text.contains("config hash:"), "{text}");
    assert!(
        !text.contains("artifact"),
        "the artifacts are the same:\n{text}"
    );
}
