//! How complex a turn is, in `[0, 1]`, as a weighted mean of five factors, each in `[0, 1]`:
//!
//! - intent spread: several plausible intents (`(n − 1) / 2` for `n` intents at 15 % or more)
//!   or a flat distribution (normalised entropy), whichever is larger;
//! - entities: `n / 4`;
//! - length: `(units − 15) / 60`, where a unit is a Han character or another word;
//! - repeated fallbacks in a row before this turn: `n / 3`;
//! - repeat contact (earlier conversations on the same matter, as the caller counts them): `n / 3`.
//!
//! Every factor is returned with its weight and contribution, so a decision trace can show why.

use serde::{Deserialize, Serialize};
use tandem_text::{is_han, scanned_words};

use crate::classifier::Prediction;
use crate::error::{NluError, NluResult};

/// Probability from which an intent counts as plausible.
const PLAUSIBLE: f32 = 0.15;

/// A factor of the complexity score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComplexityFactorKind {
    /// Several plausible intents, or none standing out.
    IntentSpread,
    /// Number of entities.
    Entities,
    /// Length of the message.
    Length,
    /// Bot fallbacks in a row before this turn.
    Fallbacks,
    /// The customer has been in touch about this before.
    RepeatContact,
}

/// One factor with its part in the score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ComplexityFactor {
    /// Which factor.
    pub kind: ComplexityFactorKind,
    /// Its value in `[0, 1]`.
    pub value: f32,
    /// Its weight (the weights sum to 1).
    pub weight: f32,
    /// `value × weight`.
    pub contribution: f32,
}

/// The complexity of a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Complexity {
    /// Weighted mean of the factors, in `[0, 1]`.
    pub score: f32,
    /// Every factor.
    pub factors: Vec<ComplexityFactor>,
}

/// The relative weights of the factors (normalised to sum to 1 when used).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ComplexityWeights {
    /// Weight of intent spread.
    pub intent_spread: f32,
    /// Weight of the entity count.
    pub entities: f32,
    /// Weight of the length.
    pub length: f32,
    /// Weight of repeated fallbacks.
    pub fallbacks: f32,
    /// Weight of repeat contact.
    pub repeat_contact: f32,
}

impl Default for ComplexityWeights {
    fn default() -> Self {
        Self {
            intent_spread: 0.3,
            entities: 0.15,
            length: 0.15,
            fallbacks: 0.25,
            repeat_contact: 0.15,
        }
    }
}

impl ComplexityWeights {
    /// Checks that the weights are finite, non-negative and not all zero.
    pub fn validate(&self) -> NluResult<()> {
        let all = self.as_array();
        if all.iter().any(|w| !w.is_finite() || *w < 0.0) || all.iter().sum::<f32>() <= 0.0 {
            return Err(NluError::InvalidArgument(
                "complexity weights must be >= 0 and not all zero".to_owned(),
            ));
        }
        Ok(())
    }

    fn as_array(&self) -> [f32; 5] {
        [
            self.intent_spread,
            self.entities,
            self.length,
            self.fallbacks,
            self.repeat_contact,
        ]
    }
}

/// What the caller knows about the conversation beyond the current message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConversationSignals {
    /// Sentiment scores of the earlier customer turns, oldest first.
    pub previous_sentiment: Vec<f32>,
    /// Bot fallbacks in a row just before this turn.
    pub consecutive_fallbacks: u32,
    /// Earlier conversations about the same matter.
    pub repeat_contacts: u32,
}

/// Returns the complexity of a turn.
pub fn complexity(
    normalised: &str,
    intent: Option<&Prediction>,
    entity_count: usize,
    signals: &ConversationSignals,
    weights: &ComplexityWeights,
) -> Complexity {
    let spread = intent.map_or(0.0, |p| {
        let plausible = p
            .ranked
            .iter()
            .filter(|s| s.probability >= PLAUSIBLE)
            .count();
        let several = (plausible.saturating_sub(1) as f32 / 2.0).min(1.0);
        several.max(p.spread)
    });
    let units = normalised.chars().filter(|c| is_han(*c)).count()
        + scanned_words(normalised)
            .iter()
            .filter(|t| !t.text.chars().any(is_han))
            .count();
    let values = [
        spread,
        (entity_count as f32 / 4.0).min(1.0),
        ((units as f32 - 15.0) / 60.0).clamp(0.0, 1.0),
        (signals.consecutive_fallbacks as f32 / 3.0).min(1.0),
        (signals.repeat_contacts as f32 / 3.0).min(1.0),
    ];
    let kinds = [
        ComplexityFactorKind::IntentSpread,
        ComplexityFactorKind::Entities,
        ComplexityFactorKind::Length,
        ComplexityFactorKind::Fallbacks,
        ComplexityFactorKind::RepeatContact,
    ];
    let raw = weights.as_array();
    let total: f32 = raw.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    let factors: Vec<ComplexityFactor> = kinds
        .iter()
        .zip(values)
        .zip(raw)
        .map(|((&kind, value), weight)| {
            let weight = if total > 0.0 && weight.is_finite() && weight > 0.0 {
                weight / total
            } else {
                0.0
            };
            ComplexityFactor {
                kind,
                value,
                weight,
                contribution: value * weight,
            }
        })
        .collect();
    let score = factors
        .iter()
        .map(|f| f.contribution)
        .sum::<f32>()
        .clamp(0.0, 1.0);
    Complexity { score, factors }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::ScoredLabel;

    fn prediction(probabilities: &[f32]) -> Prediction {
        Prediction {
            ranked: probabilities
                .iter()
                .enumerate()
                .map(|(i, &p)| ScoredLabel {
                    label: format!("i{i}"),
                    probability: p,
                })
                .collect(),
            confidence: probabilities[0],
            word_coverage: 1.0,
            scope_score: probabilities[0],
            out_of_scope: false,
            spread: 0.1,
        }
    }

    fn factor(c: &Complexity, kind: ComplexityFactorKind) -> f32 {
        c.factors.iter().find(|f| f.kind == kind).unwrap().value
    }

    #[test]
    fn grows_with_each_factor() {
        let weights = ComplexityWeights::default();
        let quiet = ConversationSignals::default();
        let simple = complexity(
            "where is my card",
            Some(&prediction(&[0.95, 0.02])),
            0,
            &quiet,
            &weights,
        );
        assert!(simple.score < 0.1, "{simple:?}");
        let ambiguous = complexity(
            "where is my card",
            Some(&prediction(&[0.4, 0.35, 0.2])),
            0,
            &quiet,
            &weights,
        );
        assert!((factor(&ambiguous, ComplexityFactorKind::IntentSpread) - 1.0).abs() < 1e-6);
        assert!(ambiguous.score > simple.score);
        let stuck = ConversationSignals {
            consecutive_fallbacks: 3,
            repeat_contacts: 2,
            ..quiet
        };
        let hard = complexity(
            &"word ".repeat(80),
            Some(&prediction(&[0.4, 0.35, 0.2])),
            5,
            &stuck,
            &weights,
        );
        assert!(hard.score > 0.9, "{hard:?}");
        let sum: f32 = hard.factors.iter().map(|f| f.weight).sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn counts_han_characters_as_length_units() {
        let long = "我".repeat(75);
        let c = complexity(
            &long,
            None,
            0,
            &ConversationSignals::default(),
            &ComplexityWeights::default(),
        );
        assert!((factor(&c, ComplexityFactorKind::Length) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn validates_weights() {
        let zero = ComplexityWeights {
            intent_spread: 0.0,
            entities: 0.0,
            length: 0.0,
            fallbacks: 0.0,
            repeat_contact: 0.0,
        };
        assert!(zero.validate().is_err());
        assert!(ComplexityWeights::default().validate().is_ok());
        let c = complexity("x", None, 9, &ConversationSignals::default(), &zero);
        assert_eq!(c.score, 0.0);
    }
}
