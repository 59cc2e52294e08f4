//! Language identification by script: Chinese (Han characters), English (Latin letters) or
//! other (kana, hangul, Cyrillic, Arabic, …, or Latin text that looks like another language).
//!
//! One Han character carries about as much as a short English word, so Han characters count three
//! times as much as a Latin letter when the scripts are mixed: `我的iPhone怎么退货` is Chinese, `Please
//! check order 订单` is English. Japanese shares Han characters with Chinese; kana tell it apart.

use serde::{Deserialize, Serialize};

/// A language the bot understands, or `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Chinese.
    Zh,
    /// English.
    En,
    /// Anything else, including text without letters.
    Other,
}

impl Language {
    /// Returns the ISO 639-1 code (`zh`, `en`) or `other`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Zh => "zh",
            Self::En => "en",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// The detected language and the evidence for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LanguageGuess {
    /// The language chosen.
    pub language: Language,
    /// The weighted share of Han characters among all letters, in `[0, 1]`.
    pub han_share: f32,
    /// True when a second script carries a noticeable share (15 % or more) of the letters.
    pub mixed: bool,
}

/// How much one character of a script weighs against one Latin letter.
const HAN_WEIGHT: f32 = 3.0;
/// Han share from which mixed text counts as Chinese.
const ZH_FROM: f32 = 0.4;
/// Share of a minority script from which text counts as mixed.
const MIXED_FROM: f32 = 0.15;

/// Returns the language of `text` (raw or normalised).
pub fn detect_language(text: &str) -> LanguageGuess {
    let mut han = 0_u32;
    let mut kana = 0_u32;
    let mut hangul = 0_u32;
    let mut latin = 0_u32;
    let mut accented = 0_u32;
    let mut other = 0_u32;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            latin += 1;
        } else if c.is_ascii() {
            continue;
        } else if is_han(c) {
            han += 1;
        } else if matches!(c, '\u{3040}'..='\u{30ff}' | '\u{31f0}'..='\u{31ff}' | '\u{ff66}'..='\u{ff9d}')
        {
            kana += 1;
        } else if matches!(c, '\u{ac00}'..='\u{d7af}' | '\u{1100}'..='\u{11ff}' | '\u{3130}'..='\u{318f}')
        {
            hangul += 1;
        } else if matches!(c, '\u{c0}'..='\u{24f}' | '\u{1e00}'..='\u{1eff}') && c.is_alphabetic() {
            latin += 1;
            accented += 1;
        } else if c.is_alphabetic() {
            other += 1;
        }
    }
    let han_w = han as f32 * HAN_WEIGHT;
    let cjk_other_w = (kana + hangul) as f32 * HAN_WEIGHT;
    let latin_w = latin as f32;
    let other_w = other as f32;
    let total = han_w + cjk_other_w + latin_w + other_w;
    if total == 0.0 {
        return LanguageGuess {
            language: Language::Other,
            han_share: 0.0,
            mixed: false,
        };
    }
    let han_share = han_w / total;
    let shares = [
        han_share,
        cjk_other_w / total,
        latin_w / total,
        other_w / total,
    ];
    let noticeable = shares.iter().filter(|&&s| s >= MIXED_FROM).count();
    let mixed = noticeable > 1;
    let language = if kana > 0 && kana as f32 * 10.0 >= (han + kana) as f32 || hangul > han {
        // Japanese (kana among the Han characters) or Korean.
        Language::Other
    } else if han_share >= ZH_FROM {
        Language::Zh
    } else if latin_w >= other_w + cjk_other_w && latin_w >= han_w {
        if looks_like_other_latin_language(text, latin, accented) {
            Language::Other
        } else {
            Language::En
        }
    } else if han_w >= other_w + cjk_other_w {
        Language::Zh
    } else {
        Language::Other
    };
    LanguageGuess {
        language,
        han_share,
        mixed,
    }
}

/// Returns true for CJK unified ideographs (with extensions) and compatibility ideographs.
pub fn is_han(c: char) -> bool {
    matches!(
        c,
        '\u{4e00}'..='\u{9fff}'
            | '\u{3400}'..='\u{4dbf}'
            | '\u{f900}'..='\u{faff}'
            | '\u{20000}'..='\u{2ebef}'
            | '\u{30000}'..='\u{3134f}'
            | '\u{3007}'
    )
}

/// Latin text with many accented letters and none of the commonest English words.
fn looks_like_other_latin_language(text: &str, latin: u32, accented: u32) -> bool {
    if accented == 0 || (accented as f32) < latin as f32 * 0.03 {
        return false;
    }
    const COMMON: [&str; 24] = [
        "the", "a", "an", "i", "you", "my", "is", "are", "to", "of", "and", "in", "it", "for",
        "not", "do", "can", "how", "what", "me", "please", "with", "was", "this",
    ];
    !text.split(|c: char| !c.is_alphabetic()).any(|word| {
        COMMON
            .iter()
            .any(|common| word.eq_ignore_ascii_case(common))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn language(text: &str) -> Language {
        detect_language(text).language
    }

    #[test]
    fn detects_chinese_and_english() {
        assert_eq!(language("我的快递三天了还没到"), Language::Zh);
        assert_eq!(language("My card still hasn't arrived"), Language::En);
        assert_eq!(language("退款"), Language::Zh);
        assert_eq!(language("refund"), Language::En);
    }

    #[test]
    fn decides_mixed_text_by_weighted_share() {
        let guess = detect_language("我的iPhone怎么退货");
        assert_eq!(guess.language, Language::Zh);
        assert!(guess.mixed);
        let guess = detect_language("Please check the status of my order 订单");
        assert_eq!(guess.language, Language::En);
        assert!(guess.mixed);
        assert!(!detect_language("hello there").mixed);
    }

    #[test]
    fn recognises_other_languages() {
        assert_eq!(language("注文はまだ届いていません"), Language::Other);
        assert_eq!(language("주문이 아직 도착하지 않았어요"), Language::Other);
        assert_eq!(language("Где мой заказ?"), Language::Other);
        assert_eq!(
            language("¿Dónde está mi pedido? Todavía no llegó, señor"),
            Language::Other
        );
        assert_eq!(language("I'd like a café au lait please"), Language::En);
    }

    #[test]
    fn text_without_letters_is_other() {
        assert_eq!(language(""), Language::Other);
        assert_eq!(language("12345678 !!! 🙂"), Language::Other);
    }
}
