//! Pipeline identity: a stage skips by the content of what it reads, not by how its location is
//! spelled; an edit that keeps a file's size still reruns it; an upstream rerun that writes the
//! same artifacts leaves the stages below it up to date; `manifests status` says all of it
//! without running anything; manifests written as `parti.manifest/v1` still read, verify and
//! skip.

mod common;

use std::path::{Path, PathBuf};

use common::{ingest_owned, pairs_args, pairs_rows, png, text_args, write};
use manifests::digest_bytes;
use serde_json::Value;

/// `manifests ARGS`: exit code and output.
fn manifests_cli(args: &[&str]) -> (i32, String) {
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_ingest")).join("manifests");
    manifests::testing::output_of(bin, args)
}

/// `manifests status RUN`: exit code and output.
fn status(run: &Path) -> (i32, String) {
    manifests_cli(&["status", run.to_str().unwrap()])
}

fn assert_ran(args: &[String], why: &str) -> String {
    let (code, text) = ingest_owned(args);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("up to date"), "expected a rerun: {text}");
    assert!(text.contains(why), "expected '{why}' in: {text}");
    text
}

fn assert_skipped(args: &[String]) {
    let (code, text) = ingest_owned(args);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("up to date"), "expected a skip: {text}");
}

fn assert_up_to_date(run: &Path) {
    let (code, text) = status(run);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(", 0 stale"), "{text}");
}

fn assert_stale(run: &Path, why: &str) {
    let (code, text) = status(run);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(why), "expected '{why}' in: {text}");
}

/// The same absolute path, spelled relative to the current directory.
fn relative(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let ups = cwd.components().count() - 1;
    let mut relative = PathBuf::new();
    for _ in 0..ups {
        relative.push("..");
    }
    relative.join(path.strip_prefix("/").unwrap())
}

#[test]
fn the_same_folder_spelled_four_ways_is_one_input() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..6u8 {
        write(&src, &format!("{i:03}.png"), png(48, 48, i));
        write(&src, &format!("{i:03}.txt"), format!("caption {i}"));
    }
    let run = dir.path().join("run");
    let out = run.join("pairs");
    let args = |input: &str| pairs_args(Path::new(input), &out, &["--size", "32"]);
    run_all(&[&args(src.to_str().unwrap())]);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    for spelling in [
        relative(&src).display().to_string(),
        format!("file://{}", src.display()),
        link.display().to_string(),
        format!("{}/", src.display()),
    ] {
        assert_skipped(&args(&spelling));
    }
    assert_up_to_date(&run);

    // A file added to the folder is a changed input, and so is a changed caption file.
    write(&src, "006.png", png(48, 48, 6));
    assert_stale(&run, "006.png added");
    assert_ran(&args(src.to_str().unwrap()), "006.png added");
    write(&src, "002.txt", "caption 9");
    assert_stale(&run, "002.txt changed");
    assert_ran(&args(link.to_str().unwrap()), "002.txt changed");
    assert_up_to_date(&run);
}

/// A list file naming six images beside it, as CSV, JSONL or COCO JSON; `caption(i)` is the
/// caption of image `i`.
fn list(format: &str, caption: impl Fn(usize) -> String) -> (&'static str, String) {
    match format {
        "csv" => {
            let rows: String = (0..6)
                .map(|i| format!("images/{i}.png,{}\n", caption(i)))
                .collect();
            ("list.csv", format!("image,caption\n{rows}"))
        }
        "jsonl" => {
            let rows: String = (0..6)
                .map(|i| {
                    serde_json::json!({"image": format!("images/{i}.png"), "caption": caption(i)})
                        .to_string()
                        + "\n"
                })
                .collect();
            ("list.jsonl", rows)
        }
        _ => {
            let images: Vec<Value> = (0..6)
                .map(|i| serde_json::json!({"id": i, "file_name": format!("images/{i}.png")}))
                .collect();
            let annotations: Vec<Value> = (0..6)
                .map(|i| serde_json::json!({"id": 100 + i, "image_id": i, "caption": caption(i)}))
                .collect();
            let coco = serde_json::json!({"images": images, "annotations": annotations});
            ("captions.json", coco.to_string())
        }
    }
}

/// Six pictures in `src/images` and the list naming them as `format`: its file name and text.
fn six_images_and_their_list(src: &Path, format: &str) -> (&'static str, String) {
    for i in 0..6u8 {
        write(src, &format!("images/{i}.png"), png(48, 48, i));
    }
    let (name, text) = list(format, |i| format!("a red cat number {i}"));
    write(src, name, &text);
    (name, text)
}

#[test]
fn a_same_size_caption_edit_in_a_list_and_a_changed_named_image_rerun() {
    for format in ["csv", "jsonl", "coco"] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let (name, text) = six_images_and_their_list(&src, format);
        age_files(&src);
        let run = dir.path().join("run");
        let out = run.join("pairs");
        let args = pairs_args(&src.join(name), &out, &["--size", "32"]);
        let (code, output) = ingest_owned(&args);
        assert_eq!(code, 0, "{format}: {output}");
        assert_skipped(&args);
        assert_up_to_date(&run);

        // Same size, other caption, the time put back: the stage reads the list whole to build
        // its rows and takes the list's identity from those bytes, with no fast check to fool
        // (`manifests status`, which reads nothing it need not, trusts size and time here).
        let (_, edited) = list(format, |i| {
            if i == 3 {
                "a red dog number 3".into()
            } else {
                format!("a red cat number {i}")
            }
        });
        assert_eq!(edited.len(), text.len());
        rewrite_keeping_time(&src.join(name), edited.as_bytes());
        assert_ran(&args, &format!("{name} changed"));
        let (_, rows) = pairs_rows(out.to_str().unwrap());
        assert!(
            rows.iter().any(|r| r.caption == "a red dog number 3"),
            "{format}: the rerun read the edit: {:?}",
            rows.iter().map(|r| &r.caption).collect::<Vec<_>>()
        );
        assert_skipped(&args);

        // An image the list names, redrawn: the list is the same, the input is not.
        write(&src, "images/4.png", png(48, 48, 40));
        assert_stale(&run, "images/4.png changed");
        assert_ran(&args, "images/4.png changed");
        assert_up_to_date(&run);

        // Touched but unchanged: digested again, same identity, still up to date.
        let png_path = src.join("images/5.png");
        let bytes = std::fs::read(&png_path).unwrap();
        std::fs::write(&png_path, bytes).unwrap();
        assert_up_to_date(&run);
        assert_skipped(&args);

        // A named image gone: stale, and the rerun counts its sample as rejected.
        std::fs::remove_file(src.join("images/0.png")).unwrap();
        assert_stale(&run, "images/0.png is gone");
        assert_ran(&args, "images/0.png is gone");
        let (manifest, rows) = pairs_rows(out.to_str().unwrap());
        assert_eq!(rows.len(), 5, "{format}");
        assert_eq!(common::rejected(&manifest).as_object().unwrap().len(), 1);

        // The list renamed (same bytes): its name can decide row keys and format, so it reruns.
        let renamed = src.join(format!("renamed-{name}"));
        std::fs::rename(src.join(name), &renamed).unwrap();
        let renamed_args = pairs_args(&renamed, &out, &["--size", "32"]);
        assert_ran(&renamed_args, &format!("renamed-{name} added"));
    }
}

/// `ingest synth` (`images` pictures) into `run/synth`, then `ingest pairs` on its pictures.
fn synth_then_pairs(run: &Path, images: usize) -> (Vec<String>, Vec<String>) {
    let synth: Vec<String> = [
        "synth",
        "--out",
        run.join("synth").to_str().unwrap(),
        "--images",
        &images.to_string(),
        "--documents",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pairs = pairs_args(
        &run.join("synth/pairs"),
        &run.join("pairs"),
        &["--preset", "tiny"],
    );
    (synth, pairs)
}

fn run_all(commands: &[&[String]]) {
    for args in commands {
        let (code, text) = ingest_owned(args);
        assert_eq!(code, 0, "{text}");
    }
}

#[test]
fn an_upstream_rerun_with_identical_output_leaves_downstream_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (synth, pairs) = synth_then_pairs(&run, 20);
    run_all(&[&synth, &pairs]);
    let manifest_before = std::fs::read(run.join("synth/manifest.json")).unwrap();

    let forced: Vec<String> = synth.iter().cloned().chain(["--force".into()]).collect();
    assert_ran(&forced, "--force");
    assert_ne!(
        std::fs::read(run.join("synth/manifest.json")).unwrap(),
        manifest_before,
        "the upstream manifest was rewritten (a new created_at)"
    );
    assert_up_to_date(&run);
    assert_skipped(&pairs);
    let (code, text) = manifests_cli(&["lineage", run.join("pairs").to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");

    // Other settings upstream (other pictures): downstream is stale and says why.
    let (more, _) = synth_then_pairs(&run, 21);
    run_all(&[&more]);
    assert_stale(&run, "upstream ingest.synth");
    assert_stale(&run, "ran with other settings");
    assert_ran(&pairs, "ran with other settings");
    assert_up_to_date(&run);

    // An artifact damaged after the fact: status names it.
    let shard = run.join("pairs/pairs/part-00000-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    assert_stale(&run, "part-00000-00000.parquet");
}

#[test]
fn v1_manifests_still_read_verify_and_skip() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (synth, pairs) = synth_then_pairs(&run, 20);
    run_all(&[&synth, &pairs]);
    // Rewrite the pairs manifest as parti 0.1 wrote it: schema v1, the whole config hashed
    // (input path included), and the upstream identified by its manifest's bytes.
    let manifest_path = run.join("pairs/manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["schema"] = "parti.manifest/v1".into();
    manifest["config_hash"] = manifests::manifest::config_hash(&manifest["config"]).into();
    let synth_bytes = std::fs::read(run.join("synth/manifest.json")).unwrap();
    let input = manifest["inputs"][0].as_object_mut().unwrap();
    input.insert("digest".into(), digest_bytes(&synth_bytes).into());
    input.remove("config_hash");
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();

    let pairs_dir = run.join("pairs");
    let pairs_uri = pairs_dir.to_str().unwrap();
    let (code, text) = manifests_cli(&["verify", pairs_uri]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = manifests_cli(&["show", pairs_uri]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("parti.manifest/v1"), "{text}");
    let (code, text) = manifests_cli(&["lineage", pairs_uri]);
    assert_eq!(code, 0, "{text}");
    assert!(!pairs_rows(pairs_uri).1.is_empty(), "its shards still read");
    assert_up_to_date(&run);
    assert_skipped(&pairs);
    let written = std::fs::read(&manifest_path).unwrap();
    assert!(
        String::from_utf8_lossy(&written).contains("parti.manifest/v1"),
        "an up-to-date v1 manifest is left as it is"
    );

    // A downstream stage reads it as its upstream.
    let dedup = dir.path().join("dedup");
    let (code, text) = common::ingest(&[
        "dedup",
        "--pairs",
        pairs_uri,
        "--out",
        dedup.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");

    // Judged by the v1 rule, an upstream rewritten is a change; the rerun writes v2.
    let forced: Vec<String> = synth.iter().cloned().chain(["--force".into()]).collect();
    ingest_owned(&forced);
    assert_stale(&run, "was rewritten");
    assert_ran(&pairs, "inputs changed");
    let written = std::fs::read(&manifest_path).unwrap();
    assert!(String::from_utf8_lossy(&written).contains("parti.manifest/v2"));
    assert_up_to_date(&run);
}

/// A folder of data beside a stage's output (here: inside `ingest synth`'s folder, whose
/// manifest lists only its own files) is identified by its own files, not by the manifest one
/// folder up: an edit to it reruns `ingest pairs` and `ingest text`. The synth folders themselves
/// are still read through their manifest.
#[test]
fn a_manifest_above_the_input_that_does_not_list_it_hides_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("synth");
    let (code, text) = ingest_owned(&[
        "synth".into(),
        "--out".into(),
        synth.to_str().unwrap().into(),
        "--images".into(),
        "4".into(),
        "--documents".into(),
        "4".into(),
    ]);
    assert_eq!(code, 0, "{text}");
    let mine = synth.join("mine");
    for i in 0..3u8 {
        write(&mine, &format!("{i:03}.png"), png(48, 48, i));
        write(&mine, &format!("{i:03}.txt"), format!("caption {i}"));
    }
    let corpus = synth.join("corpus");
    write(
        &corpus,
        "notes.jsonl",
        "{\"text\": \"a document long enough to keep\"}\n",
    );

    let pairs = pairs_args(&mine, &dir.path().join("pairs"), &["--size", "32"]);
    let text = text_args(&corpus, &dir.path().join("text"), &[]);
    let (code, out) = ingest_owned(&pairs);
    assert_eq!(code, 0, "{out}");
    let (manifest, _) = pairs_rows(dir.path().join("pairs").to_str().unwrap());
    assert_eq!(manifest.inputs[0].kind, "source", "{:?}", manifest.inputs);
    let (code, out) = ingest_owned(&text);
    assert_eq!(code, 0, "{out}");
    assert_skipped(&pairs);
    assert_skipped(&text);

    write(&mine, "001.txt", "caption 7");
    assert_ran(&pairs, "001.txt");
    write(
        &corpus,
        "notes.jsonl",
        "{\"text\": \"another document, long enough too\"}\n",
    );
    assert_ran(&text, "notes.jsonl");

    // The synth folders are the synth stage's output: read through its manifest.
    let from_synth = dir.path().join("synth-pairs");
    let (code, out) = ingest_owned(&pairs_args(&synth.join("pairs"), &from_synth, &[]));
    assert_eq!(code, 0, "{out}");
    let (manifest, _) = pairs_rows(from_synth.to_str().unwrap());
    assert_eq!(manifest.inputs[0].kind, "manifest");
}

/// The input of a job of `run`, read from its partial manifest.
fn part_input(run: &Path, index: u32, count: u32) -> manifests::Input {
    let part = run.join(format!("manifest.part-{index:05}-of-{count:05}.json"));
    let (manifest, _) =
        manifests::Manifest::read(&manifests::Location::parse(part.to_str().unwrap()).unwrap())
            .unwrap();
    manifest.inputs[0].clone()
}

/// The first input of the stage at `run` by name and digest, with its files': a file's recorded
/// time depends on when it was first looked at.
fn input_identity(run: &Path) -> (usize, String, Vec<(String, bool, String)>) {
    let location = manifests::Location::parse(run.to_str().unwrap()).unwrap();
    let (manifest, _) = manifests::Manifest::read(&location.join("manifest.json")).unwrap();
    let input = &manifest.inputs[0];
    let files = input.files.iter();
    let files = files.map(|f| (f.name.clone(), f.named, f.digest.clone()));
    (manifest.inputs.len(), input.digest.clone(), files.collect())
}

/// Merges the jobs' parts in `array` (a stage folder of its run) and checks the run's input is
/// the `single` run's, file for file, and the merged run up to date.
fn assert_merges_into(array: &Path, single: &Path, case: &str) {
    let array_uri = array.to_str().unwrap();
    let (code, output) = manifests_cli(&["merge", array_uri, array_uri]);
    assert_eq!(code, 0, "{case}: {output}");
    assert_eq!(
        input_identity(array),
        input_identity(single),
        "{case}: the merged run's input is the single job's, file for file"
    );
    assert_up_to_date(array.parent().unwrap());
}

#[test]
fn each_job_of_an_array_names_only_its_own_rows_images() {
    for format in ["csv", "jsonl", "coco"] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let (name, _) = six_images_and_their_list(&src, format);
        let single = dir.path().join("single");
        let (code, output) = ingest_owned(&pairs_args(&src.join(name), &single, &["--size", "32"]));
        assert_eq!(code, 0, "{format}: {output}");

        let array = dir.path().join("array/pairs");
        let job = |index: u32| {
            pairs_args(
                &src.join(name),
                &array,
                &[
                    "--size",
                    "32",
                    "--num-shards",
                    "3",
                    "--shard-index",
                    &index.to_string(),
                ],
            )
        };
        for index in 0..3 {
            let (code, output) = ingest_owned(&job(index));
            assert_eq!(code, 0, "{format}: {output}");
            let named: Vec<String> = part_input(&array, index, 3)
                .files
                .iter()
                .filter(|file| file.named)
                .map(|file| file.name.clone())
                .collect();
            let first = 2 * index;
            assert_eq!(
                named,
                [
                    format!("images/{first}.png"),
                    format!("images/{}.png", first + 1)
                ],
                "{format}: job {index} names its own rows' images, and no other"
            );
        }
        assert_merges_into(&array, &single, format);

        // An image of job 1's rows redrawn: that job reruns, the others' inputs are unchanged.
        write(&src, "images/3.png", png(48, 48, 33));
        assert_skipped(&job(0));
        assert_ran(&job(1), "images/3.png changed");
        assert_skipped(&job(2));
    }
}

/// A batch array over a folder (the KEY.png + KEY.txt layout, webdataset tars, a text corpus):
/// each job identifies by content only the files it reads, the first job also the files no job
/// reads; the merged run is the single run's input, file for file; a change to a file that one
/// job reads reruns that job alone.
#[test]
fn each_job_of_an_array_over_a_folder_reads_only_its_own_files() {
    for layout in ["folder", "tars", "text"] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        // The files of unit `i`: six units, two a job.
        let files_of = |i: usize| -> Vec<String> {
            match layout {
                "folder" => vec![format!("{i:03}.png"), format!("{i:03}.txt")],
                "tars" => vec![format!("{i:03}.tar")],
                _ => vec![format!("{i:03}.jsonl")],
            }
        };
        for i in 0..6u8 {
            let bytes = match layout {
                "folder" => vec![png(48, 48, i), format!("caption {i}").into_bytes()],
                "tars" => vec![common::webdataset_tar(&[(format!("s{i}"), png(48, 48, i))])],
                _ => vec![format!("{{\"text\": \"document number {i}\"}}\n").into_bytes()],
            };
            for (name, bytes) in files_of(i.into()).iter().zip(bytes) {
                write(&src, name, bytes);
            }
        }
        // No unit's file: the first job reads it.
        write(&src, "_stats.csv", "count\n6\n");
        let args = |out: &Path, job: &[&str]| match layout {
            "text" => text_args(&src, out, job),
            _ => pairs_args(&src, out, &[&["--size", "32"][..], job].concat()),
        };
        let single = dir.path().join("single");
        let (code, output) = ingest_owned(&args(&single, &[]));
        assert_eq!(code, 0, "{layout}: {output}");

        let array = dir.path().join("array/stage");
        let job = |index: u32| {
            let index = index.to_string();
            args(&array, &["--num-shards", "3", "--shard-index", &index])
        };
        for index in 0..3u32 {
            let (code, output) = ingest_owned(&job(index));
            assert_eq!(code, 0, "{layout}: {output}");
            let read: Vec<String> = part_input(&array, index, 3)
                .files
                .iter()
                .filter(|file| file.digest != manifests::sources::UNREAD)
                .map(|file| file.name.clone())
                .collect();
            let first_unit = 2 * index as usize;
            let mut wanted = [files_of(first_unit), files_of(first_unit + 1)].concat();
            if index == 0 {
                wanted.push("_stats.csv".into());
            }
            wanted.sort();
            assert_eq!(
                read, wanted,
                "{layout}: job {index} reads these files, and no other"
            );
        }
        assert_merges_into(&array, &single, layout);

        // A file job 1 reads, rewritten: that job reruns, the others are up to date.
        let changed = &files_of(2)[0];
        let mut bytes = std::fs::read(src.join(changed)).unwrap();
        bytes.extend_from_slice(b"\n");
        std::fs::write(src.join(changed), bytes).unwrap();
        assert_skipped(&job(0));
        assert_ran(&job(1), &format!("{changed} changed"));
        assert_skipped(&job(2));
    }
}

/// Sets every file below `dir` an hour back, so the fast check (size, time) records its time.
fn age_files(dir: &Path) {
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for entry in walk(dir) {
        let file = std::fs::File::options().write(true).open(&entry).unwrap();
        file.set_modified(hour_ago).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        match path.is_dir() {
            true => files.extend(walk(&path)),
            false => files.push(path),
        }
    }
    files
}

/// Rewrites the file at `path` with `bytes` of the same length and puts its modification time
/// back: the fast check then vouches for the old digest, as it would for a file rewritten
/// between a stage taking its identity and reading it.
fn rewrite_keeping_time(path: &Path, bytes: &[u8]) {
    let before = std::fs::metadata(path).unwrap();
    assert_eq!(before.len() as usize, bytes.len(), "{}", path.display());
    std::fs::write(path, bytes).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
}

#[test]
fn a_file_read_other_than_its_identity_stops_the_run_and_the_next_run_reads_it_anew() {
    let cat = |i: usize| format!("a red cat number {i}");
    let dog = |i: usize| match i {
        3 => "a red dog number 3".to_string(),
        i => format!("a red cat number {i}"),
    };
    let members = |caption: &dyn Fn(usize) -> String| -> Vec<(String, Vec<u8>)> {
        (0..6)
            .flat_map(|i| {
                [
                    (format!("{i}.png"), png(48, 48, i as u8)),
                    (format!("{i}.txt"), caption(i).into_bytes()),
                ]
            })
            .collect()
    };
    let corpus = |caption: &dyn Fn(usize) -> String| -> String {
        (0..6)
            .map(|i| serde_json::json!({ "text": format!("{} sat on the mat", caption(i)) }))
            .map(|line| line.to_string() + "\n")
            .collect()
    };
    let mut folder: Vec<(String, Vec<u8>)> = (0..6u8)
        .map(|i| (format!("{i}.png"), png(48, 48, i)))
        .collect();
    folder.extend([0, 1, 2, 4, 5].map(|i| (format!("{i}.txt"), cat(i).into_bytes())));
    struct Case {
        case: &'static str,
        stage: &'static str,
        /// Below `src`; empty: `src` itself.
        input: &'static str,
        /// The file rewritten, its bytes then and after, and the files beside it.
        file: &'static str,
        then: Vec<u8>,
        after: Vec<u8>,
        beside: Vec<(String, Vec<u8>)>,
    }
    let cases = [
        Case {
            case: "a caption file of a folder",
            stage: "pairs",
            input: "",
            file: "3.txt",
            then: cat(3).into_bytes(),
            after: dog(3).into_bytes(),
            beside: folder,
        },
        Case {
            case: "a webdataset tar",
            stage: "pairs",
            input: "",
            file: "shard.tar",
            then: common::tar_of(&members(&cat)),
            after: common::tar_of(&members(&dog)),
            beside: Vec::new(),
        },
        Case {
            case: "a text corpus file",
            stage: "text",
            input: "",
            file: "corpus.jsonl",
            then: corpus(&cat).into_bytes(),
            after: corpus(&dog).into_bytes(),
            beside: Vec::new(),
        },
    ];
    for Case {
        case,
        stage,
        input,
        file,
        then,
        after,
        beside,
    } in cases
    {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for (name, bytes) in beside {
            write(&src, &name, bytes);
        }
        write(&src, file, &then);
        age_files(&src);
        let out = dir.path().join("out");
        // Two rows a shard: the runs finish shards before they reach the rewritten file.
        let args = match stage {
            "pairs" => pairs_args(
                &src.join(input),
                &out,
                &["--size", "32", "--shard-rows", "2"],
            ),
            _ => text_args(&src.join(input), &out, &["--shard-rows", "2"]),
        };
        let (code, text) = ingest_owned(&args);
        assert_eq!(code, 0, "{case}: {text}");

        rewrite_keeping_time(&src.join(file), &after);
        let forced: Vec<String> = args.iter().cloned().chain(["--force".into()]).collect();
        let (code, text) = ingest_owned(&forced);
        assert_ne!(
            code, 0,
            "{case}: a run that read other bytes than its identity's: {text}"
        );
        assert!(
            text.contains(&format!(
                "{file} is not what this run's identity of it was taken from"
            )),
            "{case}: {text}"
        );
        // What it finished came from other bytes than its identity says: not kept for a resume.
        let work = out.join("_work");
        let kept = if work.exists() {
            walk(&work)
        } else {
            Vec::new()
        };
        assert!(kept.is_empty(), "{case}: {kept:?}");

        // The stopped run withdrew the manifest whose time vouched for the old bytes: the next
        // run digests the file again and reads the edit.
        let (code, text) = ingest_owned(&args);
        assert_eq!(code, 0, "{case}: {text}");
        assert!(!text.contains("up to date"), "{case}: {text}");
        let found = match stage {
            "pairs" => pairs_rows(out.to_str().unwrap())
                .1
                .iter()
                .any(|r| r.caption == dog(3)),
            _ => common::text_rows(out.to_str().unwrap())
                .1
                .iter()
                .any(|r| r.text.contains("dog")),
        };
        assert!(found, "{case}: the rerun read the edit");
        assert_skipped(&args);
    }
}
