//! A trainable text classifier: TF-IDF features ([`crate::features`]) and a softmax regression
//! ([`crate::linear`]), with a calibrated confidence and out-of-scope rejection. Intents and the
//! trainable sentiment model both use it.
//!
//! Training holds out a stratified share of the examples (10 % by default): a first model trained
//! on the rest scores them, which fits the temperature and the out-of-scope threshold on examples
//! whose labels it never saw (the vocabulary and IDF, which use no labels, come from every
//! in-scope text). The final model is then trained on every example, starting from the first
//! one, and keeps that temperature and threshold. Out-of-scope examples, when given, only ever
//! tune the threshold.
//!
//! From four intents and 1,000 examples up (by default), a learned out-of-scope detector
//! ([`crate::scope`]) is trained from pseudo out-of-scope examples: models trained without a
//! group of intents score that group's examples. Its probability that a text is in scope is the
//! prediction's scope score, and the threshold rule is applied to it on the held-out examples.
//! Without a detector, the scope score is the calibrated confidence.
//!
//! A prediction is out of scope when its scope score is below the threshold, or when fewer than
//! `min_word_coverage` of its words are known to the model: with a few examples per intent, one
//! shared word (吗, "good") can make unrelated text look confident, and the coverage check
//! catches that.
//!
//! Stored models start with the bytes `TNLU`, then the format version (`u16`, little endian),
//! then the model in postcard encoding. Version 2 added the detector, version 3 its prototype
//! input. Version 2 models still load and decide as before (the prototype input weighs
//! nothing); version 1 models load too, and keep deciding by the calibrated confidence.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tandem_text::normalise;

use crate::calibration::{HeldOut, ThresholdRule, fit_temperature, softmax, tune_threshold};
use crate::dataset::{LabelledText, stratified_split};
use crate::error::{NluError, NluResult};
use crate::eval::{Evaluation, evaluate};
use crate::features::{FeatureConfig, SparseVector, Vectoriser};
use crate::linear::{FitReport, LinearModel, LinearOptions, fit_softmax};
use crate::prototypes::Prototypes;
use crate::scope::{
    ScopeDetector, ScopeDetectorOptions, ScopeDetectorV2, ScopeInputs, ScopeTrainingSet,
    fit_detector, scope_inputs,
};

/// The first bytes of a stored model.
const MAGIC: &[u8; 4] = b"TNLU";
/// The version of the stored format this build writes and reads.
pub const MODEL_FORMAT_VERSION: u16 = 3;
/// The oldest stored format this build still reads (version 1 has no out-of-scope detector).
pub const OLDEST_MODEL_FORMAT_VERSION: u16 = 1;

/// How to train a [`TextClassifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingOptions {
    /// What the features are made of.
    pub features: FeatureConfig,
    /// Regularisation and optimiser settings.
    pub linear: LinearOptions,
    /// Share of each label's examples held out for calibration (0 switches calibration off).
    pub held_out_share: f64,
    /// Seed of the held-out split.
    pub seed: u64,
    /// Train the final model on every example (true) or keep the model trained without the
    /// held-out part (false, faster).
    pub refit_on_all: bool,
    /// How the out-of-scope threshold is chosen.
    pub threshold: ThresholdRule,
    /// The learned out-of-scope detector.
    pub out_of_scope_detector: ScopeDetectorOptions,
    /// A text with a smaller share of known words is out of scope whatever its confidence
    /// (0 switches this off).
    pub min_word_coverage: f32,
}

impl Default for TrainingOptions {
    fn default() -> Self {
        Self {
            features: FeatureConfig::intents(),
            linear: LinearOptions::default(),
            held_out_share: 0.1,
            seed: 42,
            refit_on_all: true,
            threshold: ThresholdRule::Auto,
            out_of_scope_detector: ScopeDetectorOptions::default(),
            min_word_coverage: 0.4,
        }
    }
}

/// What happened during training, kept with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// In-scope examples trained on.
    pub examples: usize,
    /// Out-of-scope examples used for the threshold.
    pub out_of_scope_examples: usize,
    /// Examples held out for calibration.
    pub held_out: usize,
    /// Number of features.
    pub features: usize,
    /// Optimiser report of the calibration model, when one was trained.
    pub calibration_fit: Option<FitReport>,
    /// Optimiser report of the final model.
    pub final_fit: FitReport,
    /// Top-1 accuracy of the calibration model on the held-out in-scope examples.
    pub held_out_accuracy: Option<f64>,
    /// Wall-clock training time in milliseconds.
    pub training_ms: u64,
}

/// A label with its calibrated probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredLabel {
    /// The intent or class.
    pub label: String,
    /// Calibrated probability.
    pub probability: f32,
}

/// The classifier's answer for one text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The most probable labels, best first.
    pub ranked: Vec<ScoredLabel>,
    /// Calibrated probability of the best label.
    pub confidence: f32,
    /// Share of the text's words the model knows, in `[0, 1]`.
    pub word_coverage: f32,
    /// How likely the text is in scope, in `[0, 1]`: the out-of-scope detector's probability, or
    /// the confidence for a model without a detector. The threshold applies to it.
    pub scope_score: f32,
    /// True when the scope score is below the model's out-of-scope threshold, or the word
    /// coverage below its minimum.
    pub out_of_scope: bool,
    /// Entropy of the calibrated distribution divided by its maximum, in `[0, 1]`: 0 when one
    /// label takes all the mass, 1 when every label is equally likely.
    pub spread: f32,
}

impl Prediction {
    /// Returns the best label, or `None` when out of scope.
    pub fn accepted_label(&self) -> Option<&str> {
        if self.out_of_scope {
            None
        } else {
            self.ranked.first().map(|s| s.label.as_str())
        }
    }
}

/// A trained text classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextClassifier {
    labels: Vec<String>,
    vectoriser: Vectoriser,
    model: LinearModel,
    temperature: f32,
    threshold: f32,
    min_word_coverage: f32,
    summary: TrainingSummary,
    detector: Option<ScopeDetector>,
}

/// The stored form of version 1: the same model without a detector.
#[derive(Serialize, Deserialize)]
struct StoredV1 {
    labels: Vec<String>,
    vectoriser: Vectoriser,
    model: LinearModel,
    temperature: f32,
    threshold: f32,
    min_word_coverage: f32,
    summary: TrainingSummary,
}

/// The stored form of version 2: the detector without the prototype input.
#[derive(Serialize, Deserialize)]
struct StoredV2 {
    labels: Vec<String>,
    vectoriser: Vectoriser,
    model: LinearModel,
    temperature: f32,
    threshold: f32,
    min_word_coverage: f32,
    summary: TrainingSummary,
    detector: Option<ScopeDetectorV2>,
}

impl From<StoredV2> for TextClassifier {
    fn from(v2: StoredV2) -> Self {
        Self {
            labels: v2.labels,
            vectoriser: v2.vectoriser,
            model: v2.model,
            temperature: v2.temperature,
            threshold: v2.threshold,
            min_word_coverage: v2.min_word_coverage,
            summary: v2.summary,
            detector: v2.detector.map(ScopeDetector::from),
        }
    }
}

impl From<StoredV1> for TextClassifier {
    fn from(v1: StoredV1) -> Self {
        Self {
            labels: v1.labels,
            vectoriser: v1.vectoriser,
            model: v1.model,
            temperature: v1.temperature,
            threshold: v1.threshold,
            min_word_coverage: v1.min_word_coverage,
            summary: v1.summary,
            detector: None,
        }
    }
}

impl TextClassifier {
    /// Trains on labelled `examples` (at least two labels); `out_of_scope` texts, if any, only
    /// tune the out-of-scope threshold.
    pub fn train(
        examples: &[LabelledText],
        out_of_scope: &[String],
        options: &TrainingOptions,
    ) -> NluResult<Self> {
        let started = Instant::now();
        options.threshold.validate()?;
        options.out_of_scope_detector.validate()?;
        if !(0.0..=1.0).contains(&options.min_word_coverage) {
            return Err(NluError::InvalidArgument(
                "min_word_coverage must be in [0, 1]".into(),
            ));
        }
        if !(0.0..0.9).contains(&options.held_out_share) {
            return Err(NluError::InvalidArgument(
                "held_out_share must be in [0, 0.9)".into(),
            ));
        }
        let mut labels: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
        labels.sort_unstable();
        labels.dedup();
        if labels.len() < 2 {
            return Err(NluError::InvalidTrainingSet(
                "at least two labels are needed".into(),
            ));
        }
        let texts: Vec<String> = examples.iter().map(|e| normalise(&e.text)).collect();
        if let Some(i) = texts.iter().position(String::is_empty) {
            return Err(NluError::InvalidTrainingSet(format!(
                "example {i} (label `{}`) has no text",
                examples[i].label
            )));
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectoriser = Vectoriser::fit(options.features.clone(), &refs)?;
        let x = vectoriser.transform_all(&refs);
        let y: Vec<u32> = examples
            .iter()
            .map(|e| labels.binary_search(&e.label).map(|i| i as u32))
            .collect::<Result<_, _>>()
            .map_err(|_| NluError::InvalidTrainingSet("label lookup failed".to_owned()))?;
        let (features, classes) = (vectoriser.dimension(), labels.len());

        let label_refs: Vec<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        let (fit_rows, held_rows) = if options.held_out_share > 0.0 {
            stratified_split(&label_refs, 1.0 - options.held_out_share, options.seed)
        } else {
            ((0..examples.len()).collect(), Vec::new())
        };
        let calibration_possible = !held_rows.is_empty() && {
            let mut fit_labels: Vec<u32> = fit_rows.iter().map(|&i| y[i]).collect();
            fit_labels.sort_unstable();
            fit_labels.dedup();
            fit_labels.len() >= 2
        };

        let mut temperature = 1.0;
        let mut threshold = match options.threshold {
            ThresholdRule::Fixed(t) => t,
            _ => 0.0,
        };
        let mut calibration_fit = None;
        let mut held_out_accuracy = None;
        let mut start = None;
        let mut detector = None;
        if calibration_possible {
            let fit_x = x.select(&fit_rows);
            let fit_y: Vec<u32> = fit_rows.iter().map(|&i| y[i]).collect();
            let (first, report) =
                fit_softmax(&fit_x, &fit_y, features, classes, &options.linear, None)?;
            calibration_fit = Some(report);
            let held_x = x.select(&held_rows);
            let held_y: Vec<usize> = held_rows.iter().map(|&i| y[i] as usize).collect();
            let held_logits = first.all_logits(&held_x);
            temperature = fit_temperature(&held_logits, &held_y);
            let fit_labels: Vec<usize> = fit_y.iter().map(|&l| l as usize).collect();
            let first_prototypes = Prototypes::fit(&first.all_logits(&fit_x), &fit_labels, classes);
            let mut probabilities = vec![0.0; classes];
            let inputs_of = |logits: &[f32], text: &str, probabilities: &mut [f32]| {
                let coverage = vectoriser.coverage_where(text, |_| true);
                let similarity = first_prototypes.similarity(logits);
                scope_inputs(logits, temperature, coverage, similarity, probabilities)
            };
            let held_inputs: Vec<ScopeInputs> = held_logits
                .iter()
                .zip(&held_rows)
                .map(|(logits, &r)| inputs_of(logits, &texts[r], &mut probabilities))
                .collect();
            detector = fit_detector(
                &ScopeTrainingSet {
                    vectoriser: &vectoriser,
                    texts: &texts,
                    x: &x,
                    y: &y,
                    intents: classes,
                    fit_rows: &fit_rows,
                    held_rows: &held_rows,
                    held_inputs: &held_inputs,
                    linear: &options.linear,
                    seed: options.seed,
                },
                options.out_of_scope_detector,
            )?;
            let score = |inputs: &ScopeInputs| match &detector {
                Some(detector) => detector.in_scope_probability(inputs),
                None => inputs.values[0],
            };
            let oos_texts: Vec<String> = out_of_scope.iter().map(|t| normalise(t)).collect();
            let oos_refs: Vec<&str> = oos_texts.iter().map(String::as_str).collect();
            let oos_logits = first.all_logits(&vectoriser.transform_all(&oos_refs));
            let mut held_out = Vec::with_capacity(held_logits.len() + oos_logits.len());
            let mut right = 0;
            for (inputs, &label) in held_inputs.iter().zip(&held_y) {
                right += usize::from(inputs.best == label);
                held_out.push(HeldOut {
                    confidence: score(inputs),
                    correct: inputs.best == label,
                    in_scope: true,
                });
            }
            held_out_accuracy = Some(right as f64 / held_y.len() as f64);
            for (logits, text) in oos_logits.iter().zip(&oos_texts) {
                held_out.push(HeldOut {
                    confidence: score(&inputs_of(logits, text, &mut probabilities)),
                    correct: false,
                    in_scope: false,
                });
            }
            threshold = tune_threshold(options.threshold, &held_out);
            start = Some(first);
        }
        let (model, final_fit) = match start {
            Some(first) if !options.refit_on_all => {
                let report = calibration_fit.ok_or_else(|| {
                    NluError::InvalidTrainingSet("calibration model missing".to_owned())
                })?;
                (first, report)
            }
            start => fit_softmax(&x, &y, features, classes, &options.linear, start.as_ref())?,
        };
        if let Some(detector) = detector.as_mut() {
            // The prototypes of the model that will be used, from its own training examples,
            // as the detector's training used each model's own.
            let labels: Vec<usize> = y.iter().map(|&l| l as usize).collect();
            detector.set_prototypes(Prototypes::fit(&model.all_logits(&x), &labels, classes));
        }
        let summary = TrainingSummary {
            examples: examples.len(),
            out_of_scope_examples: out_of_scope.len(),
            held_out: if calibration_possible {
                held_rows.len()
            } else {
                0
            },
            features,
            calibration_fit,
            final_fit,
            held_out_accuracy,
            training_ms: started.elapsed().as_millis() as u64,
        };
        let min_word_coverage = options.min_word_coverage;
        Ok(Self {
            labels,
            vectoriser,
            model,
            temperature,
            threshold,
            min_word_coverage,
            summary,
            detector,
        })
    }

    /// Returns the labels, in the order of [`Self::probabilities`].
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Returns the calibration temperature.
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Returns the out-of-scope threshold on the scope score ([`Prediction::scope_score`]).
    pub fn out_of_scope_threshold(&self) -> f32 {
        self.threshold
    }

    /// Replaces the out-of-scope threshold (clamped to `[0, 1]`).
    pub fn set_out_of_scope_threshold(&mut self, threshold: f32) {
        self.threshold = if threshold.is_nan() {
            0.0
        } else {
            threshold.clamp(0.0, 1.0)
        };
    }

    /// Returns the smallest share of known words for a text to be in scope.
    pub fn min_word_coverage(&self) -> f32 {
        self.min_word_coverage
    }

    /// Replaces the smallest share of known words (clamped to `[0, 1]`; 0 switches it off).
    pub fn set_min_word_coverage(&mut self, coverage: f32) {
        self.min_word_coverage = if coverage.is_nan() {
            0.0
        } else {
            coverage.clamp(0.0, 1.0)
        };
    }

    /// Returns what happened during training.
    pub fn summary(&self) -> &TrainingSummary {
        &self.summary
    }

    /// Returns the learned out-of-scope detector, when the model has one.
    pub fn out_of_scope_detector(&self) -> Option<&ScopeDetector> {
        self.detector.as_ref()
    }

    /// Returns the uncalibrated scores (logits) of every label for a normalised text, and the
    /// text's word and character n-gram coverage.
    fn logits(&self, normalised: &str) -> (Vec<f32>, (f32, f32)) {
        let mut row = SparseVector::default();
        let coverage = self
            .vectoriser
            .transform_with_coverage(normalised, &mut row);
        let mut logits = vec![0.0; self.labels.len()];
        self.model.logits(&row.indices, &row.values, &mut logits);
        (logits, coverage)
    }

    /// Returns the calibrated probability of every label for a normalised text.
    pub fn probabilities(&self, normalised: &str) -> Vec<f32> {
        let (logits, _) = self.logits(normalised);
        let mut probabilities = vec![0.0; self.labels.len()];
        softmax(&logits, self.temperature, &mut probabilities);
        probabilities
    }

    /// Classifies a normalised text, returning the `top` best labels.
    pub fn predict_normalised(&self, normalised: &str, top: usize) -> Prediction {
        let (logits, coverage) = self.logits(normalised);
        let word_coverage = coverage.0;
        let mut probabilities = vec![0.0; self.labels.len()];
        let scope_score = match &self.detector {
            Some(detector) => {
                let similarity = detector.prototype_similarity(&logits);
                let inputs = scope_inputs(
                    &logits,
                    self.temperature,
                    coverage,
                    similarity,
                    &mut probabilities,
                );
                detector.in_scope_probability(&inputs)
            }
            None => {
                softmax(&logits, self.temperature, &mut probabilities);
                probabilities[argmax(&probabilities)]
            }
        };
        let mut order: Vec<usize> = (0..probabilities.len()).collect();
        let top = top.clamp(1, order.len());
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            probabilities[b].total_cmp(&probabilities[a])
        });
        order.truncate(top);
        order.sort_unstable_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
        let ranked: Vec<ScoredLabel> = order
            .iter()
            .map(|&i| ScoredLabel {
                label: self.labels[i].clone(),
                probability: probabilities[i],
            })
            .collect();
        let confidence = probabilities[order[0]];
        let entropy: f32 = probabilities
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -p * p.ln())
            .sum();
        let spread = (entropy / (probabilities.len() as f32).ln()).clamp(0.0, 1.0);
        let out_of_scope = scope_score < self.threshold || word_coverage < self.min_word_coverage;
        Prediction {
            ranked,
            confidence,
            word_coverage,
            scope_score,
            out_of_scope,
            spread,
        }
    }

    /// Classifies a raw text (normalised first), returning the five best labels.
    pub fn predict(&self, text: &str) -> Prediction {
        self.predict_normalised(&normalise(text), 5)
    }

    /// Scores the top label of every test example (the out-of-scope flag is ignored).
    pub fn evaluate(&self, test: &[LabelledText]) -> Evaluation {
        let predicted: Vec<String> = test
            .iter()
            .map(|e| {
                let probabilities = self.probabilities(&normalise(&e.text));
                self.labels[argmax(&probabilities)].clone()
            })
            .collect();
        evaluate(
            test.iter()
                .zip(&predicted)
                .map(|(e, p)| (e.label.as_str(), p.as_str())),
        )
    }

    /// Returns the model in the stored format.
    pub fn to_bytes(&self) -> NluResult<Vec<u8>> {
        let mut bytes = Vec::with_capacity(6 + self.model.features() * self.labels.len() * 5);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&MODEL_FORMAT_VERSION.to_le_bytes());
        postcard::to_extend(self, bytes)
            .map_err(|error| NluError::InvalidModel(format!("cannot encode: {error}")))
    }

    /// Reads a model in the stored format, checking its version and consistency.
    pub fn from_bytes(bytes: &[u8]) -> NluResult<Self> {
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return Err(NluError::InvalidModel(
                "not a stored model (magic bytes)".to_owned(),
            ));
        };
        let (version, payload) = match rest {
            [a, b, payload @ ..] => (u16::from_le_bytes([*a, *b]), payload),
            _ => return Err(NluError::InvalidModel("truncated header".to_owned())),
        };
        let model: Self = match version {
            MODEL_FORMAT_VERSION => decode(version, payload)?,
            2 => decode::<StoredV2>(version, payload)?.into(),
            1 => decode::<StoredV1>(version, payload)?.into(),
            _ => {
                return Err(NluError::UnsupportedModelVersion {
                    found: version,
                    supported: MODEL_FORMAT_VERSION,
                });
            }
        };
        model.check()?;
        Ok(model)
    }

    fn check(&self) -> NluResult<()> {
        self.model.check()?;
        self.vectoriser.check()?;
        if self.labels.len() != self.model.classes() || self.labels.len() < 2 {
            return Err(NluError::InvalidModel(
                "labels do not match the weights".to_owned(),
            ));
        }
        if self.vectoriser.dimension() != self.model.features() {
            return Err(NluError::InvalidModel(
                "features do not match the weights".to_owned(),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(NluError::InvalidModel(
                "temperature must be positive".to_owned(),
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold) || !(0.0..=1.0).contains(&self.min_word_coverage)
        {
            return Err(NluError::InvalidModel(
                "thresholds must lie in [0, 1]".to_owned(),
            ));
        }
        if let Some(detector) = &self.detector {
            detector.check(self.labels.len())?;
        }
        Ok(())
    }
}

/// Decodes a whole payload: bytes left over mean a damaged model or another version's layout.
fn decode<'a, T: Deserialize<'a>>(version: u16, payload: &'a [u8]) -> NluResult<T> {
    match postcard::take_from_bytes(payload) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(NluError::InvalidModel(format!(
            "cannot decode version {version}: {} bytes left over",
            rest.len()
        ))),
        Err(error) => Err(NluError::InvalidModel(format!(
            "cannot decode version {version}: {error}"
        ))),
    }
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn examples() -> Vec<LabelledText> {
        let mut out = Vec::new();
        for (label, words) in [
            ("refund", ["refund", "money back", "return money"]),
            (
                "track",
                ["where is my parcel", "track order", "delivery status"],
            ),
            (
                "cancel",
                ["cancel order", "stop my order", "cancel purchase"],
            ),
            (
                "invoice",
                ["send invoice", "need a receipt", "invoice copy"],
            ),
        ] {
            for (i, text) in words.iter().enumerate() {
                for suffix in ["please", "now", "today", "asap"] {
                    out.push(LabelledText::new(format!("{text} {suffix} {i}"), label));
                }
            }
        }
        out
    }

    #[test]
    fn reads_version_1_models_without_a_detector() {
        let options = TrainingOptions {
            out_of_scope_detector: ScopeDetectorOptions {
                groups: 0,
                ..ScopeDetectorOptions::default()
            },
            ..TrainingOptions::default()
        };
        let model = TextClassifier::train(&examples(), &[], &options).unwrap();
        assert!(model.out_of_scope_detector().is_none());
        let v1 = StoredV1 {
            labels: model.labels.clone(),
            vectoriser: model.vectoriser.clone(),
            model: model.model.clone(),
            temperature: model.temperature,
            threshold: model.threshold,
            min_word_coverage: model.min_word_coverage,
            summary: model.summary.clone(),
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1_u16.to_le_bytes());
        let bytes = postcard::to_extend(&v1, bytes).unwrap();
        let loaded = TextClassifier::from_bytes(&bytes).unwrap();
        assert_eq!(loaded, model);
        let prediction = loaded.predict("refund please");
        assert_eq!(prediction.scope_score, prediction.confidence);
        // A version 2 model with a detector is not read as version 1.
        let mut detector_model = with_detector();
        assert!(detector_model.out_of_scope_detector().is_some());
        detector_model.summary.training_ms = 0;
        let mut v2_as_v1 = detector_model.to_bytes().unwrap();
        v2_as_v1[4..6].copy_from_slice(&1_u16.to_le_bytes());
        assert!(matches!(
            TextClassifier::from_bytes(&v2_as_v1),
            Err(NluError::InvalidModel(_))
        ));
    }

    /// A model of [`examples`] with an out-of-scope detector, however few they are.
    fn with_detector() -> TextClassifier {
        TextClassifier::train(
            &examples(),
            &[],
            &TrainingOptions {
                out_of_scope_detector: ScopeDetectorOptions {
                    min_examples: 0,
                    ..ScopeDetectorOptions::default()
                },
                ..TrainingOptions::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn reads_version_2_models_whose_detector_has_no_prototype_input() {
        let model = with_detector();
        let detector = model.out_of_scope_detector().unwrap();
        assert!(!detector.prototypes().is_empty());
        let v2 = StoredV2 {
            labels: model.labels.clone(),
            vectoriser: model.vectoriser.clone(),
            model: model.model.clone(),
            temperature: model.temperature,
            threshold: model.threshold,
            min_word_coverage: model.min_word_coverage,
            summary: model.summary.clone(),
            detector: Some(detector.to_v2()),
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&2_u16.to_le_bytes());
        let bytes = postcard::to_extend(&v2, bytes).unwrap();
        let loaded = TextClassifier::from_bytes(&bytes).unwrap();
        let widened = loaded.out_of_scope_detector().unwrap();
        assert!(widened.prototypes().is_empty());
        // Narrowing the widened detector gives back what was stored.
        assert_eq!(
            postcard::to_allocvec(&widened.to_v2()).unwrap(),
            postcard::to_allocvec(&detector.to_v2()).unwrap()
        );
        for text in [
            "refund please now",
            "track order today",
            "what is the weather",
        ] {
            let (a, b) = (model.predict(text), loaded.predict(text));
            assert_eq!(a.ranked, b.ranked, "{text}");
            assert!((0.0..=1.0).contains(&b.scope_score), "{text}: {b:?}");
        }
        // The current format is not read as version 2.
        let mut current = model.to_bytes().unwrap();
        current[4..6].copy_from_slice(&2_u16.to_le_bytes());
        assert!(matches!(
            TextClassifier::from_bytes(&current),
            Err(NluError::InvalidModel(_))
        ));
        // And it round-trips.
        assert_eq!(
            TextClassifier::from_bytes(&model.to_bytes().unwrap()).unwrap(),
            model
        );
    }
}
