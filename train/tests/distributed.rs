//! `train parti` as a job of two processes on loopback (c10d's TCPStore and Gloo, launched as
//! torchrun would): the same weights, log and metrics as one process with the same global
//! batch; a rank killed with SIGKILL makes the other exit naming it; the job resumes from its
//! checkpoint with another world size and ends equal to an uninterrupted run, and ranks that
//! resumed from different steps stop the job naming the rank that differs; `train
//! text-encoder` as two processes gathers the embeddings and matches one process to rounding.
//! `--distributed on` trains alone in a process group of one, also to the same weights.
//! On the flex build (one process only) a launch of two is refused with what to do instead.
//! And on either build, one process killed with SIGKILL after a checkpoint resumes, under
//! another checkpoint interval, to the uninterrupted run's weights.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{bin, parti_command};
use manifests::testing::{
    assert_resumed, assert_same_training, assert_succeeded, finish, kill_after_checkpoint,
    launch_ranks, launch_ranks_with, lone_command, wait_for_checkpoint,
};

/// Token shards, tokenizer and their upstream, once for the file.
fn upstream() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = manifests::testing::fixture_dir(
            env!("CARGO_TARGET_TMPDIR"),
            manifests::fixture_name!("upstream"),
        );
        manifests::testing::run_stages(
            &bin(),
            &dir,
            &manifests::testing::few_step_pipeline(120, 60),
        );
        std::fs::write(
            dir.join("parti.toml"),
            "checkpoint_every = 2\nlog_every = 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("text-encoder.toml"), "log_every = 1\n").unwrap();
        dir
    })
}

fn tch_build() -> bool {
    nn::backend::backend_name() == "tch"
}

/// `train parti` into `out` for `steps` steps, checkpointing every 2, not yet started.
fn parti(out: &Path, steps: usize, extra: &[&str]) -> Command {
    let mut command = parti_command(upstream(), out, steps);
    command.args(extra);
    command
}

fn alone(mut command: Command) -> Vec<(bool, String)> {
    finish(vec![command.spawn().unwrap()])
}

#[test]
fn two_processes_train_what_one_process_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let outputs = finish(launch_ranks(2, || parti(&two, 6, &[])));
    // `--distributed on` without launcher variables: a process group of one (the collectives
    // run, each a sum of one value).
    let group_of_one = dir.path().join("group-of-one");
    let port = manifests::testing::free_port().to_string();
    let mut lone_group = parti(&group_of_one, 6, &["--distributed", "on"]);
    lone_group.env("MASTER_PORT", &port);
    if !tch_build() {
        let (succeeded, message) = &outputs[0];
        assert!(!succeeded, "{message}");
        assert!(message.contains("--features nn/tch"), "{message}");
        assert!(message.contains("--distributed off"), "{message}");
        let (succeeded, message) = &alone(lone_group)[0];
        assert!(
            !succeeded && message.contains("--features nn/tch"),
            "{message}"
        );
        return;
    }
    assert_succeeded(&outputs);
    assert_succeeded(&alone(parti(&one, 6, &[])));
    let manifest = std::fs::read_to_string(two.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"world_size\": 2"), "{manifest}");
    // Each rank computes one of a step's two micro-batches; the all-reduced sum is the one
    // process's sum (a single addition of two values, exact in either order): bit-identical.
    assert_same_training(&one, &two);
    assert_succeeded(&alone(lone_group));
    assert_same_training(&one, &group_of_one);
}

#[test]
fn a_process_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 24;
    let reference = dir.path().join("reference");
    assert_succeeded(&alone(parti(&reference, steps, &[])));
    let killed = dir.path().join("killed");
    kill_after_checkpoint(parti(&killed, steps, &[]), &killed);
    // A changed setting is another run: it starts from step 0 and says which checkpoint it
    // leaves alone, and why.
    let changed = alone(parti(
        &killed,
        steps,
        &["--learning-rate", "0.0001", "--stop-after", "1"],
    ));
    let (_, text) = &changed[0];
    assert!(
        text.contains("starting from step 0, not from the checkpoint of step")
            && text.contains("learning_rate: ")
            && text.contains(" there, 0.0001 here"),
        "{text}"
    );
    // Under another checkpoint interval: it says when progress is saved, not what is computed,
    // so it is not part of the run's identity.
    assert_resumed(&alone(parti(&killed, steps, &["--checkpoint-every", "5"])));
    assert_same_training(&killed, &reference);
    let manifest = std::fs::read_to_string(killed.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"checkpoint_every\": 5"), "{manifest}");
    // Finished, it stays up to date under any interval.
    let (succeeded, output) = &alone(parti(&killed, steps, &["--checkpoint-every", "7"]))[0];
    assert!(*succeeded && output.contains("up to date"), "{output}");
}

#[test]
fn a_killed_rank_is_named_and_the_job_resumes_with_another_world_size() {
    if !tch_build() {
        return; // the flex build refuses a job of two (asserted above)
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = 24;
    let reference = dir.path().join("reference");
    assert_succeeded(&alone(parti(&reference, steps, &[])));

    // Two ranks; rank 1 is killed (SIGKILL) once the first checkpoint exists.
    let killed = dir.path().join("killed");
    let mut children = launch_ranks(2, || parti(&killed, steps, &[]));
    wait_for_checkpoint(&killed, &mut children);
    children[1].kill().unwrap();
    let killed_at = Instant::now();
    let outputs = finish(children);
    let (survived, survivor) = &outputs[0];
    assert!(!survived, "{survivor}");
    assert!(
        survivor.contains("rank 0: lost rank 1 during"),
        "{survivor}"
    );
    // Gloo sees the closed connection at once, the roll call takes 3 s; never the 30-minute
    // collective timeout.
    assert!(killed_at.elapsed() < Duration::from_secs(60), "{survivor}");

    // The same command in one process resumes the two-process job's checkpoint.
    assert_resumed(&alone(parti(&killed, steps, &[])));
    assert_same_training(&killed, &reference);

    // And the other way: one process stops after 4 steps, two ranks resume.
    // One process into `out` that stops after 4 steps, as asked.
    let stop_after_4 = |out: &Path| {
        let paused = alone(parti(out, steps, &["--stop-after", "4"]));
        assert!(
            !paused[0].0 && paused[0].1.contains("--stop-after"),
            "{}",
            paused[0].1
        );
    };
    let stopped = dir.path().join("stopped");
    stop_after_4(&stopped);
    let outputs = finish(launch_ranks(2, || parti(&stopped, steps, &[])));
    assert_resumed(&outputs);
    assert!(
        outputs
            .iter()
            .all(|(_, text)| text.contains("checkpoint of step 4"))
    );
    assert_same_training(&stopped, &reference);

    // A rank that cannot see the leader's checkpoint (here its own output folder, as on storage
    // that is not shared) stops the job naming the ranks and steps, rather than summing the
    // gradients of another model.
    let leader_only = dir.path().join("leader-only");
    stop_after_4(&leader_only);
    let elsewhere = dir.path().join("elsewhere");
    let outputs = finish(launch_ranks_with(2, |rank| {
        parti(
            if rank == 0 { &leader_only } else { &elsewhere },
            steps,
            &[],
        )
    }));
    for (rank, (succeeded, text)) in outputs.iter().enumerate() {
        assert!(!succeeded, "rank {rank}: {text}");
    }
    let leader = &outputs[0].1;
    assert!(
        leader.contains("rank 1 has resumed step 0, rank 0 has 4"),
        "{leader}"
    );
    assert!(leader.contains("shared storage"), "{leader}");
    assert!(!leader_only.join("manifest.json").exists());
}

/// `train text-encoder` into `out` for 6 steps (3 contrastive, 3 MLM), not yet started.
fn text_encoder(out: &Path) -> Command {
    let dir = upstream();
    let mut command = lone_command(bin().join("train"));
    command
        .args([
            "text-encoder",
            "--preset",
            "tiny",
            "--steps",
            "6",
            "--batch-size",
            "16",
        ])
        .arg("--tokenizer")
        .arg(dir.join("tokenizer"))
        .arg("--text")
        .arg(dir.join("text"))
        .arg("--pairs")
        .arg(dir.join("pairs"))
        .arg("--config")
        .arg(dir.join("text-encoder.toml"))
        .arg("--out")
        .arg(out);
    command
}

/// Every float of the safetensors artifact `name` of the stage in `dir`, by tensor name.
fn weights(dir: &Path, name: &str) -> Vec<(String, Vec<f32>)> {
    let bytes = manifests::testing::artifact_bytes(dir, name);
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<f32>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn the_text_encoder_trains_as_two_processes_with_the_whole_batch_as_negatives() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let outputs = finish(launch_ranks(2, || text_encoder(&two)));
    if !tch_build() {
        let (succeeded, message) = &outputs[0];
        assert!(
            !succeeded && message.contains("--features nn/tch"),
            "{message}"
        );
        return;
    }
    assert_succeeded(&outputs);
    assert_succeeded(&alone(text_encoder(&one)));
    // Each rank embeds half the batch and computes the loss over all of it with the other's
    // embeddings as constants; MLM means are weighted by each rank's masked tokens. The sums
    // are regrouped (batch of 16 against two of 8), so equal to rounding, not bit for bit.
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 2e-4 * (1.0 + a.abs()),
            "{what}: {a} against {b}"
        );
    };
    let log = |dir: &Path| -> Vec<serde_json::Value> {
        String::from_utf8(manifests::testing::artifact_bytes(dir, "metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let (log_one, log_two) = (log(&one), log(&two));
    assert_eq!(log_one.len(), log_two.len());
    let mut objectives = std::collections::BTreeSet::new();
    for (a, b) in log_one.iter().zip(&log_two) {
        if let Some(objective) = a["objective"].as_str() {
            objectives.insert(objective.to_string());
            assert_eq!(a["objective"], b["objective"]);
            close(
                a["loss"].as_f64().unwrap(),
                b["loss"].as_f64().unwrap(),
                "loss",
            );
        }
    }
    assert_eq!(objectives.len(), 2, "both objectives ran: {log_one:?}");
    for name in ["text_encoder.safetensors", "contrastive.safetensors"] {
        let (a, b) = (weights(&one, name), weights(&two, name));
        assert_eq!(a.len(), b.len());
        for ((tensor, x), (_, y)) in a.iter().zip(&b) {
            for (x, y) in x.iter().zip(y) {
                close(*x as f64, *y as f64, tensor);
            }
        }
    }
}
