//! The per-message entry point: everything the dialog service needs to know about one customer
//! message, computed in one call.

use serde::{Deserialize, Serialize};
use tandem_text::{LanguageGuess, detect_language, normalise_with_offsets, words};

use crate::classifier::{Prediction, TextClassifier};
use crate::complexity::{Complexity, ComplexityWeights, ConversationSignals, complexity};
use crate::entities::{Entity, EntityExtractor};
use crate::error::NluResult;
use crate::escalation::{EscalationSignals, detect_escalation};
use crate::sentiment::{Sentiment, SentimentTrend, TrendOptions, score_sentiment, sentiment_trend};

/// Everything understood about one customer message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnAnalysis {
    /// The normalised text.
    pub normalised: String,
    /// The language and the evidence for it.
    pub language: LanguageGuess,
    /// The words of the normalised text (jieba words for Chinese).
    pub tokens: Vec<String>,
    /// The intent prediction, when an intent model is loaded.
    pub intent: Option<Prediction>,
    /// Sentiment and emotion of this turn.
    pub sentiment: Sentiment,
    /// The trend over the earlier turns and this one.
    pub trend: SentimentTrend,
    /// Explicit requests for a human and complaint words.
    pub escalation: EscalationSignals,
    /// Entities, with spans in the original message.
    pub entities: Vec<Entity>,
    /// How complex the turn is, with its factors.
    pub complexity: Complexity,
}

/// Analyses customer messages; build one per tenant (it holds the tenant's intent model) and
/// share it between threads.
#[derive(Debug, Clone)]
pub struct Analyzer {
    intents: Option<TextClassifier>,
    entities: EntityExtractor,
    trend: TrendOptions,
    complexity: ComplexityWeights,
    top_intents: usize,
}

impl Default for Analyzer {
    fn default() -> Self {
        Self::new()
    }
}

impl Analyzer {
    /// Returns an analyser without an intent model, with the default entity patterns, trend
    /// options and complexity weights.
    pub fn new() -> Self {
        Self {
            intents: None,
            entities: EntityExtractor::new(),
            trend: TrendOptions::default(),
            complexity: ComplexityWeights::default(),
            top_intents: 5,
        }
    }

    /// Uses `model` for intents.
    pub fn with_intent_model(mut self, model: TextClassifier) -> Self {
        self.intents = Some(model);
        self
    }

    /// Uses another entity extractor (other order number patterns).
    pub fn with_entity_extractor(mut self, extractor: EntityExtractor) -> Self {
        self.entities = extractor;
        self
    }

    /// Uses other trend options.
    pub fn with_trend_options(mut self, options: TrendOptions) -> Self {
        self.trend = options;
        self
    }

    /// Uses other complexity weights.
    pub fn with_complexity_weights(mut self, weights: ComplexityWeights) -> NluResult<Self> {
        weights.validate()?;
        self.complexity = weights;
        Ok(self)
    }

    /// Returns the intent model, if any.
    pub fn intent_model(&self) -> Option<&TextClassifier> {
        self.intents.as_ref()
    }

    /// Analyses one customer message in the context of its conversation.
    pub fn analyse(&self, message: &str, signals: &ConversationSignals) -> TurnAnalysis {
        let normalised = normalise_with_offsets(message);
        let text = normalised.as_str();
        let language = detect_language(text);
        let tokens = words(text).into_iter().map(|t| t.text.to_owned()).collect();
        let intent = self
            .intents
            .as_ref()
            .map(|m| m.predict_normalised(text, self.top_intents));
        let sentiment = score_sentiment(message, text);
        let mut scores = signals.previous_sentiment.clone();
        scores.push(sentiment.score);
        let trend = sentiment_trend(&scores, &self.trend);
        let escalation = detect_escalation(text);
        let entities = self.entities.extract_normalised(message, &normalised);
        let complexity = complexity(
            text,
            intent.as_ref(),
            entities.len(),
            signals,
            &self.complexity,
        );
        TurnAnalysis {
            normalised: normalised.into_string(),
            language,
            tokens,
            intent,
            sentiment,
            trend,
            escalation,
            entities,
            complexity,
        }
    }
}
