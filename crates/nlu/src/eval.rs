//! Evaluation of a classifier on labelled examples: accuracy, macro-F1, per-class precision,
//! recall and F1, and the most frequent confusions; and of out-of-scope detection.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    /// The class.
    pub label: String,
    /// Share of the predictions of this class that were right (0 when never predicted).
    pub precision: f64,
    /// Share of the examples of this class that were found (0 when there are none).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Examples of this class.
    pub support: usize,
}

/// How often one class was taken for another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// The true class.
    pub gold: String,
    /// The class predicted instead.
    pub predicted: String,
    /// How many times.
    pub count: usize,
}

/// Scores of a classifier on a test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Examples scored.
    pub examples: usize,
    /// Share of examples whose predicted class is right.
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 over every class that is true or predicted.
    pub macro_f1: f64,
    /// Per class, by label.
    pub classes: Vec<ClassScores>,
    /// Confusions, most frequent first (ties by label).
    pub confusions: Vec<Confusion>,
}

/// Scores `(gold, predicted)` pairs.
pub fn evaluate<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Evaluation {
    // label -> (true positives, predicted, support)
    let mut counts: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut confusions: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut examples = 0;
    let mut correct = 0;
    for (gold, predicted) in pairs {
        examples += 1;
        counts.entry(gold).or_default().2 += 1;
        counts.entry(predicted).or_default().1 += 1;
        if gold == predicted {
            correct += 1;
            counts.entry(gold).or_default().0 += 1;
        } else {
            *confusions.entry((gold, predicted)).or_default() += 1;
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let classes: Vec<ClassScores> = counts
        .into_iter()
        .map(|(label, (tp, predicted, support))| {
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            ClassScores {
                label: label.to_owned(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    let macro_f1 = if classes.is_empty() {
        0.0
    } else {
        classes.iter().map(|c| c.f1).sum::<f64>() / classes.len() as f64
    };
    let mut confusions: Vec<Confusion> = confusions
        .into_iter()
        .map(|((gold, predicted), count)| Confusion {
            gold: gold.to_owned(),
            predicted: predicted.to_owned(),
            count,
        })
        .collect();
    confusions.sort_by_key(|c| std::cmp::Reverse(c.count));
    Evaluation {
        examples,
        accuracy: ratio(correct, examples),
        macro_f1,
        classes,
        confusions,
    }
}

/// Scores of out-of-scope detection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OutOfScopeEvaluation {
    /// In-scope examples scored.
    pub in_scope_examples: usize,
    /// Out-of-scope examples scored.
    pub out_of_scope_examples: usize,
    /// Share of in-scope examples accepted with the right intent.
    pub in_scope_accuracy: f64,
    /// Share of in-scope examples accepted (right or wrong).
    pub in_scope_acceptance: f64,
    /// Share of out-of-scope examples rejected.
    pub out_of_scope_recall: f64,
    /// Share of rejections that were out-of-scope examples.
    pub out_of_scope_precision: f64,
}

/// One scored example for [`evaluate_out_of_scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeOutcome {
    /// True for an in-scope example.
    pub in_scope: bool,
    /// True when the model rejected it as out of scope.
    pub rejected: bool,
    /// True when the top intent is the right one (in-scope examples only).
    pub correct: bool,
}

/// Scores out-of-scope detection.
pub fn evaluate_out_of_scope(outcomes: &[ScopeOutcome]) -> OutOfScopeEvaluation {
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let in_scope = outcomes.iter().filter(|o| o.in_scope).count();
    let oos = outcomes.len() - in_scope;
    let accepted_right = outcomes
        .iter()
        .filter(|o| o.in_scope && !o.rejected && o.correct)
        .count();
    let accepted = outcomes
        .iter()
        .filter(|o| o.in_scope && !o.rejected)
        .count();
    let oos_rejected = outcomes
        .iter()
        .filter(|o| !o.in_scope && o.rejected)
        .count();
    let rejected = outcomes.iter().filter(|o| o.rejected).count();
    OutOfScopeEvaluation {
        in_scope_examples: in_scope,
        out_of_scope_examples: oos,
        in_scope_accuracy: ratio(accepted_right, in_scope),
        in_scope_acceptance: ratio(accepted, in_scope),
        out_of_scope_recall: ratio(oos_rejected, oos),
        out_of_scope_precision: ratio(oos_rejected, rejected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_accuracy_macro_f1_and_confusions() {
        let pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b"), ("c", "b")];
        let e = evaluate(pairs);
        assert_eq!(e.examples, 5);
        assert!((e.accuracy - 0.6).abs() < 1e-12);
        let b = e.classes.iter().find(|c| c.label == "b").unwrap();
        assert!((b.precision - 0.5).abs() < 1e-12);
        assert!((b.recall - 1.0).abs() < 1e-12);
        let a = e.classes.iter().find(|c| c.label == "a").unwrap();
        assert!((a.f1 - 2.0 / 3.0).abs() < 1e-12);
        // a: 2/3, b: 2/3, c: 0
        assert!((e.macro_f1 - 4.0 / 9.0).abs() < 1e-12);
        assert_eq!(e.confusions.len(), 2);
        assert_eq!(e.confusions[0].count, 1);
        assert_eq!(evaluate([]).accuracy, 0.0);
    }

    #[test]
    fn scores_out_of_scope_detection() {
        let o = |in_scope, rejected, correct| ScopeOutcome {
            in_scope,
            rejected,
            correct,
        };
        let e = evaluate_out_of_scope(&[
            o(true, false, true),
            o(true, false, false),
            o(true, true, true),
            o(false, true, false),
            o(false, false, false),
        ]);
        assert!((e.in_scope_accuracy - 1.0 / 3.0).abs() < 1e-12);
        assert!((e.in_scope_acceptance - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.out_of_scope_recall - 0.5).abs() < 1e-12);
        assert!((e.out_of_scope_precision - 0.5).abs() < 1e-12);
    }
}
