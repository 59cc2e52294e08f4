//! Intent prototypes in the model's own score space, an input of the out-of-scope detector.
//!
//! A text's logits, scaled to unit length, say how much it resembles every intent at once: an
//! in-scope text has the profile of the examples of its intent, a text between intents (the
//! usual out-of-scope text in one domain: close to several intents, typical of none) has a
//! blend. The examples of each intent are summarised by a few prototypes (spherical k-means over
//! their scaled logits), and a text's similarity is its cosine to the nearest prototype of any
//! intent. On BANKING77 with 10 intents held out this separated held-out intents better than
//! any score of the probabilities (AUROC 0.91–0.92 on validation splits and test, against
//! 0.87 for the calibrated confidence; `docs/nlu.md`).

use serde::{Deserialize, Serialize};

use crate::error::{NluError, NluResult};

/// Prototypes per intent (fewer when an intent has fewer examples).
pub const PROTOTYPES_PER_INTENT: usize = 4;

/// Rounds of k-means.
const ROUNDS: usize = 10;

/// The prototypes of a model's intents (none by default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Prototypes {
    /// The length of one prototype: the model's number of intents.
    dimension: usize,
    /// Unit vectors, one after another.
    vectors: Vec<f32>,
}

impl Prototypes {
    /// Summarises the logits of a model's own training examples (`rows[i]` of intent
    /// `labels[i]`, every row of length `intents`).
    pub fn fit(rows: &[Vec<f32>], labels: &[usize], intents: usize) -> Self {
        let mut vectors = Vec::new();
        let mut members: Vec<Vec<Vec<f32>>> = vec![Vec::new(); intents];
        for (row, &label) in rows.iter().zip(labels) {
            if label < intents && row.len() == intents {
                let mut unit = row.clone();
                if normalise(&mut unit) {
                    members[label].push(unit);
                }
            }
        }
        for points in &members {
            for centre in spherical_k_means(points, PROTOTYPES_PER_INTENT) {
                vectors.extend_from_slice(&centre);
            }
        }
        Self {
            dimension: intents,
            vectors,
        }
    }

    /// The cosine between `logits` and the nearest prototype (0 without prototypes or for
    /// all-zero logits).
    pub fn similarity(&self, logits: &[f32]) -> f32 {
        if logits.len() != self.dimension || self.dimension == 0 {
            return 0.0;
        }
        let norm = logits.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm.is_nan() || norm <= 0.0 {
            return 0.0;
        }
        self.vectors
            .chunks_exact(self.dimension)
            .map(|p| p.iter().zip(logits).map(|(a, b)| a * b).sum::<f32>() / norm)
            .fold(0.0_f32, f32::max)
    }

    /// Number of prototypes.
    pub fn len(&self) -> usize {
        self.vectors.len().checked_div(self.dimension).unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Checks prototypes read from storage against the number of intents.
    pub(crate) fn check(&self, intents: usize) -> NluResult<()> {
        if (self.dimension != intents && !self.vectors.is_empty())
            || (self.dimension > 0 && !self.vectors.len().is_multiple_of(self.dimension))
            || !self.vectors.iter().all(|v| v.is_finite())
        {
            return Err(NluError::InvalidModel(
                "the intent prototypes do not fit the model".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Scales `v` to unit length; false when it is all zeros.
fn normalise(v: &mut [f32]) -> bool {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm <= 0.0 {
        return false;
    }
    for x in v.iter_mut() {
        *x /= norm;
    }
    true
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// At most `k` unit centres of unit `points`, deterministic: the first centre is the point
/// nearest the mean direction, each next one the point farthest from the centres so far, then
/// a few rounds of assigning every point to its nearest centre and re-centring.
fn spherical_k_means(points: &[Vec<f32>], k: usize) -> Vec<Vec<f32>> {
    let Some(first) = points.first() else {
        return Vec::new();
    };
    let k = k.min(points.len());
    let mut mean = vec![0.0; first.len()];
    for p in points {
        for (m, x) in mean.iter_mut().zip(p) {
            *m += x;
        }
    }
    if !normalise(&mut mean) {
        return vec![first.clone()];
    }
    let nearest_mean = points
        .iter()
        .enumerate()
        .max_by(|a, b| dot(a.1, &mean).total_cmp(&dot(b.1, &mean)))
        .map_or(0, |(i, _)| i);
    let mut centres = vec![points[nearest_mean].clone()];
    let mut closeness: Vec<f32> = points.iter().map(|p| dot(p, &centres[0])).collect();
    while centres.len() < k {
        let (farthest, &similarity) = closeness
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .unwrap_or((0, &1.0));
        if similarity >= 1.0 - 1e-6 {
            break;
        }
        centres.push(points[farthest].clone());
        let latest = &centres[centres.len() - 1];
        for (c, p) in closeness.iter_mut().zip(points) {
            *c = c.max(dot(p, latest));
        }
    }
    for _ in 0..ROUNDS {
        let mut sums = vec![vec![0.0_f32; first.len()]; centres.len()];
        for p in points {
            let best = centres
                .iter()
                .enumerate()
                .max_by(|a, b| dot(p, a.1).total_cmp(&dot(p, b.1)))
                .map_or(0, |(i, _)| i);
            for (s, x) in sums[best].iter_mut().zip(p) {
                *s += x;
            }
        }
        let mut moved = false;
        for (centre, mut sum) in centres.iter_mut().zip(sums) {
            // A centre that lost every point keeps its place.
            if normalise(&mut sum) {
                moved |= sum
                    .iter()
                    .zip(centre.iter())
                    .any(|(a, b)| (a - b).abs() > 1e-6);
                *centre = sum;
            }
        }
        if !moved {
            break;
        }
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typical_profile_is_closer_than_a_blend() {
        // Two intents; each one's examples score it high and the other low.
        let rows = vec![
            vec![4.0, -2.0],
            vec![5.0, -1.5],
            vec![3.5, -2.5],
            vec![-2.0, 4.0],
            vec![-1.0, 5.0],
            vec![-2.5, 3.0],
        ];
        let labels = vec![0, 0, 0, 1, 1, 1];
        let prototypes = Prototypes::fit(&rows, &labels, 2);
        assert!(!prototypes.is_empty() && prototypes.len() <= 2 * PROTOTYPES_PER_INTENT);
        let typical = prototypes.similarity(&[4.5, -2.0]);
        let blend = prototypes.similarity(&[1.0, 1.0]);
        assert!(typical > 0.99, "{typical}");
        assert!(blend < typical - 0.1, "{blend} against {typical}");
        assert_eq!(prototypes.similarity(&[0.0, 0.0]), 0.0);
        assert_eq!(prototypes.similarity(&[1.0]), 0.0);
        prototypes.check(2).unwrap();
        assert!(prototypes.check(3).is_err());
    }

    #[test]
    fn k_means_is_deterministic_and_finds_separate_groups() {
        let mut points = Vec::new();
        for i in 0..20 {
            let t = f32::from(u8::try_from(i % 5).unwrap()) * 0.01;
            let mut p = if i < 10 {
                vec![1.0, t, 0.0]
            } else {
                vec![0.0, t, 1.0]
            };
            normalise(&mut p);
            points.push(p);
        }
        let a = spherical_k_means(&points, 2);
        assert_eq!(a, spherical_k_means(&points, 2));
        assert_eq!(a.len(), 2);
        assert!(a.iter().any(|c| c[0] > 0.99) && a.iter().any(|c| c[2] > 0.99));
        // Fewer distinct points than centres asked for: no duplicate centres.
        let same = vec![points[0].clone(), points[0].clone()];
        assert_eq!(spherical_k_means(&same, 4).len(), 1);
    }
}
