//! [`TextTokenizer`]: the SentencePiece text tokenizer (a Unigram model, as Parti used) that
//! `train tokenizer` publishes, as the text encoder and the transformer use it.
//!
//! The tokenizer is a `tokenizers` tokenizer.json: NFKC normalisation, whitespace as the `▁`
//! meta symbol (prepended to every word, SentencePiece style) and a Metaspace decoder, so
//! `decode(encode(x)) == NFKC(x)` for text made of known characters. The special tokens have
//! fixed ids: `<pad>`=0, `<unk>`=1, `<s>`=2, `</s>`=3, `<mask>`=4. Truncation to `max_length` is
//! stored in the file, so it travels with the tokenizer.

use rayon::prelude::*;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{NormalizedString, Normalizer, Tokenizer};

use crate::Error;
use manifests::Upstream;

/// The artifact kind of a tokenizers `tokenizer.json`.
pub const TOKENIZER_KIND: &str = "tokenizer/json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const MASK: &str = "<mask>";
/// The special tokens, in the order of their fixed ids (0..5) in a trained tokenizer.
pub const SPECIAL_TOKENS: [&str; 5] = [PAD, UNK, BOS, EOS, MASK];
/// SentencePiece's whitespace symbol.
pub const META_SPACE: char = '▁';

pub fn tokenizer_error(context: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{context}: {e}"))
}

/// The pre-tokenizer and decoder of every parti tokenizer: SentencePiece's `▁` before each word.
pub fn metaspace() -> Metaspace {
    Metaspace::new(META_SPACE, PrependScheme::Always, true)
}

/// A trained (or adopted) tokenizer with the ids of its special tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad: u32,
    unk: u32,
    bos: u32,
    eos: u32,
    mask: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// A tokenizer.json as `train tokenizer` writes it: it must hold the five special tokens
    /// and a truncation `max_length`. Padding settings in the file are ignored.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Self::load(TOKENIZER_FILE, bytes)
    }

    /// The `tokenizer/json` artifact of a `train tokenizer` manifest, digest-checked.
    pub fn from_manifest(stage: &Upstream) -> Result<Self, Error> {
        let uri = stage.location.uri();
        let artifact = stage
            .artifacts_of_kind(TOKENIZER_KIND)
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::Data(format!(
                    "{uri}: no '{TOKENIZER_KIND}' artifact (is this a `train tokenizer` manifest? it is '{}')",
                    stage.manifest.stage
                ))
            })?;
        let location = stage.artifact_location(artifact)?.uri();
        Self::load(&location, &stage.read_artifact(artifact)?)
    }

    /// `name` (the file) is what errors name.
    fn load(name: &str, bytes: &[u8]) -> Result<Self, Error> {
        let inner = Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Data(format!("{name}: not a tokenizers tokenizer.json: {e}")))?;
        Self::from_tokenizer(name, inner)
    }

    pub fn from_tokenizer(name: &str, mut inner: Tokenizer) -> Result<Self, Error> {
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                Error::Data(format!(
                    "{name}: has no '{token}' token (a parti tokenizer has {})",
                    SPECIAL_TOKENS.join(" ")
                ))
            })
        };
        let (pad, unk, bos, eos, mask) = (id(PAD)?, id(UNK)?, id(BOS)?, id(EOS)?, id(MASK)?);
        let max_length = match inner.get_truncation() {
            Some(truncation) if truncation.max_length > 0 => truncation.max_length,
            Some(_) => return Err(Error::Data(format!("{name}: truncation.max_length is 0"))),
            None => {
                return Err(Error::Data(format!(
                    "{name}: no truncation.max_length (tokenizers written by `train tokenizer` keep it there)"
                )));
            }
        };
        inner.with_padding(None);
        Ok(TextTokenizer {
            inner,
            max_length,
            pad,
            unk,
            bos,
            eos,
            mask,
        })
    }

    /// Ids of `text`, cut to [`max_length`](Self::max_length), not padded; `<s>`/`</s>` around
    /// it when the tokenizer was built with `add_bos_eos`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(tokenizer_error("encoding"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Row-major `[texts.len(), length]` ids (each text as [`encode`](Self::encode) gives it,
    /// cut to `length`, padded with the pad id) and a mask that is true on real tokens.
    pub fn encode_batch_padded(
        &self,
        texts: &[&str],
        length: usize,
    ) -> Result<(Vec<u32>, Vec<bool>), Error> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(tokenizer_error("encoding a batch"))?;
        let mut ids = vec![self.pad; texts.len() * length];
        let mut mask = vec![false; texts.len() * length];
        for (row, encoding) in encodings.iter().enumerate() {
            for (column, id) in encoding.get_ids().iter().take(length).enumerate() {
                ids[row * length + column] = *id;
                mask[row * length + column] = true;
            }
        }
        Ok((ids, mask))
    }

    /// Text of `ids`, leaving out pad, bos, eos and mask; unknown pieces read `<unk>`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        let vocab_size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|id| **id as usize >= vocab_size) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
        let skip = [self.pad, self.bos, self.eos, self.mask];
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !skip.contains(id))
            .collect();
        self.inner
            .decode(&kept, false)
            .map_err(tokenizer_error("decoding"))
    }

    /// `text` as the tokenizer's normaliser (NFKC for trained tokenizers) sees it.
    pub fn normalize(&self, text: &str) -> Result<String, Error> {
        let mut normalized = NormalizedString::from(text);
        if let Some(normalizer) = self.inner.get_normalizer() {
            normalizer
                .normalize(&mut normalized)
                .map_err(tokenizer_error("normalising"))?;
        }
        Ok(normalized.get().to_string())
    }

    /// Pieces, special tokens included (ids run from 0 to `vocab_size - 1`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn unk_id(&self) -> u32 {
        self.unk
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn mask_id(&self) -> u32 {
        self.mask
    }

    /// The five special tokens' ids, for MLM masking.
    pub fn special_ids(&self) -> crate::text_encoder::SpecialIds {
        crate::text_encoder::SpecialIds {
            pad: self.pad,
            unk: self.unk,
            bos: self.bos,
            eos: self.eos,
            mask: self.mask,
        }
    }

    /// Most ids [`encode`](Self::encode) returns for one text.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The tokenizer.json text (what `train tokenizer` publishes).
    pub fn to_json(&self) -> Result<String, Error> {
        self.inner
            .to_string(true)
            .map_err(tokenizer_error("serialising tokenizer.json"))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Mean ids per text and the share of unk ids over `texts`, without truncation and without
    /// bos/eos.
    pub fn sample_metrics<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<(f64, f64), Error> {
        let mut untruncated = self.inner.clone();
        untruncated
            .with_truncation(None)
            .map_err(tokenizer_error("clearing truncation"))?;
        let counts = texts
            .par_iter()
            .map(|text| {
                let encoding = untruncated
                    .encode(text.as_ref(), false)
                    .map_err(tokenizer_error("encoding the metric sample"))?;
                let ids = encoding.get_ids();
                let unk = ids.iter().filter(|id| **id == self.unk).count();
                Ok((ids.len() as u64, unk as u64))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let tokens: u64 = counts.iter().map(|(n, _)| n).sum();
        let unk: u64 = counts.iter().map(|(_, u)| u).sum();
        let mean = if texts.is_empty() {
            0.0
        } else {
            tokens as f64 / texts.len() as f64
        };
        let rate = if tokens == 0 {
            0.0
        } else {
            unk as f64 / tokens as f64
        };
        Ok((mean, rate))
    }
}
