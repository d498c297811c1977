//! Sampling and evaluation: the token sampler's filters, the shapes scorer on pictures whose
//! facts are known, and `generate` end to end on a small trained model (cached and uncached
//! sampling agree token for token; files and the JSON record are written).

use std::path::PathBuf;
use std::sync::OnceLock;

use infer::eval::{accuracy, eval_objects, read_picture};
use infer::sample::{Generator, SamplingConfig, sample_token};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shapes::{COLORS, POSITIONS, SHAPES, render};

mod common;

#[test]
fn top_k_top_p_and_temperature_filter_as_documented() {
    let logits = [0.0f32, 3.0, 1.0, 2.9, -1.0];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let greedy = SamplingConfig {
        top_k: 1,
        ..SamplingConfig::default()
    };
    assert!((0..50).all(|_| sample_token(&logits, &greedy, &mut rng) == 1));
    let nucleus = SamplingConfig {
        top_p: 0.4,
        ..SamplingConfig::default()
    };
    // Token 1 alone holds ~0.47 of the mass: p = 0.4 keeps only it.
    assert!((0..50).all(|_| sample_token(&logits, &nucleus, &mut rng) == 1));
    let top2 = SamplingConfig {
        top_k: 2,
        ..SamplingConfig::default()
    };
    let draws: Vec<usize> = (0..400)
        .map(|_| sample_token(&logits, &top2, &mut rng))
        .collect();
    assert!(draws.iter().all(|&t| t == 1 || t == 3));
    assert!(draws.contains(&1) && draws.contains(&3));
    let hot = SamplingConfig {
        temperature: 100.0,
        ..SamplingConfig::default()
    };
    let draws: Vec<usize> = (0..2000)
        .map(|_| sample_token(&logits, &hot, &mut rng))
        .collect();
    assert!((0..5).all(|t| draws.iter().filter(|&&d| d == t).count() > 250));
    assert!(
        SamplingConfig {
            samples: 0,
            ..SamplingConfig::default()
        }
        .validate()
        .is_err()
    );
    assert!(
        SamplingConfig {
            top_p: 0.0,
            ..SamplingConfig::default()
        }
        .validate()
        .is_err()
    );
}

#[test]
fn the_scorer_reads_rendered_shapes_correctly() {
    let objects = eval_objects(COLORS.len() * SHAPES.len() * POSITIONS.len());
    assert_eq!(objects.len(), 216);
    let mut readings = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        // The synth stage's own renderer, with jitter as in the data.
        let jitter = [(
            ((i % 7) as f32 - 3.0) * 0.015,
            ((i % 5) as f32 - 2.0) * 0.02,
            0.9 + (i % 3) as f32 * 0.1,
        )];
        let picture = render(&[*object], 64, &jitter);
        readings.push(read_picture(picture.as_raw(), 64));
    }
    let score = accuracy(&objects, &readings);
    assert_eq!((score.color, score.position), (1.0, 1.0), "{score:?}");
    assert!(score.shape >= 0.95, "{score:?}");
    // A blank picture reads as nothing, which counts as wrong.
    let blank = render(&[], 64, &[]);
    assert_eq!(read_picture(blank.as_raw(), 64), None);
}

#[test]
fn accuracy_is_broken_down_by_shape_and_position() {
    use infer::eval::Reading;
    use shapes::Object;
    let object = |shape, position| Object {
        shape,
        color: 2,
        position,
    };
    let asked = [object(0, 0), object(1, 0), object(1, 4)];
    let read = |o: Object| {
        Some(Reading {
            color: o.color,
            shape: o.shape,
            position: o.position,
        })
    };
    // The square at the top left reads as a circle; the others read right.
    let readings = [read(asked[0]), read(object(0, 0)), read(asked[2])];
    let score = accuracy(&asked, &readings);
    assert_eq!(score.all_by_shape, [Some(1.0), Some(0.5), None]);
    let mut by_position = [None; 9];
    by_position[0] = Some(0.5);
    by_position[4] = Some(1.0);
    assert_eq!(score.all_by_position, by_position);
    assert!((score.all - 2.0 / 3.0).abs() < 1e-12, "{score:?}");
}

#[test]
fn captions_of_the_shapes_data_name_their_object() {
    use infer::eval::caption_object;
    for (i, object) in eval_objects(216).iter().enumerate() {
        let plain = shapes::describe(object);
        let caption = match i % 4 {
            0 => plain.clone(),
            1 => format!("there is {plain}"),
            2 => format!("a picture of {plain}"),
            _ => format!("{plain} on a gray background"),
        };
        assert_eq!(caption_object(&caption), Some(*object), "{caption}");
    }
    assert_eq!(
        caption_object("a red circle at the top and a blue square on the left"),
        None
    );
    assert_eq!(caption_object("a cat on a mat"), None);
}

/// A few-step pipeline up to `train parti` (with a text encoder for reranking).
fn trained() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::trained(true))
}

#[test]
fn cached_and_uncached_sampling_agree_and_generate_writes_images_and_a_record() {
    let dir = trained();
    let parti = dir.join("parti").to_str().unwrap().to_string();
    let generator = Generator::load(&parti, None, None, "cpu").unwrap();
    assert!(
        generator.reranker.is_some(),
        "the text encoder is found through the inputs"
    );
    let prompts = [
        "a red circle at the top left",
        "a blue square in the center",
    ];
    let config = SamplingConfig {
        samples: 2,
        keep: 1,
        seed: 3,
        ..SamplingConfig::default()
    };
    let cached = generator.sample_tokens(&prompts, &config).unwrap();
    let uncached = generator
        .sample_tokens(
            &prompts,
            &SamplingConfig {
                use_cache: false,
                ..config.clone()
            },
        )
        .unwrap();
    assert_eq!(cached, uncached, "the KV cache changed what was sampled");
    assert_eq!(cached.len(), 4);
    assert!(cached.iter().all(|g| g.len() == 64));
    assert_eq!(
        cached,
        generator.sample_tokens(&prompts, &config).unwrap(),
        "same seed, same tokens"
    );

    let out = dir.join("generated");
    let record = infer::generate_to(&generator, &prompts, &config, out.to_str().unwrap()).unwrap();
    let listed = record["prompts"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for (p, entry) in listed.iter().enumerate() {
        assert_eq!(entry["prompt"], prompts[p]);
        let file = entry["kept"][0]["file"].as_str().unwrap();
        let png = image::open(out.join(file)).unwrap();
        assert_eq!((png.width(), png.height()), (64, 64));
        assert_eq!(entry["scores"].as_array().unwrap().len(), 2);
        assert!(out.join(entry["grid"].as_str().unwrap()).exists());
    }
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generations.json")).unwrap()).unwrap();
    assert_eq!(saved["settings"]["samples"], 2);
    assert!(saved["manifests"].as_array().unwrap().len() >= 3);
}

#[test]
fn eval_publishes_per_attribute_accuracy() {
    let dir = trained();
    let parti = dir.join("parti").to_str().unwrap().to_string();
    let out = dir.join("eval");
    let config = infer::EvalConfig {
        prompts: 3,
        sampling: SamplingConfig {
            samples: 2,
            ..SamplingConfig::default()
        },
    };
    let manifest =
        infer::evaluate(&config, &parti, None, out.to_str().unwrap(), "cpu", false).unwrap();
    for name in [
        "color_accuracy",
        "shape_accuracy",
        "position_accuracy",
        "all_accuracy",
    ] {
        let value = manifest.metrics[name].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&value), "{name} {value}");
    }
    assert_eq!(manifest.metrics["prompts"], 3);
    // The breakdown: one entry per shape and position, a share or null where none was asked.
    let by_shape = manifest.metrics["all_accuracy_by_shape"]
        .as_object()
        .unwrap();
    assert_eq!(by_shape.len(), SHAPES.len());
    let by_position = manifest.metrics["all_accuracy_by_position"]
        .as_object()
        .unwrap();
    assert_eq!(by_position.len(), POSITIONS.len());
    let asked: Vec<_> = by_position.values().filter(|v| !v.is_null()).collect();
    assert_eq!(asked.len(), 3, "{by_position:?}");
    for value in by_shape.values().chain(by_position.values()) {
        assert!(
            value.is_null() || (0.0..=1.0).contains(&value.as_f64().unwrap()),
            "{value}"
        );
    }
    assert!(out.join("samples.png").exists());
    // Every stage it reads through the transformer's lineage is an input of its own, so early
    // cutoff below (tokens that stay the same under another decoder) cannot hide a change.
    let mut read: Vec<&str> = manifest.inputs.iter().map(|i| i.name.as_str()).collect();
    read.sort_unstable();
    let expected = [
        "pairs",
        "parti",
        "text_encoder",
        "tokenizer",
        "tokens",
        "vqgan",
    ];
    assert_eq!(read, expected);
    // What the tokenizer alone allows: the data's own images through encode and decode.
    let ceiling = &manifest.metrics["tokenizer_ceiling"];
    assert!(ceiling["images"].as_u64().unwrap() > 0, "{ceiling}");
    assert_eq!(
        ceiling["all_accuracy_by_shape"].as_object().unwrap().len(),
        SHAPES.len()
    );
    for name in [
        "color_accuracy",
        "shape_accuracy",
        "position_accuracy",
        "all_accuracy",
    ] {
        let value = ceiling[name].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&value), "{name} {value}");
    }
    // Decoding with a named VQGAN records it as an input; the same one reads the same.
    let vqgan = dir.join("vqgan").to_str().unwrap().to_string();
    let named = dir.join("eval-named-vqgan");
    let again = infer::evaluate(
        &config,
        &parti,
        Some(&vqgan),
        named.to_str().unwrap(),
        "cpu",
        false,
    )
    .unwrap();
    assert!(
        again
            .inputs
            .iter()
            .any(|input| input.name == "vqgan" && input.stage.as_deref() == Some("vqgan.train")),
        "{:?}",
        again.inputs
    );
    assert_eq!(
        again.metrics["all_accuracy"],
        manifest.metrics["all_accuracy"]
    );
}
