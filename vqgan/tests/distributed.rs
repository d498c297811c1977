//! `vqgan train` and `vqgan finetune-decoder` as jobs of two processes on loopback (c10d's
//! TCPStore and Gloo, launched as torchrun would) end with the same weights, log and metrics as
//! one process with the same global batch, with code restarts and the discriminator on: every
//! rank sees every micro-batch's codes and reconstructions. The flex build refuses the launch.
//! On either build, `vqgan train` killed with SIGKILL after a checkpoint resumes to the
//! uninterrupted run's weights.

use std::path::{Path, PathBuf};
use std::process::Command;

use manifests::testing::{
    assert_resumed, assert_same_training, assert_succeeded, finish, kill_after_checkpoint,
    launch_ranks, lone_command,
};

fn bin() -> PathBuf {
    manifests::testing::bin_dir(env!("CARGO_BIN_EXE_vqgan"))
}

/// `vqgan ARGS... --out OUT`, not yet started.
fn vqgan(args: &[&str], out: &Path) -> Command {
    let mut command = lone_command(bin().join("vqgan"));
    command.args(args).arg("--out").arg(out);
    command
}

#[test]
fn two_processes_train_both_vqgan_stages_as_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let steps = manifests::testing::few_step_pipeline(60, 4);
    manifests::testing::run_stages(&bin(), dir.path(), &steps[..2]);
    let pairs = dir.path().join("pairs");
    let pairs = pairs.to_str().unwrap();
    // Code restarts every other step, and the discriminator (small) from step 2.
    let config = dir.path().join("vqgan.toml");
    std::fs::write(
        &config,
        "restart_every = 2\nrestart_window = 2\nlog_every = 1\n\n[loss]\n\
         adversarial_weight = 0.1\nadversarial_start = 2\n\
         discriminator_channels = 8\ndiscriminator_max_channels = 16\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let stage1 = [
        "train", "--pairs", pairs, "--steps", "5", "--config", config,
    ];

    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let outputs = finish(launch_ranks(2, || vqgan(&stage1, &two)));
    if nn::backend::backend_name() != "tch" {
        let (succeeded, message) = &outputs[0];
        assert!(!succeeded, "{message}");
        assert!(message.contains("--features nn/tch"), "{message}");
        return;
    }
    assert_succeeded(&outputs);
    assert_succeeded(&finish(vec![vqgan(&stage1, &one).spawn().unwrap()]));
    let log = std::fs::read_to_string(one.join("metrics.jsonl")).unwrap();
    assert!(
        log.contains("\"discriminator\""),
        "the critic never trained: {log}"
    );
    assert_same_training(&one, &two);

    let one_uri = one.to_str().unwrap();
    let stage2 = [
        "finetune-decoder",
        "--vqgan",
        one_uri,
        "--pairs",
        pairs,
        "--steps",
        "3",
    ];
    let (one, two) = (
        dir.path().join("decoder-one"),
        dir.path().join("decoder-two"),
    );
    assert_succeeded(&finish(launch_ranks(2, || vqgan(&stage2, &two))));
    assert_succeeded(&finish(vec![vqgan(&stage2, &one).spawn().unwrap()]));
    assert_same_training(&one, &two);
}

#[test]
fn a_process_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights() {
    let dir = tempfile::tempdir().unwrap();
    let steps = manifests::testing::few_step_pipeline(40, 4);
    manifests::testing::run_stages(&bin(), dir.path(), &steps[..2]);
    let pairs = dir.path().join("pairs");
    // Code restarts and the discriminator on, so their state must resume too.
    let config = dir.path().join("vqgan.toml");
    std::fs::write(
        &config,
        "batch_size = 4\ncheckpoint_every = 2\nrestart_every = 2\nrestart_window = 2\n\
         log_every = 1\n\n[loss]\nadversarial_weight = 0.1\nadversarial_start = 3\n\
         discriminator_channels = 8\ndiscriminator_max_channels = 16\n",
    )
    .unwrap();
    let args = [
        "train",
        "--pairs",
        pairs.to_str().unwrap(),
        "--steps",
        "16",
        "--config",
        config.to_str().unwrap(),
    ];
    let reference = dir.path().join("reference");
    assert_succeeded(&finish(vec![vqgan(&args, &reference).spawn().unwrap()]));
    let killed = dir.path().join("killed");
    kill_after_checkpoint(vqgan(&args, &killed), &killed);
    assert_resumed(&finish(vec![vqgan(&args, &killed).spawn().unwrap()]));
    assert_same_training(&killed, &reference);
}
