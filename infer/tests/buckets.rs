//! `make pipeline`'s stages with the run folder on a bucket, on each provider's real API server
//! on loopback (S3: moto; Azure Blob Storage: Azurite), against the same stages on a local
//! folder. One test in this file: it sets the process environment that object_store reads.

use std::collections::BTreeSet;
use std::path::Path;

use manifests::Location;

const S3_SECRET: &str = "pipeline-s3-SECRET-never-logged-6120";
const AZURE_SECRET: &str = "pipeline-azure-SECRET-never-logged-8842";

/// The stages of `make pipeline` (Makefile), small, with `D/` the run folder. The pairs stages
/// read the synthetic pictures the local run wrote (`LOCAL/`): a pairs row keeps its source's
/// path, so runs that read different copies would differ there and nowhere else.
const STAGES: &[&str] = &[
    "ingest synth --out D/synth --images 60 --documents 40",
    "ingest synth --out D/synth-large --images 12 --documents 2 --size 256",
    "ingest pairs --preset tiny --input LOCAL/synth/pairs --out D/pairs",
    "ingest pairs --preset tiny --size 256 --input LOCAL/synth-large/pairs --out D/pairs-large",
    "ingest text --input LOCAL/synth/text --out D/text",
    "vqgan train --pairs D/pairs --out D/vqgan --steps 3 --batch-size 4",
    "vqgan finetune-decoder --vqgan D/vqgan --pairs D/pairs --out D/vqgan-decoder --steps 2 \
     --batch-size 4",
    "vqgan superres --pairs D/pairs-large --vqgan D/vqgan-decoder --out D/superres --steps 2 \
     --batch-size 4 --config SUPERRES_CONFIG",
    "vqgan reconstruct --vqgan D/vqgan-decoder --pairs D/pairs --out D/vqgan-reconstruct",
    "vqgan encode --vqgan D/vqgan-decoder --pairs D/pairs --out D/tokens",
    "train tokenizer --text D/text --captions D/pairs --out D/tokenizer",
    "train text-encoder --tokenizer D/tokenizer --text D/text --pairs D/pairs \
     --out D/text-encoder --steps 3 --batch-size 4",
    "train parti --tokens D/tokens --tokenizer D/tokenizer --text-encoder D/text-encoder \
     --out D/parti --steps 3 --batch-size 4",
    "infer generate --parti D/parti --samples 2 --upscale D/superres --out D/generate",
    "infer eval --parti D/parti --prompts 4 --captions 4 --out D/eval",
];

#[test]
fn the_pipeline_on_s3_and_azure_buckets_writes_what_it_writes_on_a_local_folder() {
    let moto = manifests::testing::start_moto().expect("moto S3 server");
    let azurite = manifests::testing::start_azurite(AZURE_SECRET).expect("Azurite server");
    for (key, value) in moto.env(S3_SECRET).into_iter().chain(azurite.env()) {
        // SAFETY: this file holds a single test, so no other thread reads the environment now.
        unsafe { std::env::set_var(key, value) };
    }
    moto.create_bucket("runs").unwrap();
    azurite.create_container("runs").unwrap();
    // Azurite's key is base64 of its secret: either form must stay out of sight.
    let secrets = [S3_SECRET, AZURE_SECRET, azurite.key()];

    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_infer"));
    let dir = manifests::testing::fixture_dir(
        env!("CARGO_TARGET_TMPDIR"),
        manifests::fixture_name!("buckets"),
    );
    let superres_config = dir.join("superres.toml");
    std::fs::write(&superres_config, "patch = 8\nheld_out = 2\nlog_every = 1\n").unwrap();
    let local = dir.join("run").display().to_string();
    let stages: Vec<String> = STAGES
        .iter()
        .map(|stage| {
            stage
                .replace("LOCAL/", &format!("{local}/"))
                .replace("SUPERRES_CONFIG", &superres_config.display().to_string())
        })
        .collect();
    manifests::testing::run_stages_at(&bin, &local, &stages);

    let parti = stages
        .iter()
        .position(|stage| stage.starts_with("train parti"))
        .unwrap();
    for run in ["s3://runs/pipeline", "az://runs/pipeline"] {
        let mut printed = manifests::testing::run_stages_at(&bin, run, &stages[..parti]);
        // A batch job out of time: Parti stops after 2 of its 3 steps with a checkpoint on the
        // bucket, and the pipeline's own command resumes from it.
        let output = manifests::testing::stage_command(&bin, run, &stages[parti])
            .args(["--stop-after", "2"])
            .output()
            .unwrap();
        let paused = manifests::testing::printed(&output);
        assert!(
            !output.status.success() && paused.contains("stopped after step 2"),
            "{run}: {paused}"
        );
        printed.extend(manifests::testing::run_stages_at(
            &bin,
            run,
            &stages[parti..],
        ));
        assert!(
            printed[parti].contains("resuming from the checkpoint of step 2"),
            "{run}: Parti did not resume: {}",
            printed[parti]
        );
        for (stage, text) in stages.iter().zip(&printed) {
            assert!(
                !text.contains("up to date"),
                "{run}: {stage} skipped on a fresh run: {text}"
            );
        }
        printed.push(paused);
        // Run again: every stage finds its manifest and its artifacts on the bucket
        // (`generate` its chunk records and their pictures).
        let again = manifests::testing::run_stages_at(&bin, run, &stages);
        for (stage, text) in stages.iter().zip(&again) {
            let skipped = if stage.starts_with("infer generate") {
                text.contains("of this job's 1 chunks, 1 done before, 0 sampled now")
            } else {
                text.contains("up to date")
            };
            assert!(skipped, "{run}: {stage} reran: {text}");
        }
        let checks = manifests::testing::run_stages_at(
            &bin,
            run,
            &[
                "manifests status D/",
                "manifests verify D/eval",
                "manifests lineage D/eval",
            ],
        );
        for text in printed.iter().chain(&again).chain(&checks) {
            for secret in secrets {
                assert!(!text.contains(secret), "{run}: a credential leaked: {text}");
            }
        }
        let run_location = Location::parse(run).unwrap();
        let objects = run_location.list().unwrap();
        let records: Vec<_> = objects
            .iter()
            .filter(|object| object.location.file_name().ends_with(".json"))
            .collect();
        // A manifest per stage, and `generate`'s index and chunk record.
        assert!(records.len() > stages.len(), "{records:?}");
        for record in records {
            let text = String::from_utf8_lossy(&record.location.get().unwrap()).into_owned();
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "{}: a credential leaked",
                    record.location
                );
            }
        }

        // The same weights, tokens, pictures and metrics as on the local folder, stage by stage
        // (timings and the run's own place left out), Parti's resumed run among them.
        let compared =
            manifests::diff::diff(&Location::parse(&local).unwrap(), &run_location).unwrap();
        let differing: Vec<_> = compared
            .stages
            .iter()
            .filter(|stage| !stage.differences.is_empty())
            .collect();
        assert!(
            compared.is_same(),
            "{run} differs from the local run: {differing:#?}, only local {:?}, only on the \
             bucket {:?}",
            compared.only_in_first,
            compared.only_in_second
        );
        // Every stage but `generate`, which keeps chunk records instead of a manifest: its
        // pictures are compared file by file.
        assert_eq!(compared.stages.len(), stages.len() - 1, "{compared:?}");
        let local_pictures: BTreeSet<String> = std::fs::read_dir(dir.join("run/generate"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".png"))
            .collect();
        let generated = run_location.join("generate");
        let bucket_pictures: BTreeSet<String> = objects
            .iter()
            .filter_map(|object| object.location.relative_to(&generated))
            .filter(|name| name.ends_with(".png"))
            .collect();
        assert_eq!(bucket_pictures, local_pictures, "{run}");
        // Three held-out captions: a kept sample (enlarged by the super-resolution model on the
        // bucket) and a grid each.
        assert_eq!(local_pictures.len(), 6, "{local_pictures:?}");
        for name in local_pictures {
            assert!(
                generated.join(&name).get().unwrap().as_ref()
                    == std::fs::read(dir.join("run/generate").join(&name))
                        .unwrap()
                        .as_slice(),
                "{run}: generate/{name} differs from the local run's"
            );
        }
        if nn::backend::backend_name() == "tch" {
            two_ranks_resume_on_the_bucket(&bin, run, &stages[parti], &format!("{local}/parti"));
        }
    }
}

/// `stage`, the pipeline's `train parti` command, as a job of two processes (Gloo on loopback;
/// the tch build only: flex trains in one process) into `RUN/parti-two-ranks` on the bucket:
/// paused after 2 steps, then resumed by both ranks from the checkpoint rank 0 wrote there, it
/// must end with the weights, log and metrics of the one-process run at `reference`.
fn two_ranks_resume_on_the_bucket(bin: &Path, run: &str, stage: &str, reference: &str) {
    let stage = stage.replace("--out D/parti ", "--out D/parti-two-ranks ");
    let job = |extra: &[&str]| {
        manifests::testing::finish(manifests::testing::launch_ranks(2, || {
            let mut command = manifests::testing::stage_command(bin, run, &stage);
            command.args(extra);
            command
        }))
    };
    let paused = job(&["--stop-after", "2"]);
    assert!(
        !paused[0].0 && paused[0].1.contains("stopped after step 2"),
        "{run}: {}",
        paused[0].1
    );
    manifests::testing::assert_resumed(&job(&[]));
    manifests::testing::assert_same_training_at(reference, &format!("{run}/parti-two-ranks"));
}
