//! Explicit requests for a human and complaint / escalation words, in Chinese and English.
//!
//! A phrase does not count when it is negated in its clause: in English a negator (*don't*,
//! *not*, *never*, *no need*, …) among the four words before it; in Chinese a negator
//! (不用, 不需要, 不要, 不想, 无需, …) in the few characters before it, 不 / 没 / 别 right before it,
//! or a refusal (就不用了, 不需要了, 算了, …) right after it. Inability is not negation: "why
//! can't I talk to a human" and 为什么不能转人工 are still requests.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// What a matched phrase signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// The customer asks for a person.
    HumanRequest,
    /// The customer complains or threatens to escalate outside the conversation.
    Complaint,
}

/// One matched phrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalMatch {
    /// What it signals.
    pub kind: SignalKind,
    /// The phrase as found in the normalised text.
    pub phrase: String,
    /// Byte offset in the normalised text.
    pub start: usize,
    /// Byte offset one past the end in the normalised text.
    pub end: usize,
    /// True when the phrase is negated and therefore ignored.
    pub negated: bool,
}

/// Escalation signals of one turn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationSignals {
    /// The customer explicitly asks for a human (at least one phrase, not negated).
    pub human_requested: bool,
    /// The customer uses complaint or escalation words (not negated).
    pub complaint: bool,
    /// Every phrase found, negated ones included.
    pub matches: Vec<SignalMatch>,
}

const WHO: &str = r"(?:human|humans|person|people|agent|representative|rep|operator|manager|supervisor|someone|somebody|staff|advisor|adviser|customer (?:service|support|care)(?: (?:agent|rep|representative|person|team))?)";

static ENGLISH_REQUESTS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        format!(
            r"\b(?:talk|speak|chat|talking|speaking)\s+(?:to|with)\s+(?:an?\s+|the\s+|some\s+|your\s+)?(?:real\s+|live\s+|actual\s+)?{WHO}\b"
        ),
        r"\b(?:real|live|actual)\s+(?:human|person|people|agent)\b".to_owned(),
        r"\bhuman\s+(?:agent|being|support|operator|help|please|pls)\b".to_owned(),
        format!(
            r"\b(?:connect|transfer|put|get|pass|send)\s+me\s+(?:through\s+)?(?:to|with)?\s*(?:an?\s+|the\s+)?(?:real\s+|live\s+)?{WHO}\b"
        ),
        r"\b(?:agent|representative|operator|human)\s*(?:please|pls|now)\b".to_owned(),
        format!(
            r"\b(?:i\s+(?:want|need|would\s+like|'d\s+like|demand)|let\s+me\s+(?:talk|speak)|can\s+i\s+(?:get|have|talk\s+to|speak\s+to))\s+(?:to\s+(?:talk|speak)\s+(?:to|with)\s+)?(?:an?\s+|the\s+|your\s+)?(?:real\s+|live\s+)?{WHO}\b"
        ),
        r"^\W*(?:human|agent|representative|operator|manager|supervisor)\W*$".to_owned(),
        r"\b(?:not|no|don't\s+want|stop)\s+(?:talking\s+to\s+)?(?:an?\s+|the\s+|this\s+|your\s+)?(?:bot|robot|machine|chatbot)\b".to_owned(),
        r"\bescalate\b".to_owned(),
        r"\bcall\s+me\s+back\b".to_owned(),
    ]
    .iter()
    .map(|pattern| compile(pattern))
    .collect()
});

static ENGLISH_COMPLAINTS: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"\b(?:complain|complaint|complaints|complaining|escalate|lawyer|attorney|sue|suing|legal\s+action|report\s+you|consumer\s+protection|ombudsman|bbb|regulator|chargeback|small\s+claims)\b",
    )
});

/// Chinese request phrases; 人工 alone is checked separately (not 人工智能).
const CHINESE_REQUESTS: &[&str] = &[
    "转人工",
    "人工客服",
    "人工服务",
    "人工坐席",
    "真人",
    "活人",
    "找客服",
    "要客服",
    "叫客服",
    "接客服",
    "联系客服",
    "找你们领导",
    "找领导",
    "叫你们领导",
    "你们领导",
    "找经理",
    "叫经理",
    "你们经理",
    "找主管",
    "你们主管",
    "找负责人",
    "转接",
    "我要投诉",
    "投诉",
    "打电话给我",
    "给我打电话",
    "电话联系我",
];

const CHINESE_COMPLAINTS: &[&str] = &[
    "投诉",
    "举报",
    "曝光",
    "12315",
    "消协",
    "消费者协会",
    "工商局",
    "市场监管",
    "律师",
    "起诉",
    "告你们",
    "法院",
    "媒体",
    "差评",
    "维权",
    "315",
];

const ENGLISH_NEGATORS: &[&str] = &[
    "not", "no", "never", "don't", "dont", "do not", "doesn't", "didn't", "won't", "wouldn't",
    "needn't", "without", "neither", "nor",
];
const CHINESE_NEGATORS_BEFORE: &[&str] = &[
    "不用",
    "不需要",
    "不要",
    "不想",
    "没必要",
    "无需",
    "不必",
    "用不着",
    "不打算",
    "不会",
];
const CHINESE_NEGATORS_ADJACENT: &[char] = &['不', '没', '别'];
const CHINESE_REFUSALS_AFTER: &[&str] = &[
    "就不用了",
    "不用了",
    "不需要了",
    "不必了",
    "算了",
    "就算了",
    "没必要",
];

fn compile(pattern: &str) -> Regex {
    // The patterns are constants of this module and covered by its tests.
    Regex::new(pattern).expect("escalation patterns are valid regular expressions")
}

/// Finds the escalation signals of a normalised text.
pub fn detect_escalation(normalised: &str) -> EscalationSignals {
    let mut matches = Vec::new();
    for regex in ENGLISH_REQUESTS.iter() {
        for m in regex.find_iter(normalised) {
            let negated = english_negated(normalised, m.start());
            push(
                &mut matches,
                SignalKind::HumanRequest,
                normalised,
                m.start(),
                m.end(),
                negated,
            );
        }
    }
    for m in ENGLISH_COMPLAINTS.find_iter(normalised) {
        let negated = english_negated(normalised, m.start());
        push(
            &mut matches,
            SignalKind::Complaint,
            normalised,
            m.start(),
            m.end(),
            negated,
        );
    }
    for (phrases, kind) in [
        (CHINESE_REQUESTS, SignalKind::HumanRequest),
        (CHINESE_COMPLAINTS, SignalKind::Complaint),
    ] {
        for phrase in phrases {
            for (start, _) in normalised.match_indices(phrase) {
                let end = start + phrase.len();
                let negated = chinese_negated(normalised, start, end);
                push(&mut matches, kind, normalised, start, end, negated);
            }
        }
    }
    for (start, _) in normalised.match_indices("人工") {
        let end = start + "人工".len();
        if normalised[end..].starts_with("智能") {
            continue;
        }
        let negated = chinese_negated(normalised, start, end);
        push(
            &mut matches,
            SignalKind::HumanRequest,
            normalised,
            start,
            end,
            negated,
        );
    }
    matches.sort_by(|a, b| (a.start, b.end, a.kind as u8).cmp(&(b.start, a.end, b.kind as u8)));
    // Keep the longest phrase of each kind where phrases of that kind overlap.
    let mut kept: Vec<SignalMatch> = Vec::with_capacity(matches.len());
    for m in matches {
        let covered = kept
            .iter()
            .any(|k| k.kind == m.kind && k.start <= m.start && m.end <= k.end);
        if !covered {
            kept.retain(|k| !(k.kind == m.kind && m.start <= k.start && k.end <= m.end));
            kept.push(m);
        }
    }
    EscalationSignals {
        human_requested: kept
            .iter()
            .any(|m| m.kind == SignalKind::HumanRequest && !m.negated),
        complaint: kept
            .iter()
            .any(|m| m.kind == SignalKind::Complaint && !m.negated),
        matches: kept,
    }
}

fn push(
    matches: &mut Vec<SignalMatch>,
    kind: SignalKind,
    text: &str,
    start: usize,
    end: usize,
    negated: bool,
) {
    matches.push(SignalMatch {
        kind,
        phrase: text[start..end].to_owned(),
        start,
        end,
        negated,
    });
}

/// The start of the clause that contains byte `at`.
fn clause_start(text: &str, at: usize) -> usize {
    text[..at]
        .rfind(|c: char| {
            matches!(
                c,
                ',' | '.' | ';' | '!' | '?' | ':' | '，' | '。' | '；' | '！' | '？' | '、'
            )
        })
        .map_or(0, |i| {
            i + text[i..].chars().next().map_or(1, char::len_utf8)
        })
}

fn english_negated(text: &str, start: usize) -> bool {
    let clause = &text[clause_start(text, start)..start];
    let clause = clause.rsplit(" but ").next().unwrap_or(clause);
    let words: Vec<&str> = clause.split_whitespace().collect();
    let recent = &words[words.len().saturating_sub(4)..];
    recent.iter().enumerate().any(|(i, word)| {
        ENGLISH_NEGATORS.contains(word)
            || (*word == "do" && recent.get(i + 1) == Some(&"not"))
            || (*word == "need" && i > 0 && recent[i - 1] == "no")
    })
}

fn chinese_negated(text: &str, start: usize, end: usize) -> bool {
    let clause = &text[clause_start(text, start)..start];
    let recent: String = {
        let chars: Vec<char> = clause.chars().collect();
        chars[chars.len().saturating_sub(6)..].iter().collect()
    };
    let inability = ["不能", "不可以", "无法", "没法", "不了"];
    if CHINESE_NEGATORS_BEFORE.iter().any(|n| recent.contains(n)) {
        return true;
    }
    if let Some(last) = clause.chars().next_back() {
        let tail: String = clause
            .chars()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if CHINESE_NEGATORS_ADJACENT.contains(&last) && !inability.iter().any(|i| tail.ends_with(i))
        {
            return true;
        }
    }
    let after = &text[end..];
    let after = after.trim_start_matches(['了', '的', ' ']);
    let after: String = after.chars().take(6).collect();
    CHINESE_REFUSALS_AFTER
        .iter()
        .any(|r| after.starts_with(r) || after.starts_with(&format!("就{r}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_text::normalise;

    fn detect(text: &str) -> EscalationSignals {
        detect_escalation(&normalise(text))
    }

    #[test]
    fn recognises_chinese_requests() {
        for text in [
            "转人工",
            "我要人工客服",
            "人工服务！",
            "人工",
            "找你们领导来",
            "我要找经理",
            "我要投诉",
            "为什么不能转人工",
            "我不要机器人，转人工",
        ] {
            assert!(detect(text).human_requested, "{text}");
        }
    }

    #[test]
    fn ignores_negated_chinese_requests() {
        for text in [
            "不用转人工",
            "不需要人工客服",
            "转人工就不用了",
            "我不想投诉",
            "不投诉了",
            "人工智能真厉害",
        ] {
            let signals = detect(text);
            assert!(!signals.human_requested, "{text}: {signals:?}");
        }
        let signals = detect("不用转人工");
        assert!(signals.matches.iter().all(|m| m.negated));
    }

    #[test]
    fn recognises_english_requests() {
        for text in [
            "Can I talk to a human?",
            "I want to speak to a real person",
            "agent please",
            "Representative",
            "let me speak to your manager",
            "Connect me to a live agent now",
            "I need a human",
            "why can't I talk to a human",
            "I don't want a bot, give me a human being",
            "please escalate this",
        ] {
            assert!(detect(text).human_requested, "{text}");
        }
    }

    #[test]
    fn ignores_negated_english_requests() {
        for text in [
            "I don't need an agent",
            "I don't want to talk to a human",
            "no need to speak to a representative",
            "I do not want to speak with a manager",
            "What is an agent fee?",
        ] {
            let signals = detect(text);
            assert!(!signals.human_requested, "{text}: {signals:?}");
        }
    }

    #[test]
    fn flags_complaints_separately() {
        let signals = detect("This is unacceptable, I will file a complaint");
        assert!(signals.complaint);
        assert!(!signals.human_requested);
        let signals = detect("再不处理我就打12315举报你们");
        assert!(signals.complaint);
        let signals = detect("我要投诉你们");
        assert!(signals.complaint && signals.human_requested);
        assert!(!detect("I'm not going to complain").complaint);
        assert!(!detect("我的订单到了吗").complaint);
    }

    #[test]
    fn reports_spans_in_the_normalised_text() {
        let text = normalise("Hello, talk to a human please");
        let signals = detect_escalation(&text);
        let m = signals.matches.iter().find(|m| !m.negated).unwrap();
        assert_eq!(&text[m.start..m.end], m.phrase);
        assert!(m.phrase.contains("human"));
    }
}
