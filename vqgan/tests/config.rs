//! The stage configs' presets and the keys that override the model preset without changing a
//! preset run's config hash.

use nn::backend;
use vqgan::config::TrainConfig;

/// The config as a run writes it (and hashes it).
fn written(config: &TrainConfig) -> String {
    serde_json::to_string(config).unwrap()
}

#[test]
fn the_codebook_size_can_be_set_without_changing_the_presets_config_hash() {
    let tiny = TrainConfig::preset("tiny").unwrap();
    assert_eq!(tiny.codebook_size, Some(2048));
    assert_eq!(tiny.model_config().unwrap().quantizer.codebook_size, 2048);
    let preset = TrainConfig::preset("small").unwrap();
    assert_eq!(preset.model_config().unwrap().quantizer.codebook_size, 8192);
    // Unset, the field is not written, so runs made before it existed stay up to date.
    assert!(!written(&preset).contains("codebook_size"));
    let larger = TrainConfig {
        codebook_size: Some(16384),
        ..preset.clone()
    };
    assert_eq!(
        larger.model_config().unwrap().quantizer.codebook_size,
        16384
    );
    for size in [0, 1, 65537] {
        let error = TrainConfig {
            codebook_size: Some(size),
            ..preset.clone()
        }
        .model_config()
        .unwrap_err();
        assert!(error.to_string().contains("codebook_size"), "{error}");
    }
}

#[test]
fn the_neighbour_convolutions_can_be_set_without_changing_the_presets_config_hash() {
    let tiny = TrainConfig::preset("tiny").unwrap();
    assert_eq!(tiny.model_config().unwrap().decoder.local_convs, 2);
    assert_eq!(tiny.model_config().unwrap().encoder.local_convs, 0);
    let preset = TrainConfig::preset("small").unwrap();
    assert_eq!(preset.model_config().unwrap().decoder.local_convs, 0);
    assert!(!written(&preset).contains("decoder_local_convs"));
}

#[test]
fn the_code_dimension_can_be_set_without_changing_the_presets_config_hash() {
    let preset = TrainConfig::preset("tiny").unwrap();
    assert_eq!(preset.model_config().unwrap().quantizer.code_dim, 32);
    assert!(!written(&preset).contains("code_dim"));
    let wider = TrainConfig {
        code_dim: Some(64),
        ..preset.clone()
    };
    let config = wider.model_config().unwrap();
    assert_eq!(config.quantizer.code_dim, 64);
    let model = config.init(&backend::device("cpu").unwrap());
    assert_eq!(model.quantizer.codebook.val().dims(), [2048, 64]);
    // The lookup space is a projection of the encoder's 128 channels.
    for dim in [0, 129] {
        let error = TrainConfig {
            code_dim: Some(dim),
            ..preset.clone()
        }
        .model_config()
        .unwrap_err();
        assert!(error.to_string().contains("code_dim"), "{error}");
    }
}

/// `grad_clip` (which norm `grad_clip_norm` bounds) is read from a config file by every VQGAN
/// training stage, refused by name when misspelt, and not written when it is the default.
#[test]
fn the_gradient_clipping_scope_is_a_config_key() {
    use nn::training::GradClip;
    use vqgan::superres::SuperResStageConfig;
    let dir = tempfile::tempdir().unwrap();
    let file = |text: &str| {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let preset = TrainConfig::preset("tiny").unwrap();
    assert!(!written(&preset).contains("grad_clip\""));
    let global = file("grad_clip = \"global\"\n");
    let read: TrainConfig =
        manifests::config::layered(&preset, Some(&global), serde_json::json!({})).unwrap();
    assert_eq!(read.grad_clip, GradClip::Global);
    assert!(written(&read).contains("\"grad_clip\":\"global\""));
    let superres = SuperResStageConfig::preset("tiny").unwrap();
    let read: SuperResStageConfig =
        manifests::config::layered(&superres, Some(&global), serde_json::json!({})).unwrap();
    assert_eq!(read.grad_clip, GradClip::Global);

    let misspelt = file("grad_clip = \"sideways\"\n");
    let error = manifests::config::layered(&preset, Some(&misspelt), serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("grad_clip") && error.contains("global"),
        "{error}"
    );
}

/// `vqgan encode` draws nothing at random and has no presets: `--seed` and `--preset` are
/// refused by name, not ignored.
#[test]
fn encode_refuses_a_seed_and_a_preset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tokens");
    for (flag, value) in [("--seed", "3"), ("--preset", "tiny")] {
        let (code, text) = manifests::testing::output_of(
            env!("CARGO_BIN_EXE_vqgan"),
            &[
                "encode",
                "--vqgan",
                "no-vqgan",
                "--pairs",
                "no-pairs",
                "--out",
                out.to_str().unwrap(),
                flag,
                value,
            ],
        );
        assert_ne!(code, 0, "{text}");
        assert!(
            text.contains(flag) && text.contains("vqgan encode"),
            "{text}"
        );
        assert!(!out.exists());
    }
}
