//! Sentiment and emotion of one turn from the built-in lexicons, and the trend across turns.
//!
//! Scoring, for Chinese and English alike:
//! 1. Lexicon words and phrases are found by longest match (Han characters scanned one by one,
//!    English over words), emoji and emoticons anywhere.
//! 2. Each hit looks back within its clause (never across `,.;!?` or *but* / 但): a negator
//!    (不, 没, not, never, …) reverses and damps it (× −0.74), an intensifier (很, 太, very, …)
//!    scales it. 好 directly before another sentiment word counts as an intensifier (好慢).
//! 3. Hits before *but* / 但是 count half, hits after it one and a half.
//! 4. Exclamation marks push the sum further in its direction; two or more question marks
//!    push it further, or, on their own, read as impatience; a message shouted in capitals
//!    leans angrier.
//! 5. The sum `s` becomes a score `s / √(s² + 15)` in `[-1, 1]`.
//!
//! The emotion is the one with the most weight among the hits on the side of the score
//! (satisfaction for a positive score, anger, frustration, anxiety, disappointment or confusion
//! for a negative one); a negated positive word counts as disappointment.

mod lexicon;
mod trend;

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use tandem_text::{is_han, scanned_words};

pub use trend::{SentimentTrend, TrendOptions, sentiment_trend};

use crate::hashing::FxHashMap;

/// The emotion a turn shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Emotion {
    /// Angry, insulting, shouting.
    Anger,
    /// Fed up: waiting, repeating, going in circles.
    Frustration,
    /// Worried or in a hurry.
    Anxiety,
    /// Let down by a product or a service.
    Disappointment,
    /// Does not understand.
    Confusion,
    /// Pleased or grateful.
    Satisfaction,
    /// Nothing in particular.
    Neutral,
}

/// Something in the text that moved the score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentimentCue {
    /// The word, phrase or signal (`!!!`, `???`, `CAPS`).
    pub text: String,
    /// Its contribution to the sum before squashing.
    pub valence: f32,
}

/// Sentiment of one turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sentiment {
    /// From -1 (very negative) to 1 (very positive).
    pub score: f32,
    /// The dominant emotion.
    pub emotion: Emotion,
    /// What moved the score, in text order.
    pub cues: Vec<SentimentCue>,
}

/// VADER's normalisation constant: `s / √(s² + α)`.
const ALPHA: f32 = 15.0;
/// Factor applied to a negated word.
const NEGATION: f32 = -0.74;

struct Lexicon {
    english: FxHashMap<&'static str, (f32, Option<Emotion>)>,
    chinese: FxHashMap<&'static str, (f32, Option<Emotion>)>,
    symbols: Vec<(&'static str, f32, Option<Emotion>)>,
    english_intensifiers: FxHashMap<&'static str, f32>,
    chinese_intensifiers: Vec<(&'static str, f32)>,
    chinese_negators: Vec<&'static str>,
    longest_chinese: usize,
    longest_english: usize,
}

static LEXICON: LazyLock<Lexicon> = LazyLock::new(|| {
    let table = |entries: &[lexicon::Entry]| {
        entries
            .iter()
            .map(|&(text, valence, emotion)| (text, (valence, emotion)))
            .collect()
    };
    let mut chinese_intensifiers = lexicon::CHINESE_INTENSIFIERS.to_vec();
    chinese_intensifiers.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
    let mut chinese_negators = lexicon::CHINESE_NEGATORS.to_vec();
    chinese_negators.sort_by_key(|text| std::cmp::Reverse(text.len()));
    Lexicon {
        english: table(lexicon::ENGLISH),
        chinese: table(lexicon::CHINESE),
        symbols: lexicon::SYMBOLS.to_vec(),
        english_intensifiers: lexicon::ENGLISH_INTENSIFIERS.iter().copied().collect(),
        chinese_intensifiers,
        chinese_negators,
        longest_chinese: lexicon::CHINESE
            .iter()
            .map(|e| e.0.chars().count())
            .max()
            .unwrap_or(1),
        longest_english: lexicon::ENGLISH
            .iter()
            .map(|e| e.0.split(' ').count())
            .max()
            .unwrap_or(1),
    }
});

/// A lexicon hit before modifiers.
struct Hit {
    start: usize,
    end: usize,
    valence: f32,
    emotion: Option<Emotion>,
}

/// Scores one turn. `source` is what the customer typed (for capitals), `normalised` its
/// normalised form.
pub fn score_sentiment(source: &str, normalised: &str) -> Sentiment {
    let lexicon = &*LEXICON;
    let mut hits = chinese_hits(lexicon, normalised);
    hits.extend(english_hits(lexicon, normalised));
    hits.extend(symbol_hits(lexicon, normalised));
    hits.sort_by_key(|h| h.start);
    // 好 (or another intensifier) right before a sentiment word modifies it instead.
    let mut i = 0;
    while i + 1 < hits.len() {
        let text = &normalised[hits[i].start..hits[i].end];
        let adjacent = hits[i].end == hits[i + 1].start && hits[i + 1].valence != 0.0;
        if adjacent && lexicon.chinese_intensifiers.iter().any(|(w, _)| *w == text) {
            hits.remove(i);
        } else {
            i += 1;
        }
    }
    let but = find_but(normalised);
    let mut sum = 0.0_f32;
    let mut weights: HashMap<Emotion, f32> = HashMap::new();
    let mut cues = Vec::new();
    for hit in hits.iter().filter(|h| h.valence != 0.0) {
        let (factor, negated) = modifiers(lexicon, normalised, hit);
        let mut valence = hit.valence * factor;
        let mut emotion = hit.emotion;
        if negated {
            valence *= NEGATION;
            emotion = if hit.valence > 0.0 {
                Some(Emotion::Disappointment)
            } else {
                None
            };
        }
        if let Some(but) = but {
            valence *= if hit.start < but { 0.5 } else { 1.5 };
        }
        sum += valence;
        if let Some(emotion) = emotion {
            *weights.entry(emotion).or_default() += valence.abs();
        }
        cues.push(SentimentCue {
            text: normalised[hit.start..hit.end].to_owned(),
            valence,
        });
    }
    let exclamations = normalised.matches('!').count().min(4) as f32;
    if exclamations > 0.0 && sum != 0.0 {
        let push = sum.signum() * 0.29 * exclamations;
        sum += push;
        cues.push(SentimentCue {
            text: "!".repeat(exclamations as usize),
            valence: push,
        });
    }
    let questions = normalised.matches('?').count();
    if questions >= 2 {
        let push = if sum != 0.0 {
            sum.signum() * (0.18 * questions as f32).min(0.96)
        } else {
            -0.4
        };
        sum += push;
        if push < 0.0 {
            *weights.entry(Emotion::Frustration).or_default() += 0.5;
        }
        cues.push(SentimentCue {
            text: "??".to_owned(),
            valence: push,
        });
    }
    if is_shouting(source) {
        let push = if sum > 0.0 {
            sum * 0.2
        } else {
            -0.8 + sum * 0.2
        };
        sum += push;
        if push < 0.0 {
            *weights.entry(Emotion::Anger).or_default() += 1.0;
        }
        cues.push(SentimentCue {
            text: "CAPS".to_owned(),
            valence: push,
        });
    }
    let score = sum / (sum * sum + ALPHA).sqrt();
    Sentiment {
        score,
        emotion: dominant_emotion(score, &weights),
        cues,
    }
}

fn dominant_emotion(score: f32, weights: &HashMap<Emotion, f32>) -> Emotion {
    const NEGATIVE: [Emotion; 5] = [
        Emotion::Anger,
        Emotion::Frustration,
        Emotion::Anxiety,
        Emotion::Disappointment,
        Emotion::Confusion,
    ];
    let weight = |e: Emotion| weights.get(&e).copied().unwrap_or(0.0);
    if score >= 0.05 {
        return if weight(Emotion::Satisfaction) > 0.0 {
            Emotion::Satisfaction
        } else {
            Emotion::Neutral
        };
    }
    if score <= -0.05 {
        // Ties go to the earlier, more urgent emotion.
        let mut best = (Emotion::Neutral, 0.0);
        for e in NEGATIVE {
            if weight(e) > best.1 {
                best = (e, weight(e));
            }
        }
        return best.0;
    }
    if weight(Emotion::Confusion) > 0.0 {
        Emotion::Confusion
    } else {
        Emotion::Neutral
    }
}

/// Longest-match scan over Han characters.
fn chinese_hits(lexicon: &Lexicon, text: &str) -> Vec<Hit> {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let chars = bounds.len() - 1;
    let mut hits = Vec::new();
    let mut i = 0;
    while i < chars {
        let starts_han = text[bounds[i]..].chars().next().is_some_and(is_han);
        if !starts_han {
            i += 1;
            continue;
        }
        let mut matched = false;
        for n in (1..=lexicon.longest_chinese.min(chars - i)).rev() {
            let candidate = &text[bounds[i]..bounds[i + n]];
            if let Some(&(valence, emotion)) = lexicon.chinese.get(candidate) {
                hits.push(Hit {
                    start: bounds[i],
                    end: bounds[i + n],
                    valence,
                    emotion,
                });
                i += n;
                matched = true;
                break;
            }
        }
        if !matched {
            i += 1;
        }
    }
    hits
}

/// Longest-match scan over English words (phrases are words joined by one space).
fn english_hits(lexicon: &Lexicon, text: &str) -> Vec<Hit> {
    let tokens: Vec<_> = scanned_words(text)
        .into_iter()
        .filter(|t| !t.text.chars().any(is_han))
        .collect();
    let mut hits = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let mut matched = false;
        for n in (1..=lexicon.longest_english.min(tokens.len() - i)).rev() {
            let (start, end) = (tokens[i].start, tokens[i + n - 1].end);
            if let Some(&(valence, emotion)) = lexicon.english.get(&text[start..end]) {
                hits.push(Hit {
                    start,
                    end,
                    valence,
                    emotion,
                });
                i += n;
                matched = true;
                break;
            }
        }
        if !matched {
            i += 1;
        }
    }
    hits
}

fn symbol_hits(lexicon: &Lexicon, text: &str) -> Vec<Hit> {
    let mut hits = Vec::new();
    for &(symbol, valence, emotion) in &lexicon.symbols {
        for (start, _) in text.match_indices(symbol) {
            hits.push(Hit {
                start,
                end: start + symbol.len(),
                valence,
                emotion,
            });
        }
    }
    // ":-)" also contains ":)"-like overlaps only in theory; keep the first of overlapping hits.
    hits.sort_by_key(|h| h.start);
    hits.dedup_by(|later, earlier| later.start < earlier.end);
    hits
}

/// Returns the intensity factor and whether the hit is negated, from the words just before it
/// in the same clause.
fn modifiers(lexicon: &Lexicon, text: &str, hit: &Hit) -> (f32, bool) {
    let clause_start = text[..hit.start]
        .char_indices()
        .rev()
        .find(|(_, c)| {
            matches!(
                c,
                ',' | '.' | ';' | '!' | '?' | '，' | '。' | '；' | '！' | '？' | '、' | '\n'
            )
        })
        .map_or(0, |(i, c)| i + c.len_utf8());
    let before = &text[clause_start..hit.start];
    let is_chinese_hit = text[hit.start..].chars().next().is_some_and(is_han);
    if is_chinese_hit {
        chinese_modifiers(lexicon, before)
    } else {
        english_modifiers(lexicon, before)
    }
}

fn chinese_modifiers(lexicon: &Lexicon, before: &str) -> (f32, bool) {
    let mut window = before.trim_end();
    let mut factor = 1.0;
    let mut negated = false;
    for _ in 0..3 {
        if let Some(negator) = lexicon
            .chinese_negators
            .iter()
            .find(|n| window.ends_with(**n))
        {
            negated = !negated;
            window = &window[..window.len() - negator.len()];
        } else if let Some((word, f)) = lexicon
            .chinese_intensifiers
            .iter()
            .find(|(w, _)| window.ends_with(*w))
        {
            factor *= f;
            window = &window[..window.len() - word.len()];
        } else {
            break;
        }
    }
    (factor, negated)
}

fn english_modifiers(lexicon: &Lexicon, before: &str) -> (f32, bool) {
    let words: Vec<&str> = scanned_words(before).into_iter().map(|t| t.text).collect();
    let mut factor = 1.0;
    let mut negated = false;
    let mut i = words.len();
    let mut looked = 0;
    while i > 0 && looked < 3 {
        let word = words[i - 1];
        if word == "but" {
            break;
        }
        let pair = (i >= 2).then(|| format!("{} {}", words[i - 2], word));
        if let Some(f) = pair
            .as_deref()
            .and_then(|p| lexicon.english_intensifiers.get(p))
        {
            factor *= f;
            i -= 2;
        } else if let Some(f) = lexicon.english_intensifiers.get(word) {
            factor *= f;
            i -= 1;
        } else {
            if lexicon::ENGLISH_NEGATORS.contains(&word) {
                negated = !negated;
            }
            i -= 1;
        }
        looked += 1;
    }
    (factor, negated)
}

/// Returns where the contrast word *but* (or 但 / 但是 / 可是 / 不过) starts, if any.
fn find_but(text: &str) -> Option<usize> {
    let english = scanned_words(text)
        .into_iter()
        .find(|t| t.text == "but")
        .map(|t| t.start);
    let chinese = ["但是", "但", "可是", "不过"]
        .iter()
        .filter_map(|w| text.find(w))
        .min();
    match (english, chinese) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Two or more words of three or more letters, most of them in capitals.
fn is_shouting(source: &str) -> bool {
    let mut words = 0;
    let mut upper = 0;
    for word in source.split(|c: char| !c.is_ascii_alphabetic()) {
        if word.len() >= 3 {
            words += 1;
            if word.bytes().all(|b| b.is_ascii_uppercase()) {
                upper += 1;
            }
        }
    }
    words >= 2 && upper * 10 >= words * 6
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_text::normalise;

    fn score(text: &str) -> Sentiment {
        score_sentiment(text, &normalise(text))
    }

    #[test]
    fn scores_english_polarity_and_emotion() {
        let s = score("Thank you, that was really helpful!");
        assert!(s.score > 0.5, "{s:?}");
        assert_eq!(s.emotion, Emotion::Satisfaction);
        let s = score("This is ridiculous, worst service ever");
        assert!(s.score < -0.5, "{s:?}");
        assert_eq!(s.emotion, Emotion::Anger);
        let s = score("I'm worried, my card was stolen");
        assert_eq!(s.emotion, Emotion::Anxiety, "{s:?}");
        let s = score("How do I change my address");
        assert!(s.score.abs() < 0.05, "{s:?}");
        assert_eq!(s.emotion, Emotion::Neutral);
    }

    #[test]
    fn handles_english_negation_and_intensifiers() {
        assert!(score("not bad").score > 0.0);
        let not_happy = score("I am not happy with this");
        assert!(not_happy.score < 0.0, "{not_happy:?}");
        assert_eq!(not_happy.emotion, Emotion::Disappointment);
        assert!(score("very bad").score < score("bad").score);
        assert!(score("a bit slow").score > score("slow").score);
    }

    #[test]
    fn weighs_the_clause_after_but() {
        let s = score("Thanks, but it's still not working");
        assert!(s.score < 0.0, "{s:?}");
        assert_eq!(s.emotion, Emotion::Frustration);
    }

    #[test]
    fn scores_chinese_with_negators_and_intensifiers() {
        let s = score("谢谢，服务很好！");
        assert!(s.score > 0.5, "{s:?}");
        assert_eq!(s.emotion, Emotion::Satisfaction);
        let s = score("不好");
        assert!(s.score < 0.0, "{s:?}");
        assert!(score("不错").score > 0.0);
        let s = score("你们这是骗人，太过分了");
        assert!(s.score < -0.6, "{s:?}");
        assert_eq!(s.emotion, Emotion::Anger);
        let s = score("快递三天了还没到，好慢");
        assert!(s.score < 0.0, "{s:?}");
        assert!(
            !s.cues.iter().any(|c| c.text == "快"),
            "快递 is neutral: {s:?}"
        );
        assert!(
            !s.cues.iter().any(|c| c.text == "好"),
            "好 intensifies 慢: {s:?}"
        );
        let s = score("不好意思，麻烦帮我查一下");
        assert!(s.score.abs() < 0.05, "polite phrases are neutral: {s:?}");
        let s = score("我很着急，钱被盗刷了怎么办");
        assert_eq!(s.emotion, Emotion::Anxiety, "{s:?}");
    }

    #[test]
    fn reads_punctuation_and_capitals() {
        assert!(score("bad!!!").score < score("bad").score);
        let s = score("where is my order???");
        assert!(s.score < 0.0);
        assert_eq!(s.emotion, Emotion::Frustration);
        let s = score("WHERE IS MY REFUND");
        assert!(s.score < 0.0, "{s:?}");
        assert_eq!(s.emotion, Emotion::Anger);
        assert!(score("😡😡").score < -0.5);
        assert!(score("好的👍").score > 0.3);
    }

    #[test]
    fn splits_clauses_at_wide_punctuation() {
        // 。 is not folded by normalisation and is three bytes long.
        let s = score("味道不错,份量很足。红薯超好吃就是太烂了");
        assert!(s.cues.iter().any(|c| c.text == "不错"), "{s:?}");
        let s = score("好。不");
        assert!(s.score > 0.0, "{s:?}");
    }

    #[test]
    fn stays_within_bounds() {
        let s = score(&"terrible awful horrible ".repeat(50));
        assert!(s.score >= -1.0 && s.score < -0.99);
        assert_eq!(score("").score, 0.0);
    }
}
