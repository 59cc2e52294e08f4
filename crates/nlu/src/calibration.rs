//! Confidence calibration and the out-of-scope threshold.
//!
//! - Temperature scaling: one positive `T` dividing all logits, chosen to minimise the negative
//!   log-likelihood of held-out examples (golden-section search over `ln T`). It changes how
//!   sure the model claims to be, never which intent ranks first.
//! - The out-of-scope threshold applies to the calibrated top probability and is tuned on
//!   held-out examples by a [`ThresholdRule`].

use serde::{Deserialize, Serialize};

use crate::error::{NluError, NluResult};

/// Smallest and largest temperature considered.
const TEMPERATURE_RANGE: (f64, f64) = (0.05, 20.0);

/// Returns the softmax of `logits / temperature` into `out`.
pub fn softmax(logits: &[f32], temperature: f32, out: &mut [f32]) {
    let inv = 1.0 / temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, &z) in out.iter_mut().zip(logits) {
        *o = ((z - max) * inv).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// Mean negative log-likelihood of `labels` under `softmax(logits / t)`.
fn mean_nll(logits: &[Vec<f32>], labels: &[usize], t: f64) -> f64 {
    let mut total = 0.0;
    for (row, &label) in logits.iter().zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&z| ((f64::from(z - max)) / t).exp()).sum();
        total += sum.ln() - f64::from(row[label] - max) / t;
    }
    total / logits.len().max(1) as f64
}

/// Returns the temperature that best fits held-out `logits` with true class `labels`
/// (1 when there is nothing to fit).
pub fn fit_temperature(logits: &[Vec<f32>], labels: &[usize]) -> f32 {
    if logits.is_empty() {
        return 1.0;
    }
    let (mut lo, mut hi) = (TEMPERATURE_RANGE.0.ln(), TEMPERATURE_RANGE.1.ln());
    let ratio = (5.0_f64.sqrt() - 1.0) / 2.0;
    let mut a = hi - ratio * (hi - lo);
    let mut b = lo + ratio * (hi - lo);
    let mut fa = mean_nll(logits, labels, a.exp());
    let mut fb = mean_nll(logits, labels, b.exp());
    for _ in 0..60 {
        if fa <= fb {
            hi = b;
            b = a;
            fb = fa;
            a = hi - ratio * (hi - lo);
            fa = mean_nll(logits, labels, a.exp());
        } else {
            lo = a;
            a = b;
            fa = fb;
            b = lo + ratio * (hi - lo);
            fb = mean_nll(logits, labels, b.exp());
        }
    }
    (((lo + hi) / 2.0).exp()) as f32
}

/// How the out-of-scope threshold is chosen from held-out examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ThresholdRule {
    /// `Balanced` when out-of-scope examples were given, `KeepInScope(0.95)` otherwise.
    Auto,
    /// Maximises in-scope accuracy (a rejected in-scope example counts as wrong) plus
    /// out-of-scope recall. Needs out-of-scope examples.
    Balanced,
    /// The highest threshold that still accepts this share of the correctly classified
    /// in-scope examples.
    KeepInScope(f32),
    /// The highest threshold whose in-scope accuracy stays at or above this value.
    MinInScopeAccuracy(f32),
    /// A fixed threshold.
    Fixed(f32),
}

impl ThresholdRule {
    pub(crate) fn validate(self) -> NluResult<()> {
        let value = match self {
            Self::Auto | Self::Balanced => 0.5,
            Self::KeepInScope(v) | Self::MinInScopeAccuracy(v) | Self::Fixed(v) => v,
        };
        if !(0.0..=1.0).contains(&value) {
            return Err(NluError::InvalidArgument(
                "threshold values lie in [0, 1]".to_owned(),
            ));
        }
        Ok(())
    }
}

/// One held-out example as the threshold search sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOut {
    /// Calibrated top probability.
    pub confidence: f32,
    /// True for an in-scope example whose top intent is right.
    pub correct: bool,
    /// True for an in-scope example, false for an out-of-scope one.
    pub in_scope: bool,
}

/// Returns the threshold `rule` picks for `held_out` (0 when there is nothing to tune on).
pub fn tune_threshold(rule: ThresholdRule, held_out: &[HeldOut]) -> f32 {
    let has_oos = held_out.iter().any(|h| !h.in_scope);
    let rule = match rule {
        ThresholdRule::Auto if has_oos => ThresholdRule::Balanced,
        ThresholdRule::Auto => ThresholdRule::KeepInScope(0.95),
        ThresholdRule::Balanced if !has_oos => ThresholdRule::KeepInScope(0.95),
        other => other,
    };
    match rule {
        ThresholdRule::Fixed(t) => t,
        ThresholdRule::KeepInScope(share) => {
            let mut kept: Vec<f32> = held_out
                .iter()
                .filter(|h| h.correct)
                .map(|h| h.confidence)
                .collect();
            if kept.is_empty() {
                return 0.0;
            }
            kept.sort_unstable_by(f32::total_cmp);
            let drop = ((1.0 - f64::from(share)) * kept.len() as f64).floor() as usize;
            kept[drop.min(kept.len() - 1)]
        }
        ThresholdRule::Balanced | ThresholdRule::MinInScopeAccuracy(_) | ThresholdRule::Auto => {
            let in_scope = held_out.iter().filter(|h| h.in_scope).count().max(1) as f64;
            let oos = held_out.iter().filter(|h| !h.in_scope).count().max(1) as f64;
            let mut candidates: Vec<f32> = held_out.iter().map(|h| h.confidence).collect();
            candidates.push(0.0);
            candidates.sort_unstable_by(f32::total_cmp);
            candidates.dedup();
            // Sweep thresholds upwards; an example is accepted when confidence >= threshold.
            let mut sorted: Vec<&HeldOut> = held_out.iter().collect();
            sorted.sort_unstable_by(|a, b| a.confidence.total_cmp(&b.confidence));
            let mut correct_accepted = held_out.iter().filter(|h| h.correct).count() as f64;
            let mut oos_rejected = 0.0;
            let mut next = 0;
            let mut best = (f64::NEG_INFINITY, 0.0_f32);
            for &t in &candidates {
                while next < sorted.len() && sorted[next].confidence < t {
                    if sorted[next].correct {
                        correct_accepted -= 1.0;
                    }
                    if !sorted[next].in_scope {
                        oos_rejected += 1.0;
                    }
                    next += 1;
                }
                let accuracy = correct_accepted / in_scope;
                let score = match rule {
                    ThresholdRule::MinInScopeAccuracy(target) => {
                        if accuracy + 1e-9 < f64::from(target) {
                            continue;
                        }
                        f64::from(t)
                    }
                    _ => accuracy + oos_rejected / oos,
                };
                if score > best.0 {
                    best = (score, t);
                }
            }
            best.1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharpens_underconfident_and_softens_overconfident_logits() {
        // Always right: the best temperature makes the model more confident.
        let logits = vec![vec![1.0, 0.0]; 10];
        let labels = vec![0; 10];
        assert!(fit_temperature(&logits, &labels) < 0.2);
        // Right only half the time with large margins: the temperature goes up.
        let logits = vec![vec![5.0, 0.0], vec![5.0, 0.0]];
        let labels = vec![0, 1];
        assert!(fit_temperature(&logits, &labels) > 10.0);
        assert!((fit_temperature(&[], &[]) - 1.0).abs() < f32::EPSILON);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut p = [0.0; 3];
        softmax(&[1000.0, 0.0, -1000.0], 2.0, &mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0] > 0.99);
    }

    fn held_out(confidence: f32, correct: bool, in_scope: bool) -> HeldOut {
        HeldOut {
            confidence,
            correct,
            in_scope,
        }
    }

    #[test]
    fn balances_in_scope_accuracy_and_out_of_scope_recall() {
        let examples = [
            held_out(0.9, true, true),
            held_out(0.8, true, true),
            held_out(0.7, true, true),
            held_out(0.3, false, true),
            held_out(0.4, false, false),
            held_out(0.2, false, false),
        ];
        let t = tune_threshold(ThresholdRule::Balanced, &examples);
        assert!((t - 0.7).abs() < 1e-6, "{t}");
        assert!((tune_threshold(ThresholdRule::Auto, &examples) - t).abs() < 1e-6);
        let t = tune_threshold(ThresholdRule::MinInScopeAccuracy(0.75), &examples);
        assert!((t - 0.7).abs() < 1e-6, "{t}");
        let t = tune_threshold(ThresholdRule::MinInScopeAccuracy(1.0), &examples);
        assert!(t.abs() < 1e-6, "no threshold reaches the target: {t}");
    }

    #[test]
    fn keeps_the_requested_share_without_out_of_scope_examples() {
        let examples: Vec<HeldOut> = (1..=20)
            .map(|i| held_out(i as f32 / 20.0, true, true))
            .collect();
        // 19 of the 20 stay accepted.
        let t = tune_threshold(ThresholdRule::Auto, &examples);
        assert!((t - 0.1).abs() < 1e-6, "{t}");
        let t = tune_threshold(ThresholdRule::KeepInScope(0.5), &examples);
        assert!((t - 0.55).abs() < 1e-6, "{t}");
        assert!((tune_threshold(ThresholdRule::Fixed(0.3), &examples) - 0.3).abs() < 1e-6);
        assert!(tune_threshold(ThresholdRule::KeepInScope(0.9), &[]).abs() < 1e-6);
        assert!(ThresholdRule::Fixed(1.5).validate().is_err());
    }
}
