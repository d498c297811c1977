//! Sampling and evaluation: the token sampler's filters, the shapes scorer on pictures whose
//! facts are known, and `generate` end to end on a small trained model (cached and uncached
//! sampling agree token for token; files and the JSON record are written).

use std::path::PathBuf;
use std::sync::OnceLock;

use infer::eval::{accuracy, eval_objects, read_picture};
use infer::sample::{Generator, Row, SamplingConfig, SamplingSettings, sample_token};
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

/// The sampler as first written: every token's exponential, then one walk of the draw.
fn plain_draw(logits: &[f32], temperature: f32, rng: &mut impl rand::Rng) -> usize {
    let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from(((l - best) / temperature).exp()))
        .collect();
    let mut draw = rng.random::<f64>() * weights.iter().sum::<f64>();
    let mut last = 0;
    for (token, &weight) in weights.iter().enumerate() {
        if weight > 0.0 {
            last = token;
        }
        draw -= weight;
        if draw <= 0.0 && weight > 0.0 {
            return token;
        }
    }
    last
}

#[test]
fn skipping_exponentials_that_round_to_zero_draws_the_same_tokens() {
    // Wide logits at low temperatures: most exponents fall below f32's smallest number.
    let mut source = ChaCha8Rng::seed_from_u64(7);
    for temperature in [0.05f32, 0.1, 0.5, 1.0] {
        for _ in 0..200 {
            let logits: Vec<f32> = (0..2048)
                .map(|_| rand::Rng::random_range(&mut source, -30.0f32..30.0))
                .collect();
            let config = SamplingConfig {
                temperature: f64::from(temperature),
                ..SamplingConfig::default()
            };
            let seed = rand::Rng::random::<u64>(&mut source);
            let (mut ours, mut plain) = (
                ChaCha8Rng::seed_from_u64(seed),
                ChaCha8Rng::seed_from_u64(seed),
            );
            assert_eq!(
                sample_token(&logits, &config, &mut ours),
                plain_draw(&logits, temperature, &mut plain),
                "temperature {temperature}"
            );
        }
    }
}

/// Logits no weight can be drawn from (an infinite best, from a model gone wrong) still give the
/// most likely token, with or without filters, not token 0 or the first candidate.
#[test]
fn a_row_without_drawable_weight_takes_its_most_likely_token() {
    let logits = [0.0f32, 1.0, f32::INFINITY, 2.0, -1.0];
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (top_k, top_p) in [(0, 1.0), (3, 1.0), (0, 0.9), (3, 0.9)] {
        let config = SamplingConfig {
            top_k,
            top_p,
            ..SamplingConfig::default()
        };
        assert_eq!(
            sample_token(&logits, &config, &mut rng),
            2,
            "top-k {top_k}, top-p {top_p}"
        );
    }
    let too_cold = SamplingConfig {
        temperature: 1e-50,
        ..SamplingConfig::default()
    };
    assert!(
        too_cold.validate().is_err(),
        "a temperature that is 0 in f32"
    );
}

#[test]
fn unfiltered_and_top_k_draws_follow_the_softmax() {
    // Probabilities 1/7, 2/7, 4/7 at temperature 1, whatever order the sampler walks them in.
    let logits = [0.0f32, 2f32.ln(), 4f32.ln()];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let plain = SamplingConfig::default();
    let draws = 14_000;
    let mut counts = [0usize; 3];
    for _ in 0..draws {
        counts[sample_token(&logits, &plain, &mut rng)] += 1;
    }
    for (token, &count) in counts.iter().enumerate() {
        let p = f64::from(1u32 << token) / 7.0;
        let expected = p * draws as f64;
        let sigma = (draws as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (count as f64 - expected).abs() < 5.0 * sigma,
            "token {token}: {count} draws, expected {expected:.0}"
        );
    }
    // Top-2 of four: the two largest in the ratio 1:2, never the others.
    let logits = [2f32.ln(), -3.0, 4f32.ln(), -1.0];
    let top2 = SamplingConfig {
        top_k: 2,
        ..SamplingConfig::default()
    };
    let mut counts = [0usize; 4];
    for _ in 0..draws {
        counts[sample_token(&logits, &top2, &mut rng)] += 1;
    }
    assert_eq!(counts[1] + counts[3], 0);
    let share = counts[2] as f64 / draws as f64;
    assert!(
        (share - 2.0 / 3.0).abs() < 0.02,
        "share of the best: {share}"
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
    // A prompt's samples do not depend on the prompts beside it, nor on their settings.
    let alone = generator.sample_tokens(&prompts[1..], &config).unwrap();
    assert_eq!(
        alone[..],
        cached[2..],
        "batched with another prompt, other tokens"
    );
    let hot = SamplingConfig {
        temperature: 3.0,
        guidance_scale: 1.0,
        top_k: 7,
        seed: 99,
        ..config.clone()
    };
    let rows: Vec<Row> = [
        (prompts[0], &hot),
        (prompts[1], &config),
        (prompts[0], &config),
    ]
    .iter()
    .flat_map(|&(prompt, settings)| {
        (0..2).map(move |stream| Row {
            prompt,
            settings,
            stream,
        })
    })
    .collect();
    let mixed = generator.sample_rows(&rows, true).unwrap();
    assert_eq!(
        mixed[2..4],
        cached[2..],
        "other settings beside it changed a row"
    );
    assert_eq!(mixed[4..], cached[..2]);
    assert_ne!(
        mixed[..2],
        cached[..2],
        "the hot row's own settings were not used"
    );

    let out = dir.join("generated");
    let settings = SamplingSettings {
        settings: config.clone(),
        source: "the test".into(),
    };
    let record = infer::generate_to(
        &generator,
        &infer::PromptList::from_texts(&prompts),
        &settings,
        out.to_str().unwrap(),
        manifests::ShardSpec::single(),
        infer::generate::PROMPTS_PER_CHUNK,
    )
    .unwrap()
    .index
    .unwrap();
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
    assert_eq!(saved["settings_from"], "the test");
    assert!(saved["manifests"].as_array().unwrap().len() >= 3);
}

#[test]
fn eval_publishes_per_attribute_accuracy() {
    let dir = trained();
    let parti = dir.join("parti").to_str().unwrap().to_string();
    let out = dir.join("eval");
    let config = infer::EvalConfig {
        prompts: 3,
        captions: 6,
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
    assert_eq!(manifest.metrics["data"], "shapes");
    // The caption evaluation beside the shapes metrics: six distinct held-out captions, the
    // generated and the real pictures each scored against all six.
    let captions = &manifest.metrics["captions"];
    assert_eq!(captions["captions"], 6, "{captions}");
    assert!((captions["chance_top1"].as_f64().unwrap() - 1.0 / 6.0).abs() < 1e-9);
    for side in ["generated", "real"] {
        let similarity = captions[side]["similarity"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&similarity), "{captions}");
        let (top1, top5) = (
            captions[side]["retrieval_top1"].as_f64().unwrap(),
            captions[side]["retrieval_top5"].as_f64().unwrap(),
        );
        assert!(0.0 <= top1 && top1 <= top5 && top5 <= 1.0, "{captions}");
    }
    let lines = std::fs::read_to_string(out.join("captions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    assert!(out.join("captions.png").exists());
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

/// Runs the `infer` binary; its stdout and stderr.
fn infer(args: &[&str]) -> (String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_infer"))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    );
    assert!(
        output.status.success(),
        "infer {args:?}:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn generate_at_its_defaults_samples_as_eval_does() {
    let dir = trained();
    let parti = dir.join("parti");
    let parti = parti.to_str().unwrap();
    let eval_out = dir.join("eval-defaults");
    let eval_out = eval_out.to_str().unwrap();
    let (_, said) = infer(&[
        "eval",
        "--parti",
        parti,
        "--out",
        eval_out,
        "--prompts",
        "8",
    ]);
    assert!(said.contains("train.parti recommendation"), "{said}");
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{eval_out}/manifest.json")).unwrap())
            .unwrap();
    // The model's own settings: the tiny preset's recommendation, recorded by `train parti`.
    let recommended: serde_json::Value = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(format!("{parti}/manifest.json")).unwrap(),
    )
    .unwrap()["config"]["sampling"]
        .clone();
    assert_eq!(recommended["temperature"], 0.1);
    assert_eq!(eval["config"]["sampling"], recommended);

    let objects = eval_objects(8);
    let prompts: Vec<String> = objects.iter().map(infer::eval::prompt).collect();
    let out = dir.join("generate-defaults");
    let out = out.to_str().unwrap();
    let mut args = vec!["generate", "--parti", parti, "--out", out];
    for prompt in &prompts {
        args.extend(["--prompt", prompt.as_str()]);
    }
    infer(&args);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{out}/generations.json")).unwrap()).unwrap();
    assert_eq!(
        record["settings"], recommended,
        "generate's defaults are not eval's"
    );
    assert!(
        record["settings_from"]
            .as_str()
            .unwrap()
            .starts_with("train.parti recommendation"),
        "{}",
        record["settings_from"]
    );
    // The same pictures, read by the same scorer, prompt by prompt.
    let readings: Vec<_> = (0..prompts.len())
        .map(|p| {
            let png = image::open(format!("{out}/prompt-{p:03}-sample-0.png"))
                .unwrap()
                .to_rgb8();
            read_picture(png.as_raw(), 64)
        })
        .collect();
    let eval_readings = std::fs::read_to_string(format!("{eval_out}/readings.jsonl")).unwrap();
    assert_eq!(
        eval_readings.lines().count(),
        prompts.len(),
        "{eval_readings}"
    );
    for (line, reading) in eval_readings.lines().zip(&readings) {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let read = reading.map(|r| {
            serde_json::json!({"color": COLORS[r.color].0, "shape": SHAPES[r.shape],
                "position": POSITIONS[r.position]})
        });
        assert_eq!(line["read"], serde_json::json!(read), "{}", line["prompt"]);
    }
    let all = accuracy(&objects, &readings).all;
    let eval_all = eval["metrics"]["all_accuracy"].as_f64().unwrap();
    assert!(
        (all - eval_all).abs() <= 0.03,
        "generate {all:.3} vs eval {eval_all:.3}"
    );

    // Pointed at the evaluation, generate says it samples with the settings eval measured.
    let measured = dir.join("generate-measured");
    let (_, said) = infer(&[
        "generate",
        "--parti",
        parti,
        "--sampling-from",
        eval_out,
        "--temperature",
        "0.5",
        "--prompt",
        "a red circle",
        "--out",
        measured.to_str().unwrap(),
    ]);
    assert!(said.contains("infer.eval measured settings"), "{said}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(measured.join("generations.json")).unwrap()).unwrap();
    let from = record["settings_from"].as_str().unwrap();
    assert!(
        from.starts_with("infer.eval measured settings")
            && from.ends_with("command-line overrides"),
        "{from}"
    );
    assert_eq!(record["settings"]["temperature"], 0.5);
    assert_eq!(record["settings"]["guidance_scale"], 1.1);
}

#[test]
fn generate_without_prompts_draws_held_out_captions() {
    let dir = trained();
    let parti = dir.join("parti");
    let out = dir.join("generate-held-out");
    let (_, said) = infer(&[
        "generate",
        "--parti",
        parti.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "1",
    ]);
    assert!(said.contains("held-out captions"), "{said}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generations.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = record["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    // Distinct captions of the data's held-out rows (the shapes data here).
    assert_eq!(prompts.len(), 4, "{prompts:?}");
    let mut distinct = prompts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{prompts:?}");
    assert!(
        prompts.iter().all(|p| infer::eval::is_shapes_caption(p)),
        "{prompts:?}"
    );
}

#[test]
fn generate_upscale_writes_enlarged_pictures_and_records_the_model() {
    let dir = trained();
    let superres = common::superres(dir);
    let out = dir.join("generate-upscaled");
    let (said, warned) = infer(&[
        "generate",
        "--parti",
        dir.join("parti").to_str().unwrap(),
        "--upscale",
        superres.to_str().unwrap(),
        "--prompt",
        "a red circle at the top left",
        "--prompt",
        "a blue square in the center",
        "--samples",
        "2",
        "--keep",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(said.contains("generations.json"), "{said}");
    // The grid shows every sample at the tokenizer's size, kept ones first.
    let grid = |p: usize| image::open(out.join(format!("prompt-{p:03}-grid.png"))).unwrap();
    assert_eq!((grid(0).width(), grid(0).height()), (128, 64));
    // Each enlarged picture is its own sample enlarged: close to that sample's bicubic
    // enlargement (the model adds detail to bicubic, little after two steps), far from the
    // other prompt's.
    let bicubic = |p: usize, rank: u32| {
        grid(p).crop_imm(64 * rank, 0, 64, 64).resize_exact(
            256,
            256,
            image::imageops::FilterType::CatmullRom,
        )
    };
    for p in 0..2 {
        for rank in 0..2 {
            let picture =
                image::open(out.join(format!("prompt-{p:03}-sample-{rank}.png"))).unwrap();
            assert_eq!((picture.width(), picture.height()), (256, 256));
            let own = common::mean_abs_difference(&picture, &bicubic(p, rank));
            let unrelated = common::mean_abs_difference(&picture, &bicubic(1 - p, 0));
            assert!(
                own < 0.02 && own * 4.0 < unrelated,
                "prompt {p}, rank {rank}: {own} from its own sample enlarged, {unrelated} from \
                 the other prompt's"
            );
        }
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generations.json")).unwrap()).unwrap();
    assert_eq!(record["image_size"], 256);
    assert_eq!(record["upscaled_by"]["from"], 64);
    assert_eq!(record["upscaled_by"]["to"], 256);
    let manifest = record["upscaled_by"]["manifest"].as_str().unwrap();
    assert!(manifest.ends_with("superres/manifest.json") || manifest.contains("superres"));
    assert!(
        record["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["uri"] == manifest),
        "{record}"
    );

    // The upscaler learned the pictures of the VQGAN decoding here: no warning.
    assert!(!warned.contains("another tokenizer"), "{warned}");

    // A model for another picture size (the same weights, its config saying 32 px) is refused
    // by name before its weights are read.
    let other_size = dir.join("superres-32px");
    let config = manifests::testing::copy_stage_with_config(&superres, &other_size, |config| {
        config["input_size"] = serde_json::json!(32);
    });
    assert!(config.contains("32"), "{config}");
    let refused = |upscale: &std::path::Path, expected: &str| {
        let (code, text) = manifests::testing::output_of(
            env!("CARGO_BIN_EXE_infer"),
            &[
                "generate",
                "--parti",
                dir.join("parti").to_str().unwrap(),
                "--upscale",
                upscale.to_str().unwrap(),
                "--prompt",
                "a red circle",
                "--out",
                dir.join("generate-refused").to_str().unwrap(),
            ],
        );
        assert_ne!(code, 0, "{text}");
        assert!(text.contains("--upscale"), "{text}");
        assert!(text.contains(expected), "{text}");
    };
    refused(
        &other_size,
        "the super-resolution model enlarges 32 px pictures, the VQGAN makes 64 px",
    );
    // A config describing a model larger than its weights is refused before it is built.
    let oversized = dir.join("superres-oversized");
    manifests::testing::copy_stage_with_config(&superres, &oversized, |config| {
        config["channels"] = serde_json::json!(1_000_000);
    });
    refused(&oversized, "more than its");

    // A decoder fine-tuned from the same VQGAN makes pictures of the same size, but not the
    // ones the upscaler learned to enlarge: it is used, with a warning naming the VQGAN it
    // learned from.
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_infer"));
    manifests::testing::run_stages(
        &bin,
        dir,
        &[
            "vqgan finetune-decoder --preset tiny --vqgan D/vqgan --pairs D/pairs \
           --out D/vqgan-decoder --steps 1 --batch-size 2",
        ],
    );
    let (said, warned) = infer(&[
        "generate",
        "--parti",
        dir.join("parti").to_str().unwrap(),
        "--vqgan",
        dir.join("vqgan-decoder").to_str().unwrap(),
        "--upscale",
        superres.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--out",
        dir.join("generate-other-decoder").to_str().unwrap(),
    ]);
    let text = said + &warned;
    assert!(
        text.contains("another tokenizer")
            && text.contains(dir.join("vqgan/manifest.json").to_str().unwrap()),
        "{text}"
    );
}

/// Every picture below `dir` (by name) and its bytes.
fn pictures(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "png"))
        .map(|path| {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

/// `generations.json` without its timings.
fn index_without_timings(dir: &std::path::Path) -> serde_json::Value {
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("generations.json")).unwrap()).unwrap();
    let object = index.as_object_mut().unwrap();
    object.remove("seconds").unwrap();
    object.remove("sampling_seconds").unwrap();
    index
}

/// Two indexes alike, their rerank scores within a millionth: a prompt sampled in another
/// batch draws the same pictures, but on libtorch the reranker's products over another batch
/// may round a score's last bits differently.
fn assert_same_index(actual: &serde_json::Value, expected: &serde_json::Value) {
    fn alike(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-6
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| alike(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| alike(v, w)))
            }
            _ => a == b,
        }
    }
    assert!(alike(actual, expected), "{actual}\n!=\n{expected}");
}

#[test]
fn a_prompt_list_resumes_and_is_shared_across_jobs_with_the_pictures_of_one_run() {
    let dir = trained();
    let parti = dir.join("parti");
    let parti = parti.to_str().unwrap();
    // PartiPrompts' layout: a TSV with the prompt and columns of its own. 40 prompts: three
    // chunks of 16, 16 and 8.
    let objects = eval_objects(40);
    let mut rows: Vec<(String, String)> = objects
        .iter()
        .map(|object| {
            (
                infer::eval::prompt(object),
                SHAPES[object.shape].to_string(),
            )
        })
        .collect();
    let write_list = |name: &str, rows: &[(String, String)]| {
        let mut tsv = String::from("Prompt\tCategory\n");
        for (prompt, category) in rows {
            tsv += &format!("{prompt}\t{category}\n");
        }
        let path = dir.join(name);
        std::fs::write(&path, tsv).unwrap();
        path.to_str().unwrap().to_string()
    };
    let list = write_list("prompts.tsv", &rows);
    let generate = |list: &str, out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--parti",
            parti,
            "--prompts-file",
            list,
            "--samples",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        infer(&args).0
    };
    let chunk_records = |out: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(out.join("chunks"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };

    let whole = dir.join("list-whole");
    let said = generate(&list, &whole, &[]);
    assert!(
        said.contains(
            "40 prompts in 3 chunks; of this job's 3 chunks, 0 done before, 3 sampled now"
        ),
        "{said}"
    );
    let index = index_without_timings(&whole);
    let listed = index["prompts"].as_array().unwrap();
    assert_eq!(listed.len(), 40);
    for (p, (entry, (prompt, category))) in listed.iter().zip(&rows).enumerate() {
        assert_eq!(entry["index"], p);
        assert_eq!(entry["prompt"], prompt.as_str());
        assert_eq!(entry["fields"]["Category"], category.as_str());
        assert_eq!(
            entry["kept"][0]["file"],
            format!("prompt-{p:03}-sample-0.png")
        );
    }
    assert!(
        index["prompts_from"]["uri"]
            .as_str()
            .unwrap()
            .ends_with("prompts.tsv")
    );
    // The rerank scores summed up, over the list and by category, as the listed scores give them.
    let best = |entry: &serde_json::Value| entry["kept"][0]["score"].as_f64().unwrap();
    let summary = &index["rerank_summary"];
    assert_eq!(summary["prompts"], 40);
    let mean = listed.iter().map(best).sum::<f64>() / 40.0;
    assert!((summary["mean_best_score"].as_f64().unwrap() - mean).abs() < 1e-12);
    for shape in SHAPES {
        let of_shape: Vec<f64> = listed
            .iter()
            .filter(|entry| entry["fields"]["Category"] == shape)
            .map(best)
            .collect();
        let by_shape = &summary["by_field"]["Category"][shape];
        assert_eq!(by_shape["prompts"], of_shape.len(), "{shape}");
        let mean = of_shape.iter().sum::<f64>() / of_shape.len() as f64;
        assert!((by_shape["mean_best_score"].as_f64().unwrap() - mean).abs() < 1e-12);
    }
    let expected = pictures(&whole);
    assert_eq!(expected.len(), 80, "a kept picture and a grid per prompt");

    // Other chunks (7 prompts, so each prompt beside others than before): the same pictures,
    // and what the 16-prompt chunks did counts as done.
    let rechunked = dir.join("list-rechunked");
    let said = generate(&list, &rechunked, &["--chunk-prompts", "7"]);
    assert!(said.contains("40 prompts in 6 chunks"), "{said}");
    assert!(
        pictures(&rechunked) == expected,
        "the chunking changed the pictures"
    );
    let said = generate(&list, &whole, &["--chunk-prompts", "7"]);
    assert!(
        said.contains("of this job's 6 chunks, 6 done before, 0 sampled now"),
        "{said}"
    );
    assert_same_index(&index_without_timings(&whole), &index);
    // A record outlives pictures another run rewrote: after a job with other settings rewrote
    // prompts 0-15 and 32-39 of `rechunked`, its 7-prompt records still name them. A job of
    // the first settings takes its own chunk (16-31) as done, but not the list: the files of
    // the others no longer match those records.
    let other = ["--seed", "5", "--temperature", "1.0"];
    let said = generate(
        &list,
        &rechunked,
        &[&other[..], &["--shard-index", "0", "--num-shards", "2"]].concat(),
    );
    assert!(
        said.contains("of this job's 2 chunks, 0 done before, 2 sampled now"),
        "{said}"
    );
    let said = generate(
        &list,
        &rechunked,
        &["--shard-index", "1", "--num-shards", "2"],
    );
    assert!(
        said.contains("of this job's 1 chunks, 1 done before, 0 sampled now"),
        "{said}"
    );
    assert!(said.contains("1 of 3 chunks of the list done"), "{said}");
    assert!(!rechunked.join("generations.json").exists());

    // Two jobs of a batch array: the first samples chunks 0 and 2 and, the list unfinished,
    // writes no index; the second samples chunk 1 and writes the one the whole run wrote.
    let shared = dir.join("list-shared");
    let said = generate(&list, &shared, &["--shard-index", "0", "--num-shards", "2"]);
    assert!(
        said.contains("job 0 of 2: 40 prompts in 3 chunks; of this job's 2 chunks, 0 done before, 2 sampled now"),
        "{said}"
    );
    assert!(said.contains("2 of 3 chunks of the list done"), "{said}");
    assert_eq!(
        chunk_records(&shared),
        ["prompts-000000-000016.json", "prompts-000032-000040.json"]
    );
    assert!(!shared.join("generations.json").exists());
    let said = generate(&list, &shared, &["--shard-index", "1", "--num-shards", "2"]);
    assert!(
        said.contains("of this job's 1 chunks, 0 done before, 1 sampled now"),
        "{said}"
    );
    assert!(said.contains("40 prompts -> "), "{said}");
    assert!(
        pictures(&shared) == expected,
        "the jobs drew other pictures"
    );
    assert_same_index(&index_without_timings(&shared), &index);
    // The list grown by 8 prompts: a job whose one chunk is still done samples nothing, but
    // the index of the shorter list no longer describes the folder.
    let mut grown = rows.clone();
    grown.extend(rows[..8].iter().cloned());
    let grown = write_list("prompts-grown.tsv", &grown);
    let said = generate(
        &grown,
        &shared,
        &["--shard-index", "0", "--num-shards", "3"],
    );
    assert!(
        said.contains(
            "48 prompts in 3 chunks; of this job's 1 chunks, 1 done before, 0 sampled now"
        ),
        "{said}"
    );
    assert!(!shared.join("generations.json").exists());

    // A copy of the whole run's folder, without its index or with it.
    let copy_of_whole = |name: &str, with_index: bool| {
        let copy = dir.join(name);
        std::fs::create_dir_all(copy.join("chunks")).unwrap();
        let files = std::fs::read_dir(&whole)
            .unwrap()
            .chain(std::fs::read_dir(whole.join("chunks")).unwrap());
        for file in files {
            let path = file.unwrap().path();
            if path.is_file() && (with_index || !path.ends_with("generations.json")) {
                std::fs::copy(&path, copy.join(path.strip_prefix(&whole).unwrap())).unwrap();
            }
        }
        copy
    };

    // A job with nothing to sample keeps a current index, until it finds another job's chunk
    // no longer done (its record gone): then the index no longer describes the folder.
    let withdrawn = copy_of_whole("list-withdrawn", true);
    std::fs::remove_file(withdrawn.join("chunks/prompts-000032-000040.json")).unwrap();
    let said = generate(
        &list,
        &withdrawn,
        &["--shard-index", "1", "--num-shards", "2"],
    );
    assert!(
        said.contains("of this job's 1 chunks, 1 done before, 0 sampled now"),
        "{said}"
    );
    assert!(said.contains("2 of 3 chunks of the list done"), "{said}");
    assert!(!withdrawn.join("generations.json").exists());

    // A run killed mid-list: chunk 1's record never written, a file of chunk 2 cut short, no
    // index yet. Chunk 1 is sampled again, and of chunk 2 only the prompt whose file is cut.
    let resumed = copy_of_whole("list-resumed", false);
    std::fs::remove_file(resumed.join("chunks/prompts-000016-000032.json")).unwrap();
    let cut = resumed.join("prompt-035-grid.png");
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let modified = |name: &str| {
        std::fs::metadata(resumed.join(name))
            .unwrap()
            .modified()
            .unwrap()
    };
    let untouched = [
        "prompt-000-sample-0.png",
        "prompt-034-grid.png",
        "prompt-036-sample-0.png",
    ]
    .map(|name| (name, modified(name)));
    let rewritten = [(
        "prompt-035-sample-0.png",
        modified("prompt-035-sample-0.png"),
    )];
    let said = generate(&list, &resumed, &[]);
    assert!(
        said.contains("of this job's 3 chunks, 1 done before, 2 sampled now"),
        "{said}"
    );
    assert!(
        pictures(&resumed) == expected,
        "the resumed run drew other pictures"
    );
    assert_same_index(&index_without_timings(&resumed), &index);
    for (name, time) in untouched {
        assert_eq!(modified(name), time, "{name} was done and sampled again");
    }
    for (name, time) in rewritten {
        assert_ne!(modified(name), time, "{name} was not sampled again");
    }

    // The list edited: a prompt of chunk 1 changed (that chunk alone is sampled again) and a
    // category of chunk 0 corrected (the index says so, nothing is sampled for it).
    let before = (
        modified("prompt-000-grid.png"),
        modified("prompt-020-grid.png"),
    );
    assert_ne!(rows[20].0, "a green triangle");
    rows[20].0 = "a green triangle".into();
    rows[3].1 = "corrected".into();
    let edited = write_list("prompts-edited.tsv", &rows);
    let said = generate(&edited, &resumed, &[]);
    assert!(
        said.contains("of this job's 3 chunks, 2 done before, 1 sampled now"),
        "{said}"
    );
    let edited_index = index_without_timings(&resumed);
    assert_eq!(edited_index["prompts"][20]["prompt"], rows[20].0.as_str());
    assert_eq!(
        edited_index["prompts"][3]["fields"]["Category"],
        "corrected"
    );
    assert_eq!(modified("prompt-000-grid.png"), before.0);
    assert_ne!(modified("prompt-020-grid.png"), before.1);
    let now = pictures(&resumed);

    // Other settings: nothing done before counts, and the first job withdraws the index of the
    // old settings, which no longer describes the pictures.
    let other_settings = |job: &str| {
        let flags = [
            "--seed",
            "5",
            "--temperature",
            "1.0",
            "--num-shards",
            "2",
            "--shard-index",
            job,
        ];
        generate(&edited, &resumed, &flags)
    };
    let said = other_settings("0");
    assert!(
        said.contains("of this job's 2 chunks, 0 done before, 2 sampled now"),
        "{said}"
    );
    assert!(!resumed.join("generations.json").exists());
    let said = other_settings("1");
    assert!(said.contains("0 done before, 1 sampled now"), "{said}");
    assert_eq!(index_without_timings(&resumed)["settings"]["seed"], 5);
    assert!(pictures(&resumed) != now);

    // A list without a prompt column is refused by name before the models load.
    let bad = dir.join("no-prompts.tsv");
    std::fs::write(&bad, "id\tdescription\n1\ta red circle\n").unwrap();
    let (code, text) = manifests::testing::output_of(
        env!("CARGO_BIN_EXE_infer"),
        &[
            "generate",
            "--parti",
            parti,
            "--prompts-file",
            bad.to_str().unwrap(),
            "--out",
            dir.join("list-refused").to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("no-prompts.tsv: no column named prompt, caption or text"),
        "{text}"
    );
}

/// Model configs that cannot be built, in otherwise consistent stages: a zero that divides, a
/// size that is no multiple of another, widths the weights do not have. Each is refused
/// naming the stage and the field, before any model is built from it (no assertion fails, no
/// allocation of a model its weights cannot fill).
#[test]
fn model_configs_that_cannot_be_built_are_refused_by_name() {
    type Edit = fn(&mut serde_json::Value);
    let dir = trained();
    let cases: [(&str, Edit, &str); 9] = [
        ("vqgan", |c| c["patch_size"] = 0.into(), "patch_size is 0"),
        (
            "vqgan",
            |c| c["patch_size"] = 7.into(),
            "image_size (64) is not a multiple of patch_size (7)",
        ),
        ("parti", |c| c["n_heads"] = 0.into(), "n_heads is 0"),
        (
            "parti",
            |c| c["dropout"] = 1.0.into(),
            "dropout is 1, not within [0, 1)",
        ),
        (
            "parti",
            |c| c["grid"] = 512.into(),
            "grid is 512, not within 1..=256",
        ),
        ("parti", |c| c["d_model"] = 4096.into(), "more than its"),
        (
            "text-encoder",
            |c| c["contrastive"]["image_tower"]["n_heads"] = 5.into(),
            "image_tower.d_model (96) is not a multiple of image_tower.n_heads (5)",
        ),
        (
            "text-encoder",
            |c| c["text_encoder"]["vocab_size"] = (1u64 << 40).into(),
            "text_encoder.vocab_size is 1099511627776",
        ),
        (
            "text-encoder",
            |c| c["contrastive"]["text_d_model"] = 64.into(),
            "contrastive.text_d_model (64) is not text_encoder.d_model (128)",
        ),
    ];
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    for (case, (stage, edit, expected)) in cases.into_iter().enumerate() {
        let broken = dir.join(format!("broken-{case}-{stage}"));
        manifests::testing::copy_stage_with_config(&dir.join(stage), &broken, edit);
        let broken = broken.to_str().unwrap().to_string();
        let (parti, vqgan, text_encoder) = match stage {
            "vqgan" => (path("parti"), broken.clone(), path("text-encoder")),
            "parti" => (broken.clone(), path("vqgan"), path("text-encoder")),
            _ => (path("parti"), path("vqgan"), broken.clone()),
        };
        let refused = Generator::load(&parti, Some(&vqgan), Some(&text_encoder), "cpu");
        let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains(expected) && error.contains(&broken),
            "{stage}: {expected:?} in {error:?}"
        );
    }
}
