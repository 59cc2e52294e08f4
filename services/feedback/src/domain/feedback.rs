//! Customer feedback records: validation at the edge, idempotency by the client's id, and what
//! counts as a complaint.

use super::{FieldError, Micros, chars};

/// `FeedbackSubject` values (tandem.feedback.v1).
pub mod subject {
    /// Unknown: attributed to whoever handled the conversation.
    pub const UNSPECIFIED: i32 = 0;
    /// The bot.
    pub const BOT: i32 = 1;
    /// The agent.
    pub const AGENT: i32 = 2;
    /// Bot and agent.
    pub const BOTH: i32 = 3;
}

/// `Language` values (tandem.common.v1).
pub mod language {
    /// Unknown.
    pub const UNSPECIFIED: i32 = 0;
    /// Chinese.
    pub const ZH: i32 = 1;
    /// English.
    pub const EN: i32 = 2;
}

/// The highest `Channel` value (tandem.common.v1).
pub const MAX_CHANNEL: i32 = 9;

/// `Thumbs` values.
pub mod thumbs {
    /// Thumbs up.
    pub const UP: i32 = 1;
    /// Thumbs down.
    pub const DOWN: i32 = 2;
}

/// A feedback score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Score {
    /// Customer satisfaction, 1..5.
    Csat(i32),
    /// Net promoter answer, 0..10.
    Nps(i32),
    /// Customer effort, 1..7.
    Ces(i32),
    /// `Thumbs` value.
    Thumbs(i32),
}

impl Score {
    /// Returns the kind name used in storage and in the CSV format.
    pub fn kind(&self) -> &'static str {
        match self {
            Score::Csat(_) => "csat",
            Score::Nps(_) => "nps",
            Score::Ces(_) => "ces",
            Score::Thumbs(_) => "thumbs",
        }
    }

    /// Returns the numeric value.
    pub fn value(&self) -> i32 {
        match *self {
            Score::Csat(v) | Score::Nps(v) | Score::Ces(v) | Score::Thumbs(v) => v,
        }
    }

    /// Rebuilds a score from its kind name and value.
    pub fn from_parts(kind: &str, value: i32) -> Option<Score> {
        match kind {
            "csat" => Some(Score::Csat(value)),
            "nps" => Some(Score::Nps(value)),
            "ces" => Some(Score::Ces(value)),
            "thumbs" => Some(Score::Thumbs(value)),
            _ => None,
        }
    }

    /// Returns the field name of the score and the problem with its value, if any.
    pub fn check(&self) -> Option<FieldError> {
        let (field, ok, range) = match *self {
            Score::Csat(v) => ("csat", (1..=5).contains(&v), "1..5"),
            Score::Nps(v) => ("nps", (0..=10).contains(&v), "0..10"),
            Score::Ces(v) => ("ces", (1..=7).contains(&v), "1..7"),
            Score::Thumbs(v) => (
                "thumbs",
                v == thumbs::UP || v == thumbs::DOWN,
                "THUMBS_UP or THUMBS_DOWN",
            ),
        };
        (!ok).then(|| {
            FieldError::new(
                format!("feedback.{field}"),
                format!("{} is out of range ({range})", self.value()),
            )
        })
    }

    /// Returns whether the score is a complaint: CSAT 1–2, NPS 0–6, CES 5–7, thumbs down.
    pub fn negative(&self) -> bool {
        match *self {
            Score::Csat(v) => v <= 2,
            Score::Nps(v) => v <= 6,
            Score::Ces(v) => v >= 5,
            Score::Thumbs(v) => v == thumbs::DOWN,
        }
    }
}

/// Feedback as a client sends it: everything the client chooses, nothing the server assigns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackInput {
    /// The client's idempotency key.
    pub client_feedback_id: String,
    /// Conversation, or empty.
    pub conversation_id: String,
    /// `Channel` value.
    pub channel: i32,
    /// `FeedbackSubject` value.
    pub subject: i32,
    /// The score; `None` when the client sent none.
    pub score: Option<Score>,
    /// Comment.
    pub comment: String,
    /// `Language` value; unspecified is detected from the comment.
    pub language: i32,
    /// Survey question.
    pub question_id: String,
    /// Client time, if given.
    pub submitted_at: Option<Micros>,
}

/// The earliest client time accepted: 2000-01-01T00:00:00Z.
pub const EARLIEST: Micros = 946_684_800_000_000;
/// How far in the future a client clock may be.
pub const CLOCK_SKEW: Micros = 24 * super::HOUR;

impl FeedbackInput {
    /// Checks every field and returns all problems at once.
    pub fn validate(&self, now: Micros) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let id_len = chars(&self.client_feedback_id);
        if id_len == 0 {
            errors.push(FieldError::new(
                "feedback.client_feedback_id",
                "is required",
            ));
        } else if id_len > 128 {
            errors.push(FieldError::new(
                "feedback.client_feedback_id",
                "is longer than 128 characters",
            ));
        }
        if chars(&self.conversation_id) > 128 {
            errors.push(FieldError::new(
                "feedback.conversation_id",
                "is longer than 128 characters",
            ));
        }
        if !(0..=MAX_CHANNEL).contains(&self.channel) {
            errors.push(FieldError::new(
                "feedback.channel",
                format!("unknown channel {}", self.channel),
            ));
        }
        if !(0..=subject::BOTH).contains(&self.subject) {
            errors.push(FieldError::new(
                "feedback.subject",
                format!("unknown subject {}", self.subject),
            ));
        }
        match &self.score {
            None => errors.push(FieldError::new(
                "feedback.score",
                "one of csat, nps, ces or thumbs is required",
            )),
            Some(score) => errors.extend(score.check()),
        }
        if chars(&self.comment) > 4000 {
            errors.push(FieldError::new(
                "feedback.comment",
                "is longer than 4000 characters",
            ));
        }
        if !(0..=language::EN).contains(&self.language) {
            errors.push(FieldError::new(
                "feedback.language",
                format!("unknown language {}", self.language),
            ));
        }
        if chars(&self.question_id) > 64 {
            errors.push(FieldError::new(
                "feedback.question_id",
                "is longer than 64 characters",
            ));
        }
        if let Some(at) = self.submitted_at {
            if at < EARLIEST {
                errors.push(FieldError::new(
                    "feedback.submitted_at",
                    "is before 2000-01-01",
                ));
            } else if at > now + CLOCK_SKEW {
                errors.push(FieldError::new(
                    "feedback.submitted_at",
                    "is more than a day in the future",
                ));
            }
        }
        for (field, value) in [
            ("feedback.client_feedback_id", &self.client_feedback_id),
            ("feedback.conversation_id", &self.conversation_id),
            ("feedback.comment", &self.comment),
            ("feedback.question_id", &self.question_id),
        ] {
            if value.contains('\0') {
                errors.push(FieldError::new(field, "contains a NUL character"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Returns the language, detected from the comment when the client did not give one.
    pub fn effective_language(&self) -> i32 {
        if self.language != language::UNSPECIFIED {
            return self.language;
        }
        detect_language(&self.comment)
    }
}

/// Tells Chinese from English text: any Han character makes it Chinese.
pub fn detect_language(text: &str) -> i32 {
    if text.chars().any(is_han) {
        language::ZH
    } else if text.chars().any(|c| c.is_ascii_alphabetic()) {
        language::EN
    } else {
        language::UNSPECIFIED
    }
}

/// Returns whether `c` is a CJK unified ideograph.
pub fn is_han(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}')
}

/// A stored piece of feedback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackRecord {
    /// Server-assigned id.
    pub id: String,
    /// What the client sent (language as given, not as detected).
    pub input: FeedbackInput,
    /// Score (validated).
    pub score: Score,
    /// Language after detection.
    pub language: i32,
    /// When Tandem received it.
    pub received_at: Micros,
}

impl FeedbackRecord {
    /// Returns the time the feedback is bucketed by.
    pub fn at(&self) -> Micros {
        self.input.submitted_at.unwrap_or(self.received_at)
    }

    /// Returns what the rollups need of it.
    pub fn obs(&self) -> FeedbackObs {
        FeedbackObs {
            channel: self.input.channel,
            subject: self.input.subject,
            score: self.score,
            at: self.at(),
        }
    }

    /// Returns whether the record is a complaint with something to read.
    pub fn complaint(&self) -> bool {
        self.score.negative() && !self.input.comment.trim().is_empty()
    }
}

/// What the rollups need of one piece of feedback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackObs {
    /// `Channel` value.
    pub channel: i32,
    /// `FeedbackSubject` value.
    pub subject: i32,
    /// Score.
    pub score: Score,
    /// Bucket time.
    pub at: Micros,
}

/// What a submission with an existing client id means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Same content: the stored record is the answer.
    Same,
    /// Different content under the same id.
    Conflict,
}

/// Compares a new submission with the record stored under the same client id.
pub fn compare(stored: &FeedbackRecord, incoming: &FeedbackInput) -> Replay {
    if stored.input == *incoming {
        Replay::Same
    } else {
        Replay::Conflict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> FeedbackInput {
        FeedbackInput {
            client_feedback_id: "f1".into(),
            conversation_id: "c1".into(),
            channel: 8,
            subject: subject::BOT,
            score: Some(Score::Csat(4)),
            comment: "good".into(),
            language: 0,
            question_id: String::new(),
            submitted_at: None,
        }
    }

    #[test]
    fn every_bad_field_is_listed() {
        let bad = FeedbackInput {
            client_feedback_id: String::new(),
            score: Some(Score::Nps(11)),
            channel: 42,
            submitted_at: Some(1),
            ..input()
        };
        let errors = bad.validate(EARLIEST * 2).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "feedback.client_feedback_id",
                "feedback.channel",
                "feedback.nps",
                "feedback.submitted_at"
            ]
        );
    }

    #[test]
    fn score_ranges_follow_the_contract() {
        for (score, ok) in [
            (Score::Csat(0), false),
            (Score::Csat(1), true),
            (Score::Csat(5), true),
            (Score::Csat(6), false),
            (Score::Nps(-1), false),
            (Score::Nps(0), true),
            (Score::Nps(10), true),
            (Score::Ces(0), false),
            (Score::Ces(7), true),
            (Score::Ces(8), false),
            (Score::Thumbs(0), false),
            (Score::Thumbs(2), true),
        ] {
            assert_eq!(score.check().is_none(), ok, "{score:?}");
        }
    }

    #[test]
    fn languages_are_detected_from_the_comment() {
        assert_eq!(detect_language("退款太慢了"), language::ZH);
        assert_eq!(detect_language("refund is slow"), language::EN);
        assert_eq!(detect_language("👍 123"), language::UNSPECIFIED);
    }
}
