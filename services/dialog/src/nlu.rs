//! Conversions from the language understanding results of `tandem-nlu` to the wire model, and
//! the bot's canned texts per language.

use tandem_nlu::{Currency, EntityValue, TurnAnalysis};
use tandem_proto::pb::common::v1 as common;
use tandem_text::Language;

/// Maps a detected language to the wire enum (other languages are unspecified).
pub fn language(lang: Language) -> common::Language {
    match lang {
        Language::Zh => common::Language::Zh,
        Language::En => common::Language::En,
        _ => common::Language::Unspecified,
    }
}

/// Maps an emotion of `tandem-nlu` to the wire enum.
fn emotion(e: tandem_nlu::Emotion) -> common::Emotion {
    use tandem_nlu::Emotion as E;
    match e {
        E::Anger => common::Emotion::Anger,
        E::Frustration => common::Emotion::Frustration,
        E::Anxiety => common::Emotion::Anxiety,
        E::Satisfaction => common::Emotion::Joy,
        E::Disappointment => common::Emotion::Sadness,
        E::Confusion => common::Emotion::Confusion,
        E::Neutral => common::Emotion::Unspecified,
    }
}

/// The turn's sentiment on the wire.
pub fn sentiment(a: &TurnAnalysis) -> common::Sentiment {
    let score = f64::from(a.sentiment.score);
    let label = if score <= -0.2 {
        common::SentimentLabel::Negative
    } else if score >= 0.2 {
        common::SentimentLabel::Positive
    } else {
        common::SentimentLabel::Neutral
    };
    let e = emotion(a.sentiment.emotion);
    common::Sentiment {
        score,
        label: label as i32,
        emotions: if e == common::Emotion::Unspecified {
            Vec::new()
        } else {
            vec![common::EmotionScore {
                emotion: e as i32,
                score: score.abs(),
            }]
        },
    }
}

/// The turn's entities on the wire, with character spans.
pub fn entities(message: &str, message_id: &str, a: &TurnAnalysis) -> Vec<common::Entity> {
    let chars_before = |byte: usize| {
        i32::try_from(message.get(..byte).map_or(0, |s| s.chars().count())).unwrap_or(i32::MAX)
    };
    a.entities
        .iter()
        .map(|e| {
            let (kind, normalized) = match &e.value {
                EntityValue::OrderNumber { number } => {
                    (common::EntityKind::OrderNumber, number.clone())
                }
                EntityValue::Phone { number } => (common::EntityKind::PhoneNumber, number.clone()),
                EntityValue::Amount { value, currency } => {
                    let code = match currency {
                        Currency::Cny => "CNY",
                        Currency::Usd => "USD",
                        Currency::Eur => "EUR",
                        Currency::Gbp => "GBP",
                    };
                    (common::EntityKind::Amount, format!("{value} {code}"))
                }
                EntityValue::Date { .. } => (common::EntityKind::Date, e.text.clone()),
                EntityValue::Email { address } => (common::EntityKind::Email, address.clone()),
            };
            common::Entity {
                kind: kind as i32,
                text: e.text.clone(),
                normalized,
                span: Some(common::TextSpan {
                    start: chars_before(e.start),
                    end: chars_before(e.end),
                }),
                message_id: message_id.to_owned(),
                confidence: 0.9,
            }
        })
        .collect()
}

/// The canned texts of the bot.
pub struct Texts;

impl Texts {
    /// When no answer is stored for a recognised intent.
    pub fn answer_missing(zh: bool, intent: &str) -> String {
        if zh {
            format!("我明白您在询问「{intent}」，相关说明正在整理中，您也可以随时转人工。")
        } else {
            format!(
                "I understand you are asking about \"{intent}\". I have no written answer for \
                 it yet; you can ask for an agent at any time."
            )
        }
    }

    /// The clarifying question.
    pub fn clarify(zh: bool) -> &'static str {
        if zh {
            "请问您想咨询的是以下哪一项？"
        } else {
            "Which of these did you mean?"
        }
    }

    /// The fallback.
    pub fn fallback(zh: bool) -> &'static str {
        if zh {
            "抱歉，我没有理解您的意思，能换个说法再描述一下吗？"
        } else {
            "Sorry, I did not understand. Could you say it another way?"
        }
    }

    /// The offer to leave a message when no agent is available soon.
    pub fn leave_message(zh: bool) -> &'static str {
        if zh {
            "目前人工客服暂时无法接入，您可以留言，我们会尽快回复您。"
        } else {
            "No agent is available right now. You can leave a message and we will get back to you."
        }
    }

    /// The handoff notice.
    pub fn handoff(zh: bool) -> &'static str {
        if zh {
            "正在为您转接人工客服，请稍候。"
        } else {
            "I am connecting you with an agent, please wait a moment."
        }
    }

    /// The queue position notice.
    pub fn queued(zh: bool, position: i32, eta_seconds: i32) -> String {
        let minutes = eta_seconds.max(0).saturating_add(59) / 60;
        if zh {
            format!(
                "您前面还有 {} 位客户，预计等待约 {minutes} 分钟。",
                position.max(1) - 1
            )
        } else {
            format!(
                "You are number {position} in the queue; the expected wait is about {minutes} \
                 minute(s)."
            )
        }
    }

    /// An agent joined.
    pub fn agent_joined(zh: bool) -> &'static str {
        if zh {
            "人工客服已接入，将为您继续服务。"
        } else {
            "An agent has joined the conversation."
        }
    }

    /// Another agent took over the conversation (a warm transfer).
    pub fn agent_changed(zh: bool) -> &'static str {
        if zh {
            "您的会话已转接给另一位人工客服，将为您继续服务。"
        } else {
            "Another agent has taken over the conversation."
        }
    }

    /// The agent handed the conversation back to the queue for another agent (a cold
    /// transfer).
    pub fn transferring(zh: bool) -> &'static str {
        if zh {
            "正在为您转接其他人工客服，请稍候。"
        } else {
            "I am transferring you to another agent, please wait a moment."
        }
    }

    /// The conversation is back with the bot.
    pub fn back_to_bot(zh: bool) -> &'static str {
        if zh {
            "人工客服暂时无法接入，我会继续为您服务。"
        } else {
            "No agent could take the conversation; I will keep helping you."
        }
    }
}

/// The wire name of a complexity factor, as the decision trace documents it.
pub fn complexity_factor_name(kind: tandem_nlu::ComplexityFactorKind) -> &'static str {
    use tandem_nlu::ComplexityFactorKind as K;
    match kind {
        K::IntentSpread => "intents",
        K::Entities => "entities",
        K::Length => "length",
        K::Fallbacks => "fallbacks",
        K::RepeatContact => "repeat_contact",
    }
}
