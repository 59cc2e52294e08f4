//! Common problems: complaints and failed bot turns of a scenario, clustered by keywords.
//!
//! Items are tokenised (jieba words from `tandem-text` for Chinese, words for English), stop
//! words are dropped, and clusters are formed greedily per scenario and language: the keyword
//! shared by the most items not yet clustered leads a cluster of the items that contain it; the
//! keywords most frequent among those items describe it. A cluster's id derives from its
//! scenario, language and leading keyword, so it stays the same while the problem persists.

use super::feedback::{detect_language, is_han, language};
use super::{Micros, truncate_chars};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One complaint or failed bot turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProblemItem {
    /// The customer's words: a comment, or the sentences of a handoff summary.
    pub text: String,
    /// Scenario, empty when unknown.
    pub scenario_id: String,
    /// `Language` value; unspecified is detected.
    pub language: i32,
    /// Intents involved.
    pub intents: Vec<String>,
    /// When it happened.
    pub at: Micros,
}

/// A cluster of similar items.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Stable identifier.
    pub id: String,
    /// Scenario.
    pub scenario_id: String,
    /// Keywords, leading one first, at most 10.
    pub keywords: Vec<String>,
    /// Items in the range.
    pub count: i64,
    /// Items of the previous range of equal length with the leading keyword.
    pub previous_count: i64,
    /// (count − previous) / max(previous, 1).
    pub trend: f64,
    /// Example texts, newest first, at most 5 of at most 500 characters.
    pub examples: Vec<String>,
    /// Intents most involved, at most 5.
    pub intents: Vec<String>,
    /// `Language` value.
    pub language: i32,
}

/// An item with its keywords.
type Tokenised<'a> = (&'a ProblemItem, BTreeSet<String>);

const ENGLISH_STOP_WORDS: &[&str] = &[
    "a", "about", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "been", "before", "but", "by", "can", "could", "did", "do", "does", "doing", "don",
    "even", "ever", "for", "from", "get", "got", "had", "has", "have", "he", "her", "here", "him",
    "his", "how", "i", "if", "in", "into", "is", "it", "its", "just", "me", "more", "my", "no",
    "not", "now", "of", "on", "one", "only", "or", "our", "out", "please", "really", "she", "so",
    "some", "still", "than", "thank", "thanks", "that", "the", "their", "them", "then", "there",
    "they", "this", "to", "too", "up", "us", "very", "was", "we", "were", "what", "when", "where",
    "which", "who", "why", "will", "with", "would", "you", "your", "i'm", "it's", "can't",
    "didn't", "doesn't", "don't", "isn't", "wasn't", "won't", "ve", "ll", "re",
];

const CHINESE_STOP_WORDS: &[&str] = &[
    "的",
    "了",
    "是",
    "我",
    "你",
    "他",
    "她",
    "它",
    "们",
    "在",
    "有",
    "和",
    "就",
    "不",
    "也",
    "都",
    "很",
    "吗",
    "吧",
    "呢",
    "啊",
    "呀",
    "哦",
    "嗯",
    "这",
    "那",
    "个",
    "一",
    "还",
    "又",
    "没",
    "没有",
    "什么",
    "怎么",
    "为什么",
    "可以",
    "已经",
    "但是",
    "因为",
    "所以",
    "如果",
    "请",
    "谢谢",
    "您",
    "好",
    "我们",
    "你们",
    "他们",
    "就是",
    "一个",
    "这个",
    "那个",
    "还是",
    "而且",
    "然后",
    "现在",
    "时候",
    "到",
    "给",
    "说",
    "要",
    "会",
    "让",
    "被",
    "把",
    "对",
    "从",
    "跟",
    "与",
    "及",
    "等",
    "着",
    "过",
    "得",
    "地",
    "之",
    "其",
    "或",
    "才",
    "再",
    "上",
    "下",
    "里",
    "中",
    "自己",
    "真的",
];

/// Returns the keywords of a text: lower-case words without stop words, punctuation or numbers.
pub fn keywords(text: &str, lang: i32) -> BTreeSet<String> {
    let lang = if lang == language::UNSPECIFIED {
        detect_language(text)
    } else {
        lang
    };
    let mut out = BTreeSet::new();
    if lang == language::ZH {
        for token in tandem_text::jieba_words(text) {
            let word = token.text.trim().to_lowercase();
            let has_han = word.chars().any(is_han);
            let useful = if has_han {
                word.chars().all(|c| is_han(c) || c.is_alphanumeric())
            } else {
                word.chars().count() >= 3 && word.chars().all(|c| c.is_ascii_alphabetic())
            };
            if useful && !CHINESE_STOP_WORDS.contains(&word.as_str()) {
                out.insert(word);
            }
        }
    } else {
        for word in text
            .split(|c: char| !(c.is_alphanumeric() || c == '\''))
            .map(|w| w.trim_matches('\'').to_lowercase())
        {
            if word.chars().count() >= 3
                && word.chars().any(|c| c.is_alphabetic())
                && !ENGLISH_STOP_WORDS.contains(&word.as_str())
            {
                out.insert(stem(&word));
            }
        }
    }
    out
}

/// Folds the commonest English inflections so "refunds" and "refund" meet.
fn stem(word: &str) -> String {
    for (suffix, keep) in [("ies", "y"), ("sses", "ss"), ("s", "")] {
        if let Some(base) = word.strip_suffix(suffix)
            && base.chars().count() >= 3
            && !base.ends_with('s')
        {
            return format!("{base}{keep}");
        }
    }
    word.to_owned()
}

/// The fewest items a cluster has.
pub const MIN_CLUSTER: usize = 2;

/// Clusters `current` items; `previous` are those of the range before, for the trend.
pub fn cluster(current: &[ProblemItem], previous: &[ProblemItem], limit: usize) -> Vec<Cluster> {
    let mut groups: BTreeMap<(String, i32), Vec<Tokenised<'_>>> = BTreeMap::new();
    for item in current {
        let lang = effective_language(item);
        let words = keywords(&item.text, lang);
        if !words.is_empty() {
            groups
                .entry((item.scenario_id.clone(), lang))
                .or_default()
                .push((item, words));
        }
    }
    let mut previous_words: HashMap<(String, i32), Vec<BTreeSet<String>>> = HashMap::new();
    for item in previous {
        let lang = effective_language(item);
        previous_words
            .entry((item.scenario_id.clone(), lang))
            .or_default()
            .push(keywords(&item.text, lang));
    }
    let mut clusters = Vec::new();
    for ((scenario, lang), mut items) in groups {
        // Newest first, so examples are the latest.
        items.sort_by(|a, b| b.0.at.cmp(&a.0.at).then_with(|| a.0.text.cmp(&b.0.text)));
        let mut remaining: Vec<usize> = (0..items.len()).collect();
        while clusters.len() < limit * 4 {
            let mut df: BTreeMap<&str, usize> = BTreeMap::new();
            for &i in &remaining {
                for word in &items[i].1 {
                    *df.entry(word.as_str()).or_default() += 1;
                }
            }
            let Some((lead, lead_count)) = df
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(w, n)| ((*w).to_owned(), *n))
            else {
                break;
            };
            if lead_count < MIN_CLUSTER {
                break;
            }
            let (members, rest): (Vec<usize>, Vec<usize>) =
                remaining.iter().partition(|&&i| items[i].1.contains(&lead));
            remaining = rest;
            let mut co: BTreeMap<&str, usize> = BTreeMap::new();
            let mut intents: BTreeMap<&str, usize> = BTreeMap::new();
            for &i in &members {
                for word in &items[i].1 {
                    if *word != lead {
                        *co.entry(word.as_str()).or_default() += 1;
                    }
                }
                for intent in &items[i].0.intents {
                    if !intent.is_empty() {
                        *intents.entry(intent.as_str()).or_default() += 1;
                    }
                }
            }
            let mut keywords = vec![lead.clone()];
            keywords.extend(
                top(&co, 9)
                    .into_iter()
                    .filter(|(_, n)| *n >= 2 || members.len() <= 2)
                    .map(|(w, _)| w),
            );
            let previous_count = previous_words
                .get(&(scenario.clone(), lang))
                .map_or(0, |all| all.iter().filter(|w| w.contains(&lead)).count())
                as i64;
            let count = members.len() as i64;
            clusters.push(Cluster {
                id: cluster_id(&scenario, lang, &lead),
                scenario_id: scenario.clone(),
                keywords,
                count,
                previous_count,
                trend: (count - previous_count) as f64 / previous_count.max(1) as f64,
                examples: members
                    .iter()
                    .take(5)
                    .map(|&i| truncate_chars(&items[i].0.text, 500))
                    .collect(),
                intents: top(&intents, 5).into_iter().map(|(w, _)| w).collect(),
                language: lang,
            });
        }
    }
    clusters.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.id.cmp(&b.id)));
    clusters.truncate(limit);
    clusters
}

fn effective_language(item: &ProblemItem) -> i32 {
    if item.language == language::UNSPECIFIED {
        detect_language(&item.text)
    } else {
        item.language
    }
}

fn top(counts: &BTreeMap<&str, usize>, n: usize) -> Vec<(String, usize)> {
    let mut ranked: Vec<(String, usize)> =
        counts.iter().map(|(w, c)| ((*w).to_owned(), *c)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(n);
    ranked
}

/// FNV-1a over scenario, language and leading keyword.
fn cluster_id(scenario: &str, lang: i32, lead: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in scenario
        .bytes()
        .chain([0, lang as u8, 0])
        .chain(lead.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("pc-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(text: &str, scenario: &str, at: Micros) -> ProblemItem {
        ProblemItem {
            text: text.into(),
            scenario_id: scenario.into(),
            language: 0,
            intents: vec!["refund_status".into()],
            at,
        }
    }

    #[test]
    fn chinese_complaints_cluster_by_jieba_words() {
        let items = [
            item("退款到现在还没到账，太慢了", "refund", 1),
            item("退款太慢，等了一个星期", "refund", 2),
            item("客服态度很差", "refund", 3),
            item("退款申请一直没有处理", "refund", 4),
            item("改签以后航班又延误了", "rebooking", 5),
            item("航班延误也不通知", "rebooking", 6),
        ];
        let previous = [item("退款慢", "refund", 0)];
        let clusters = cluster(&items, &previous, 10);
        let refund = clusters.iter().find(|c| c.scenario_id == "refund").unwrap();
        assert_eq!(refund.keywords[0], "退款");
        assert_eq!(refund.count, 3);
        assert_eq!(refund.previous_count, 1);
        assert_eq!(refund.trend, 2.0);
        assert_eq!(refund.examples[0], "退款申请一直没有处理", "newest first");
        assert_eq!(refund.intents, ["refund_status"]);
        assert_eq!(refund.language, language::ZH);
        let rebooking = clusters
            .iter()
            .find(|c| c.scenario_id == "rebooking")
            .unwrap();
        assert_eq!(rebooking.keywords[0], "延误");
        assert_eq!(
            cluster(&items, &previous, 10)[0].id,
            refund.id,
            "ids are stable across runs"
        );
    }

    #[test]
    fn english_words_are_stemmed_and_stop_words_dropped() {
        let words = keywords("The refunds are still not here, please help!", language::EN);
        assert_eq!(words.into_iter().collect::<Vec<_>>(), ["help", "refund"]);
        let items = [
            item("my refund never arrived", "refund", 1),
            item("refunds take forever", "refund", 2),
            item("agent was rude", "refund", 3),
        ];
        let clusters = cluster(&items, &[], 1);
        assert_eq!(clusters.len(), 1);
        assert_eq!(clusters[0].keywords[0], "refund");
        assert_eq!(clusters[0].count, 2);
    }
}
