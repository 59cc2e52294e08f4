//! Tandem's built-in language understanding for the bot's turn, in Chinese and English, with no
//! network and no downloaded model: intents (TF-IDF + softmax regression trained in Rust, with a
//! calibrated confidence and out-of-scope rejection), sentiment and emotion per turn and their
//! trend across turns, explicit requests for a human, entities and a complexity score.
//!
//! [`Analyzer::analyse`] is the entry point the dialog service calls for each customer message;
//! it returns a [`TurnAnalysis`].
//!
//! Modules:
//! - `dataset`: [`LabelledText`], CSV reading ([`read_labelled_csv`]), [`stratified_split`].
//! - `features`: TF-IDF [`Vectoriser`] over word and character n-grams ([`FeatureConfig`]).
//! - `linear`: softmax regression trained by L-BFGS ([`fit_softmax`], [`LinearOptions`]).
//! - `calibration`: temperature scaling and out-of-scope threshold rules ([`ThresholdRule`]).
//! - `scope`: the learned out-of-scope detector ([`ScopeDetector`]), trained on pseudo
//!   out-of-scope examples from the training set.
//! - `classifier`: [`TextClassifier`] (train, predict, evaluate, store with a format version).
//! - `eval`: accuracy, macro-F1, per-class scores, confusions, out-of-scope figures.
//! - `sentiment`: the built-in lexicon scorer ([`score_sentiment`]) and [`sentiment_trend`].
//! - `escalation`: [`detect_escalation`] (human requests and complaints, with negation).
//! - `entities`: [`EntityExtractor`] (order numbers, phones, amounts, dates, e-mails).
//! - `complexity`: [`complexity`] with its factors.
//! - `analyser`: [`Analyzer`] and [`TurnAnalysis`].
//!
//! Boundaries: CPU only, no clock or environment; the only I/O is [`read_labelled_csv`]. Text
//! processing (normalisation, language, tokens) comes from `tandem-text`. Where models are
//! stored and how tenants map to them belongs to the services.

mod analyser;
mod calibration;
mod classifier;
mod complexity;
mod dataset;
mod entities;
mod error;
mod escalation;
mod eval;
mod features;
mod hashing;
mod linear;
mod prototypes;
mod scope;
mod sentiment;

pub use analyser::{Analyzer, TurnAnalysis};
pub use calibration::{HeldOut, ThresholdRule, fit_temperature, softmax, tune_threshold};
pub use classifier::{
    MODEL_FORMAT_VERSION, OLDEST_MODEL_FORMAT_VERSION, Prediction, ScoredLabel, TextClassifier,
    TrainingOptions, TrainingSummary,
};
pub use complexity::{
    Complexity, ComplexityFactor, ComplexityFactorKind, ComplexityWeights, ConversationSignals,
    complexity,
};
pub use dataset::{
    ColumnOrder, LabelledText, SplitMix64, parse_labelled_csv, read_labelled_csv, stratified_split,
};
pub use entities::{
    Currency, DEFAULT_ORDER_PATTERNS, DateValue, Entity, EntityExtractor, EntityValue,
};
pub use error::{NluError, NluResult};
pub use escalation::{EscalationSignals, SignalKind, SignalMatch, detect_escalation};
pub use eval::{
    ClassScores, Confusion, Evaluation, OutOfScopeEvaluation, ScopeOutcome, evaluate,
    evaluate_out_of_scope,
};
pub use features::{FeatureConfig, NgramRange, SparseMatrix, SparseVector, Vectoriser};
pub use linear::{FitReport, LinearModel, LinearOptions, Loss, fit_softmax};
pub use prototypes::{PROTOTYPES_PER_INTENT, Prototypes};
pub use scope::{SCOPE_FEATURES, ScopeDetector, ScopeDetectorOptions};
pub use sentiment::{
    Emotion, Sentiment, SentimentCue, SentimentTrend, TrendOptions, score_sentiment,
    sentiment_trend,
};
