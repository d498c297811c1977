//! `infer eval` on any data: for held-out captions, the picture the model generates and the real
//! picture are both scored against every held-out caption by the contrastive text-image model of
//! the `train text-encoder` stage (the reranker). Two readings follow, each beside the same
//! reading of the real pictures (what a perfect generator would reach under this scorer):
//!
//! - similarity: the mean cosine between a picture and its own caption;
//! - retrieval: the share of pictures whose own caption is among the `k` captions most similar to
//!   them (top-1 and top-5), against chance (`k / captions`).
//!
//! The generated picture is the one the reranker kept, so the scorer has already chosen among the
//! samples once: compare models under the same sampling settings, not with other scorers.

use serde::Serialize;

/// The first `limit` distinct captions of `captions`: their indices (the first row of each).
pub fn distinct(captions: &[String], limit: usize) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    captions
        .iter()
        .enumerate()
        .filter(|(_, caption)| seen.insert(caption.as_str()))
        .map(|(i, _)| i)
        .take(limit)
        .collect()
}

/// Where picture `i`'s own caption (caption `i`) ranks among all `n` captions by `similarity`
/// (`[pictures, captions]`, row-major): 0 is first. Ties count against it.
pub fn own_rank(similarity: &[f32], n: usize, i: usize) -> usize {
    let row = &similarity[i * n..(i + 1) * n];
    let own = row[i];
    row.iter()
        .enumerate()
        .filter(|&(j, &s)| j != i && s >= own)
        .count()
}

/// How the pictures of one side match their captions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Matching {
    /// Mean cosine similarity between a picture and its own caption.
    pub similarity: f64,
    /// Share of pictures whose own caption is the most similar of all.
    pub retrieval_top1: f64,
    /// Share whose own caption is among the five most similar.
    pub retrieval_top5: f64,
}

/// [`Matching`] of `n` pictures against their `n` captions.
pub fn matching(similarity: &[f32], n: usize) -> Matching {
    let count = n.max(1) as f64;
    let ranks: Vec<usize> = (0..n).map(|i| own_rank(similarity, n, i)).collect();
    let within = |k: usize| ranks.iter().filter(|&&rank| rank < k).count() as f64 / count;
    Matching {
        similarity: (0..n)
            .map(|i| f64::from(similarity[i * n + i]))
            .sum::<f64>()
            / count,
        retrieval_top1: within(1),
        retrieval_top5: within(5),
    }
}

/// The caption evaluation's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionScores {
    /// Distinct held-out captions scored.
    pub captions: usize,
    pub generated: Matching,
    /// The real held-out pictures of the same captions.
    pub real: Matching,
    pub chance_top1: f64,
    pub chance_top5: f64,
    /// `true` when the data held nothing out and training rows stood in.
    pub training_rows_stood_in: bool,
}

/// Scores from the `[pictures, captions]` similarities of the generated and the real pictures.
pub fn scores(
    generated: &[f32],
    real: &[f32],
    n: usize,
    training_rows_stood_in: bool,
) -> CaptionScores {
    let chance = |k: usize| k.min(n) as f64 / n.max(1) as f64;
    CaptionScores {
        captions: n,
        generated: matching(generated, n),
        real: matching(real, n),
        chance_top1: chance(1),
        chance_top5: chance(5),
        training_rows_stood_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_retrieval_count_what_they_say() {
        // Picture 0 prefers its caption, 1 prefers caption 0, 2 ties its own with caption 0.
        let similarity = [
            0.9, 0.1, 0.2, //
            0.8, 0.5, 0.1, //
            0.4, 0.0, 0.4,
        ];
        assert_eq!(own_rank(&similarity, 3, 0), 0);
        assert_eq!(own_rank(&similarity, 3, 1), 1);
        assert_eq!(own_rank(&similarity, 3, 2), 1);
        let m = matching(&similarity, 3);
        assert!((m.retrieval_top1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.retrieval_top5 - 1.0).abs() < 1e-12);
        assert!((m.similarity - (0.9 + 0.5 + 0.4) / 3.0).abs() < 1e-6);
        let s = scores(&similarity, &similarity, 3, false);
        assert!((s.chance_top1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.chance_top5 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn distinct_keeps_the_first_of_each_caption() {
        let captions: Vec<String> = ["a", "b", "a", "c", "b", "d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(distinct(&captions, 10), vec![0, 1, 3, 5]);
        assert_eq!(distinct(&captions, 2), vec![0, 1]);
    }
}
