//! A model's sampling settings, as Hugging Face's `generation_config.json` carries them: `train
//! parti` records the preset's recommendation in its manifest (`config.sampling`), `infer eval`
//! records the settings it measured in its own, and `infer generate` / `serve` start from
//! whichever of the two they are pointed at ([`SamplingSettings::from_manifest`]).

use manifests::Upstream;
use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// `logits = uncond + scale * (cond - uncond)`; 1 turns guidance off (Parti: 1.2).
    pub guidance_scale: f64,
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f64,
    /// Samples per prompt (Parti: 16, reranked).
    pub samples: usize,
    /// Kept per prompt after reranking.
    pub keep: usize,
    pub seed: u64,
    /// Use the KV cache (false: recompute the whole prefix each step, for comparison).
    pub use_cache: bool,
}

/// The paper's settings (Parti: guidance 1.2, 16 samples reranked); what a manifest that records
/// none is sampled with.
impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            guidance_scale: 1.2,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            samples: 4,
            keep: 1,
            seed: 0,
            use_cache: true,
        }
    }
}

/// The lowest temperature accepted.
pub const MIN_TEMPERATURE: f64 = 1e-4;

impl SamplingConfig {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Usage(what.to_string()));
        if !(0.0..=20.0).contains(&self.guidance_scale) {
            return bad("guidance_scale must be within 0..=20");
        }
        // The sampler divides by the temperature in f32: anything much smaller would round to
        // 0 there (every logit but the best divided by 0), and 1e-4 is already greedy.
        if !(self.temperature >= MIN_TEMPERATURE && self.temperature <= 10.0) {
            return bad("temperature must be within [0.0001, 10]");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be within (0, 1]");
        }
        if self.samples == 0 || self.samples > 64 {
            return bad("samples must be within 1..=64");
        }
        if self.keep == 0 || self.keep > self.samples {
            return bad("keep must be within 1..=samples");
        }
        Ok(())
    }

    /// Whether the unconditional stream is needed (guidance scale other than 1).
    pub fn guided(&self) -> bool {
        (self.guidance_scale - 1.0).abs() > f64::EPSILON
    }
}

/// Sampling settings and where they came from, so every output can say which it used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingSettings {
    pub settings: SamplingConfig,
    /// E.g. `train.parti recommendation (runs/default/parti/manifest.json)`.
    pub source: String,
}

impl SamplingSettings {
    /// The settings a `train parti` manifest recommends or an `infer eval` manifest measured
    /// (`config.sampling` of either); [`SamplingConfig::default`] for a manifest that records
    /// none (written before models carried their settings).
    pub fn from_manifest(stage: &Upstream) -> Result<SamplingSettings, Error> {
        let uri = stage.location.uri();
        let what = match stage.manifest.stage.as_str() {
            "train.parti" => "train.parti recommendation",
            "infer.eval" => "infer.eval measured settings",
            other => {
                return Err(Error::Usage(format!(
                    "{uri}: a {other} manifest carries no sampling settings; point at a train.parti or infer.eval manifest"
                )));
            }
        };
        let Some(recorded) = stage.manifest.config.get("sampling") else {
            return Ok(SamplingSettings {
                settings: SamplingConfig::default(),
                source: format!("defaults ({uri} records no sampling settings)"),
            });
        };
        let settings: SamplingConfig = serde_json::from_value(recorded.clone())
            .map_err(|e| Error::Data(format!("{uri}: config.sampling: {e}")))?;
        settings
            .validate()
            .map_err(|e| Error::Data(format!("{uri}: config.sampling: {e}")))?;
        let source = match stage
            .manifest
            .metrics
            .get("all_accuracy")
            .and_then(|v| v.as_f64())
        {
            Some(accuracy) => format!("{what} ({uri}, all-accuracy {accuracy:.3})"),
            None => format!("{what} ({uri})"),
        };
        Ok(SamplingSettings { settings, source })
    }
}
