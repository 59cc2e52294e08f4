//! The learned out-of-scope detector.
//!
//! A small logistic regression over nine numbers that describe how the intent model reacts to a
//! text ([`SCOPE_FEATURES`]): the calibrated top probability, the margin between the two best,
//! the normalised entropy, the top logit, the energy (log-sum-exp of the logits), the word and
//! character n-gram coverage, the cosine of the logits to the nearest intent prototype
//! ([`Prototypes`]), and how strongly the predicted intent attracted out-of-scope text during
//! training.
//!
//! It is trained with pseudo out-of-scope examples made from the training set alone. The
//! intents are dealt into a few groups; for each group a model is trained without it, on the
//! calibration split. That model scores the group's examples (intents it never saw: pseudo out
//! of scope) and the held-out examples of the other intents it classifies correctly (pseudo in
//! scope). Coverage is measured against the terms that model was trained on, so an unseen
//! intent's own words count as unknown, as real out-of-scope words would. The calibration
//! model's correctly classified held-out examples are added as further in-scope examples.
//! Misclassified in-scope examples are left out: rejecting them costs no in-scope accuracy.

use serde::{Deserialize, Serialize};

use crate::calibration::{fit_temperature, softmax};
use crate::dataset::SplitMix64;
use crate::error::{NluError, NluResult};
use crate::features::{SparseMatrix, Vectoriser};
use crate::linear::{LinearOptions, fit_softmax};
use crate::prototypes::Prototypes;

/// Number of inputs of the detector.
pub const SCOPE_FEATURES: usize = 9;

/// Number of inputs of the detector of stored models of format 2 (without the prototypes).
const SCOPE_FEATURES_V2: usize = 8;

/// Ridge penalty of the detector's logistic regression (on standardised inputs).
const RIDGE: f64 = 1e-3;

/// How to train the out-of-scope detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeDetectorOptions {
    /// Groups the intents are dealt into; one extra model is trained per group (0 switches the
    /// detector off: the calibrated confidence alone decides).
    pub groups: usize,
    /// Most L-BFGS iterations of each group's model (trained from zero; on BANKING77 they
    /// converge after about 40, and the detector learned after 30 is as good, after 12 worse).
    pub iterations: u32,
    /// Fewest intents for a detector; with fewer, the calibrated confidence alone decides.
    pub min_intents: usize,
    /// Fewest training examples for a detector. With fewer, the calibrated confidence alone
    /// decides: the held-out examples that set the threshold are too few to place it on the
    /// detector's sharper scale (a dozen intents with six examples each rejected plain
    /// paraphrases).
    pub min_examples: usize,
}

impl Default for ScopeDetectorOptions {
    fn default() -> Self {
        Self {
            groups: 3,
            iterations: 30,
            min_intents: 4,
            min_examples: 1000,
        }
    }
}

impl ScopeDetectorOptions {
    pub(crate) fn validate(self) -> NluResult<()> {
        if self.groups == 1 {
            return Err(NluError::InvalidArgument(
                "the out-of-scope detector needs at least two groups (0 switches it off)".into(),
            ));
        }
        if self.groups > 0 && (self.iterations == 0 || self.min_intents < 3) {
            return Err(NluError::InvalidArgument(
                "the out-of-scope detector needs iterations >= 1 and min_intents >= 3".into(),
            ));
        }
        Ok(())
    }
}

/// The trained detector, stored with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeDetector {
    mean: [f32; SCOPE_FEATURES],
    scale: [f32; SCOPE_FEATURES],
    weights: [f32; SCOPE_FEATURES],
    bias: f32,
    /// Per intent: `ln((n + 1) / (N / intents + 1))`, where `n` pseudo out-of-scope examples of
    /// `N` were predicted as the intent.
    attraction: Vec<f32>,
    /// Pseudo out-of-scope examples trained on.
    pub pseudo_out_of_scope: usize,
    /// Pseudo in-scope examples trained on.
    pub pseudo_in_scope: usize,
    /// Groups the intents were dealt into.
    pub groups: usize,
    /// The intent prototypes of the model the detector serves.
    prototypes: Prototypes,
}

/// The detector as stored by models of format 2: no prototype input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ScopeDetectorV2 {
    mean: [f32; SCOPE_FEATURES_V2],
    scale: [f32; SCOPE_FEATURES_V2],
    weights: [f32; SCOPE_FEATURES_V2],
    bias: f32,
    attraction: Vec<f32>,
    pseudo_out_of_scope: usize,
    pseudo_in_scope: usize,
    groups: usize,
}

impl From<ScopeDetectorV2> for ScopeDetector {
    /// The same decisions: the prototype input gets a weight of 0.
    fn from(v2: ScopeDetectorV2) -> Self {
        let widen = |values: [f32; SCOPE_FEATURES_V2], prototype: f32| {
            let mut out = [0.0; SCOPE_FEATURES];
            out[..PROTOTYPE].copy_from_slice(&values[..PROTOTYPE]);
            out[PROTOTYPE] = prototype;
            out[ATTRACTION] = values[SCOPE_FEATURES_V2 - 1];
            out
        };
        Self {
            mean: widen(v2.mean, 0.0),
            scale: widen(v2.scale, 1.0),
            weights: widen(v2.weights, 0.0),
            bias: v2.bias,
            attraction: v2.attraction,
            pseudo_out_of_scope: v2.pseudo_out_of_scope,
            pseudo_in_scope: v2.pseudo_in_scope,
            groups: v2.groups,
            prototypes: Prototypes::default(),
        }
    }
}

/// What the detector reads from one prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ScopeInputs {
    /// The best intent.
    pub best: usize,
    /// The detector's inputs, without the attraction of the best intent.
    pub values: [f32; SCOPE_FEATURES],
}

/// Index of the prototype similarity among the inputs.
const PROTOTYPE: usize = SCOPE_FEATURES - 2;

/// Index of the attraction among the inputs.
const ATTRACTION: usize = SCOPE_FEATURES - 1;

/// Computes the inputs from raw `logits`, the `temperature`, the coverage of the text and the
/// logits' similarity to the model's prototypes. `probabilities` is scratch space of the same
/// length as `logits`; it holds the calibrated probabilities afterwards.
pub(crate) fn scope_inputs(
    logits: &[f32],
    temperature: f32,
    coverage: (f32, f32),
    prototype: f32,
    probabilities: &mut [f32],
) -> ScopeInputs {
    softmax(logits, temperature, probabilities);
    let (mut best, mut second) = (0, usize::MAX);
    for i in 1..probabilities.len() {
        if probabilities[i] > probabilities[best] {
            second = best;
            best = i;
        } else if second == usize::MAX || probabilities[i] > probabilities[second] {
            second = i;
        }
    }
    let top = probabilities[best];
    let runner_up = probabilities.get(second).copied().unwrap_or(0.0);
    let entropy: f32 = probabilities
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -p * p.ln())
        .sum();
    let spread = (entropy / (probabilities.len().max(2) as f32).ln()).clamp(0.0, 1.0);
    let max_logit = logits[best];
    let energy = max_logit
        + logits
            .iter()
            .map(|&z| (z - max_logit).exp())
            .sum::<f32>()
            .ln();
    ScopeInputs {
        best,
        values: [
            top,
            top - runner_up,
            spread,
            max_logit,
            energy,
            coverage.0,
            coverage.1,
            prototype,
            0.0,
        ],
    }
}

impl ScopeDetector {
    /// Returns the cosine of `logits` to the nearest prototype of the model's intents.
    pub(crate) fn prototype_similarity(&self, logits: &[f32]) -> f32 {
        self.prototypes.similarity(logits)
    }

    /// Sets the prototypes of the model the detector serves.
    pub(crate) fn set_prototypes(&mut self, prototypes: Prototypes) {
        self.prototypes = prototypes;
    }

    /// Returns the prototypes of the model's intents.
    pub fn prototypes(&self) -> &Prototypes {
        &self.prototypes
    }

    /// Returns the probability that a text is in scope.
    pub(crate) fn in_scope_probability(&self, inputs: &ScopeInputs) -> f32 {
        let mut values = inputs.values;
        values[ATTRACTION] = self.attraction.get(inputs.best).copied().unwrap_or(0.0);
        let mut z = self.bias;
        for (i, v) in values.iter().enumerate() {
            z += self.weights[i] * (v - self.mean[i]) / self.scale[i];
        }
        // The regression predicts "out of scope"; in scope is its complement.
        1.0 / (1.0 + z.exp())
    }

    /// Checks a detector read from storage against the number of intents.
    pub(crate) fn check(&self, intents: usize) -> NluResult<()> {
        let finite = |values: &[f32]| values.iter().all(|v| v.is_finite());
        if self.attraction.len() != intents
            || !finite(&self.mean)
            || !finite(&self.weights)
            || !finite(&self.attraction)
            || !self.bias.is_finite()
            || !self.scale.iter().all(|s| s.is_finite() && *s > 0.0)
        {
            return Err(NluError::InvalidModel(
                "the out-of-scope detector does not fit the model".to_owned(),
            ));
        }
        self.prototypes.check(intents)
    }
}

/// What the detector is trained from.
pub(crate) struct ScopeTrainingSet<'a> {
    pub vectoriser: &'a Vectoriser,
    /// Normalised texts of every example.
    pub texts: &'a [String],
    /// Features of every example.
    pub x: &'a SparseMatrix,
    /// Intent ids of every example.
    pub y: &'a [u32],
    pub intents: usize,
    /// Rows the calibration model was trained on.
    pub fit_rows: &'a [usize],
    /// Rows held out from it.
    pub held_rows: &'a [usize],
    /// Inputs of the held-out rows under the calibration model (with its prototypes), in
    /// `held_rows` order.
    pub held_inputs: &'a [ScopeInputs],
    pub linear: &'a LinearOptions,
    pub seed: u64,
}

/// Trains the detector; `None` when the set is too small to make pseudo out-of-scope examples.
/// Its prototypes are left empty: the caller sets those of the final model.
pub(crate) fn fit_detector(
    set: &ScopeTrainingSet<'_>,
    options: ScopeDetectorOptions,
) -> NluResult<Option<ScopeDetector>> {
    let intents = set.intents;
    if options.groups < 2
        || intents < options.min_intents.max(3)
        || set.y.len() < options.min_examples
    {
        return Ok(None);
    }
    let groups = options.groups.min(intents);
    let mut order: Vec<usize> = (0..intents).collect();
    SplitMix64::new(set.seed ^ 0x5C0F_E5C0_F35C_0F35).shuffle(&mut order);
    let mut group_of = vec![0; intents];
    for (position, &intent) in order.iter().enumerate() {
        group_of[intent] = position % groups;
    }
    let features = set.vectoriser.dimension();
    // (inputs, out of scope, group, predicted intent)
    let mut rows: Vec<([f32; SCOPE_FEATURES], bool, usize, usize)> = Vec::new();
    let mut attracted = vec![vec![0_usize; intents]; groups];
    let mut probabilities = Vec::new();
    let mut logits = Vec::new();
    for (group, attracted) in attracted.iter_mut().enumerate() {
        let kept: Vec<usize> = (0..intents).filter(|&i| group_of[i] != group).collect();
        let mut local = vec![u32::MAX; intents];
        for (new, &old) in kept.iter().enumerate() {
            local[old] = new as u32;
        }
        let train_rows: Vec<usize> = set
            .fit_rows
            .iter()
            .copied()
            .filter(|&r| local[set.y[r] as usize] != u32::MAX)
            .collect();
        if train_rows.is_empty() {
            return Ok(None);
        }
        let gx = set.x.select(&train_rows);
        let gy: Vec<u32> = train_rows
            .iter()
            .map(|&r| local[set.y[r] as usize])
            .collect();
        let options = LinearOptions {
            max_iterations: options.iterations,
            ..set.linear.clone()
        };
        let (model, _) = fit_softmax(&gx, &gy, features, kept.len(), &options, None)?;
        let own_labels: Vec<usize> = gy.iter().map(|&l| l as usize).collect();
        let prototypes = Prototypes::fit(&model.all_logits(&gx), &own_labels, model.classes());
        let mut known = vec![false; features];
        for r in 0..gx.rows() {
            for &j in gx.row(r).0 {
                known[j as usize] = true;
            }
        }
        let in_scope: Vec<usize> = set
            .held_rows
            .iter()
            .copied()
            .filter(|&r| local[set.y[r] as usize] != u32::MAX)
            .collect();
        let row_logits = |r: usize, out: &mut Vec<f32>| {
            let (indices, values) = set.x.row(r);
            out.resize(model.classes(), 0.0);
            model.logits(indices, values, out);
        };
        let mut held_logits = Vec::with_capacity(in_scope.len());
        for &r in &in_scope {
            row_logits(r, &mut logits);
            held_logits.push(logits.clone());
        }
        let held_labels: Vec<usize> = in_scope
            .iter()
            .map(|&r| local[set.y[r] as usize] as usize)
            .collect();
        let temperature = fit_temperature(&held_logits, &held_labels);
        probabilities.resize(model.classes(), 0.0);
        let coverage = |r: usize| {
            set.vectoriser
                .coverage_where(&set.texts[r], |i| known[i as usize])
        };
        for ((&r, row), &label) in in_scope.iter().zip(&held_logits).zip(&held_labels) {
            let similarity = prototypes.similarity(row);
            let inputs = scope_inputs(
                row,
                temperature,
                coverage(r),
                similarity,
                &mut probabilities,
            );
            if inputs.best == label {
                rows.push((inputs.values, false, group, kept[inputs.best]));
            }
        }
        for r in (0..set.y.len()).filter(|&r| group_of[set.y[r] as usize] == group) {
            row_logits(r, &mut logits);
            let similarity = prototypes.similarity(&logits);
            let inputs = scope_inputs(
                &logits,
                temperature,
                coverage(r),
                similarity,
                &mut probabilities,
            );
            attracted[kept[inputs.best]] += 1;
            rows.push((inputs.values, true, group, kept[inputs.best]));
        }
    }
    // How strongly each intent attracted pseudo out-of-scope text: from the other groups'
    // models for the examples above (as at prediction time, the intent's own pseudo
    // out-of-scope counts must not describe the examples they came from), from all of them
    // for the stored detector.
    let attraction = |skip: Option<usize>, intent: usize| -> f32 {
        let (mut n, mut total) = (0, 0);
        for (group, counts) in attracted.iter().enumerate() {
            if Some(group) != skip {
                n += counts[intent];
                total += counts.iter().sum::<usize>();
            }
        }
        ((n as f64 + 1.0) / (total as f64 / intents as f64 + 1.0)).ln() as f32
    };
    for (values, _, group, best) in &mut rows {
        values[ATTRACTION] = attraction(Some(*group), *best);
    }
    let stored_attraction: Vec<f32> = (0..intents).map(|i| attraction(None, i)).collect();
    let mut data: Vec<([f32; SCOPE_FEATURES], bool)> = rows
        .into_iter()
        .map(|(values, out, _, _)| (values, out))
        .collect();
    for (inputs, &r) in set.held_inputs.iter().zip(set.held_rows) {
        if inputs.best == set.y[r] as usize {
            let mut values = inputs.values;
            values[ATTRACTION] = stored_attraction[inputs.best];
            data.push((values, false));
        }
    }
    let pseudo_out_of_scope = data.iter().filter(|(_, out)| *out).count();
    let pseudo_in_scope = data.len() - pseudo_out_of_scope;
    if pseudo_out_of_scope == 0 || pseudo_in_scope == 0 {
        return Ok(None);
    }
    let (mean, scale) = standardisation(&data);
    let standardised: Vec<([f64; SCOPE_FEATURES], bool)> = data
        .iter()
        .map(|(values, out)| {
            let mut z = [0.0; SCOPE_FEATURES];
            for i in 0..SCOPE_FEATURES {
                z[i] = f64::from((values[i] - mean[i]) / scale[i]);
            }
            (z, *out)
        })
        .collect();
    let (weights, bias) = fit_logistic(&standardised);
    Ok(Some(ScopeDetector {
        mean,
        scale,
        weights: weights.map(|w| w as f32),
        bias: bias as f32,
        attraction: stored_attraction,
        pseudo_out_of_scope,
        pseudo_in_scope,
        groups,
        prototypes: Prototypes::default(),
    }))
}

/// Mean and standard deviation of every input (a constant input gets a scale of 1).
fn standardisation(
    data: &[([f32; SCOPE_FEATURES], bool)],
) -> ([f32; SCOPE_FEATURES], [f32; SCOPE_FEATURES]) {
    let n = data.len() as f64;
    let mut mean = [0.0_f64; SCOPE_FEATURES];
    let mut variance = [0.0_f64; SCOPE_FEATURES];
    for (values, _) in data {
        for i in 0..SCOPE_FEATURES {
            mean[i] += f64::from(values[i]) / n;
        }
    }
    for (values, _) in data {
        for i in 0..SCOPE_FEATURES {
            variance[i] += (f64::from(values[i]) - mean[i]).powi(2) / n;
        }
    }
    let scale = variance.map(|v| {
        let sd = v.sqrt();
        if sd > 1e-6 { sd as f32 } else { 1.0 }
    });
    (mean.map(|m| m as f32), scale)
}

/// Logistic regression of "out of scope" on standardised inputs, both classes weighted equally
/// in total, with a small ridge, by Newton's method. Returns the weights and the bias.
// Matrix code reads best with indices.
#[allow(clippy::needless_range_loop)]
fn fit_logistic(data: &[([f64; SCOPE_FEATURES], bool)]) -> ([f64; SCOPE_FEATURES], f64) {
    const D: usize = SCOPE_FEATURES + 1;
    let positives = data.iter().filter(|(_, out)| *out).count() as f64;
    let negatives = data.len() as f64 - positives;
    let half = data.len() as f64 / 2.0;
    let (weight_pos, weight_neg) = (half / positives, half / negatives);
    let input = |values: &[f64; SCOPE_FEATURES], j: usize| {
        if j == SCOPE_FEATURES { 1.0 } else { values[j] }
    };
    let mut theta = [0.0_f64; D];
    for _ in 0..50 {
        let mut gradient = [0.0_f64; D];
        let mut hessian = [[0.0_f64; D]; D];
        for (values, out) in data {
            let z: f64 = (0..D).map(|j| theta[j] * input(values, j)).sum();
            let p = 1.0 / (1.0 + (-z).exp());
            let weight = if *out { weight_pos } else { weight_neg };
            let residual = weight * (p - f64::from(u8::from(*out)));
            let curvature = weight * p * (1.0 - p);
            for j in 0..D {
                let xj = input(values, j);
                gradient[j] += residual * xj;
                for k in j..D {
                    hessian[j][k] += curvature * xj * input(values, k);
                }
            }
        }
        for j in 0..D {
            for k in 0..j {
                hessian[j][k] = hessian[k][j];
            }
            gradient[j] += RIDGE * theta[j];
            hessian[j][j] += RIDGE;
        }
        let step = solve(hessian, gradient);
        for j in 0..D {
            theta[j] -= step[j];
        }
        if step.iter().all(|s| s.abs() < 1e-9) {
            break;
        }
    }
    let mut weights = [0.0; SCOPE_FEATURES];
    weights.copy_from_slice(&theta[..SCOPE_FEATURES]);
    (weights, theta[SCOPE_FEATURES])
}

/// Solves `a · x = b` for a symmetric positive definite `a` (Gaussian elimination with partial
/// pivoting; the ridge keeps it well conditioned).
#[allow(clippy::needless_range_loop)]
fn solve<const D: usize>(mut a: [[f64; D]; D], mut b: [f64; D]) -> [f64; D] {
    for col in 0..D {
        let pivot = (col..D)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let diagonal = a[col][col];
        if diagonal.abs() < 1e-300 {
            continue;
        }
        for row in col + 1..D {
            let factor = a[row][col] / diagonal;
            for k in col..D {
                a[row][k] -= factor * a[col][k];
            }
            b[row] -= factor * b[col];
        }
    }
    let mut x = [0.0; D];
    for row in (0..D).rev() {
        let rest: f64 = (row + 1..D).map(|k| a[row][k] * x[k]).sum();
        x[row] = if a[row][row].abs() < 1e-300 {
            0.0
        } else {
            (b[row] - rest) / a[row][row]
        };
    }
    x
}

#[cfg(test)]
impl ScopeDetector {
    /// The detector as a format-2 model stored it: the prototype input left out.
    pub(crate) fn to_v2(&self) -> ScopeDetectorV2 {
        let narrow = |values: [f32; SCOPE_FEATURES]| {
            let mut out = [0.0; SCOPE_FEATURES_V2];
            out[..PROTOTYPE].copy_from_slice(&values[..PROTOTYPE]);
            out[SCOPE_FEATURES_V2 - 1] = values[ATTRACTION];
            out
        };
        ScopeDetectorV2 {
            mean: narrow(self.mean),
            scale: narrow(self.scale),
            weights: narrow(self.weights),
            bias: self.bias,
            attraction: self.attraction.clone(),
            pseudo_out_of_scope: self.pseudo_out_of_scope,
            pseudo_in_scope: self.pseudo_in_scope,
            groups: self.groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_separates_a_shifted_input() {
        // Out of scope when the first input is low.
        let data: Vec<([f64; SCOPE_FEATURES], bool)> = (0..200)
            .map(|i| {
                let mut values = [0.0; SCOPE_FEATURES];
                values[0] = f64::from(i) / 100.0 - 1.0;
                values[1] = f64::from(i % 7) / 7.0;
                (values, i < 60)
            })
            .collect();
        let (weights, bias) = fit_logistic(&data);
        let score = |x0: f64| {
            let z = weights[0] * x0 + bias;
            1.0 / (1.0 + (-z).exp())
        };
        assert!(weights[0] < 0.0, "{weights:?}");
        assert!(score(-0.9) > 0.9 && score(0.9) < 0.1);
        assert!(weights[1].abs() < weights[0].abs() / 10.0);
    }

    #[test]
    fn inputs_follow_the_logits() {
        let mut probabilities = vec![0.0; 3];
        let sharp = scope_inputs(&[5.0, 0.0, -1.0], 1.0, (1.0, 0.9), 0.9, &mut probabilities);
        let flat = scope_inputs(&[0.1, 0.0, 0.05], 1.0, (0.5, 0.4), 0.3, &mut probabilities);
        assert_eq!(sharp.best, 0);
        assert!(sharp.values[0] > flat.values[0]);
        assert!(sharp.values[1] > flat.values[1]);
        assert!(sharp.values[2] < flat.values[2]);
        assert!((sharp.values[3] - 5.0).abs() < 1e-6);
        assert!(sharp.values[4] >= sharp.values[3]);
        assert_eq!((flat.values[5], flat.values[6]), (0.5, 0.4));
        assert_eq!(
            (sharp.values[PROTOTYPE], flat.values[PROTOTYPE]),
            (0.9, 0.3)
        );
        let solved = solve([[2.0, 1.0], [1.0, 3.0]], [3.0, 5.0]);
        assert!((solved[0] - 0.8).abs() < 1e-12 && (solved[1] - 1.4).abs() < 1e-12);
    }
}
