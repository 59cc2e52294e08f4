//! Entities in a customer message: order numbers, phone numbers, amounts with a currency,
//! dates and e-mail addresses.
//!
//! Patterns run over the normalised text (so full-width digits and ￥ are already folded), and
//! spans are reported in bytes of the text the customer typed. Where candidates overlap, the
//! more specific kind wins: e-mail, phone, date, amount, prefixed order number, then a bare
//! alphanumeric order number.
//!
//! Order numbers are configurable: each pattern is a regular expression over the normalised
//! (lowercase) text whose first capture group, or whole match, is the number; a candidate must
//! contain a digit. The defaults accept 8–20 letters and digits, or 6–24 after a prefix such as
//! 订单号, 单号 or `order #`.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use tandem_text::{Normalised, normalise_with_offsets};

use crate::error::{NluError, NluResult};

/// A currency named in an amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Currency {
    /// Chinese yuan (¥, ￥, 元, 块, RMB, CNY).
    Cny,
    /// US dollar ($, USD).
    Usd,
    /// Euro (€, EUR).
    Eur,
    /// Pound sterling (£, GBP).
    Gbp,
}

/// A calendar date as written: absolute (possibly without a year) or relative to today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DateValue {
    /// A day of a month, with the year when it was written.
    Absolute {
        /// The year, when written.
        year: Option<i32>,
        /// 1–12.
        month: u8,
        /// 1–31, valid for the month.
        day: u8,
    },
    /// Days from today: −1 yesterday, 0 today, 1 tomorrow.
    Relative {
        /// The offset in days.
        days: i32,
    },
}

/// The normalised value of an entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntityValue {
    /// An order number, in capitals.
    OrderNumber {
        /// The number.
        number: String,
    },
    /// A phone number as `+` country code and digits when the country is known (Chinese mobile
    /// numbers get +86), digits only otherwise.
    Phone {
        /// The number.
        number: String,
    },
    /// An amount of money.
    Amount {
        /// The decimal value without thousands separators, e.g. `1234.50`.
        value: String,
        /// The currency.
        currency: Currency,
    },
    /// A date.
    Date {
        /// The date.
        date: DateValue,
    },
    /// An e-mail address, lowercase.
    Email {
        /// The address.
        address: String,
    },
}

/// An entity found in a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// The normalised value.
    pub value: EntityValue,
    /// The entity as the customer typed it.
    pub text: String,
    /// Byte offset in the message.
    pub start: usize,
    /// Byte offset one past the end in the message.
    pub end: usize,
}

/// Finds entities; build it once and share it.
#[derive(Debug, Clone)]
pub struct EntityExtractor {
    order_patterns: Vec<Regex>,
}

/// Default order number patterns: prefixed, then bare.
pub const DEFAULT_ORDER_PATTERNS: &[&str] = &[
    r"(?:订单编号|订单号码|订单号|订单|单号|order\s*(?:number|num|no\.?|id)?\s*#?|#)\s*[:#]?\s*([a-z0-9][a-z0-9-]{4,22}[a-z0-9])",
    r"[a-z0-9]{8,20}",
];

struct Patterns {
    email: Regex,
    cn_mobile: Regex,
    international: Regex,
    amount_prefix: Regex,
    amount_suffix: Regex,
    iso_date: Regex,
    zh_date: Regex,
    zh_month_day: Regex,
    slash_date: Regex,
    relative_date: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| {
    // The patterns are constants of this module and covered by its tests.
    let compile = |p: &str| Regex::new(p).expect("entity patterns are valid regular expressions");
    Patterns {
        email: compile(r"[a-z0-9][a-z0-9._%+-]*@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}"),
        cn_mobile: compile(r"(?:(?:\+|00)86[\s-]?)?1[3-9][0-9](?:[\s-]?[0-9]{4}){2}"),
        international: compile(
            r"(?:\+|00)[1-9][0-9]{0,2}[\s-]?(?:\(?[0-9]{1,4}\)?[\s-]?){1,4}[0-9]{2,4}",
        ),
        amount_prefix: compile(
            r"(us\$|\$|¥|€|£|rmb|cny|usd|eur|gbp)\s?([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.([0-9]{1,2}))?",
        ),
        amount_suffix: compile(
            r"([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.([0-9]{1,2}))?\s?(块钱|元|块|人民币|美元|欧元|英镑|rmb|cny|usd|dollars?|bucks|euros?|eur|gbp|pounds?)",
        ),
        iso_date: compile(r"([0-9]{4})[-/.]([0-9]{1,2})[-/.]([0-9]{1,2})"),
        zh_date: compile(r"([0-9]{4})\s?年\s?([0-9]{1,2})\s?月\s?([0-9]{1,2})\s?[日号]"),
        zh_month_day: compile(r"([0-9]{1,2})\s?月\s?([0-9]{1,2})\s?[日号]"),
        slash_date: compile(r"([0-9]{1,2})/([0-9]{1,2})(?:/([0-9]{4}|[0-9]{2}))?"),
        relative_date: compile(
            r"the day before yesterday|the day after tomorrow|yesterday|today|tomorrow|大前天|大后天|前天|昨天|昨日|今天|今日|明天|明日|后天",
        ),
    }
});

/// A candidate before overlaps are resolved; lower rank wins.
struct Candidate {
    rank: u8,
    start: usize,
    end: usize,
    value: EntityValue,
}

impl Default for EntityExtractor {
    fn default() -> Self {
        Self::new()
    }
}

impl EntityExtractor {
    /// Returns an extractor with the default order number patterns.
    pub fn new() -> Self {
        Self::with_order_patterns(DEFAULT_ORDER_PATTERNS)
            .expect("the default order patterns are valid regular expressions")
    }

    /// Returns an extractor with other order number patterns (see the module documentation).
    pub fn with_order_patterns(patterns: &[&str]) -> NluResult<Self> {
        let order_patterns = patterns
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|error| {
                    NluError::InvalidArgument(format!("order number pattern `{p}`: {error}"))
                })
            })
            .collect::<NluResult<_>>()?;
        Ok(Self { order_patterns })
    }

    /// Returns the entities of a message, in text order.
    pub fn extract(&self, message: &str) -> Vec<Entity> {
        self.extract_normalised(message, &normalise_with_offsets(message))
    }

    /// Returns the entities of a message already normalised with offsets.
    pub fn extract_normalised(&self, message: &str, normalised: &Normalised) -> Vec<Entity> {
        let text = normalised.as_str();
        let p = &*PATTERNS;
        let mut candidates = Vec::new();
        for m in p.email.find_iter(text) {
            let address = m.as_str().to_owned();
            candidates.push(Candidate {
                rank: 0,
                start: m.start(),
                end: m.end(),
                value: EntityValue::Email { address },
            });
        }
        for m in p.cn_mobile.find_iter(text) {
            if isolated(text, m.start(), m.end()) {
                let digits: String = m.as_str().chars().filter(char::is_ascii_digit).collect();
                let national = &digits[digits.len() - 11..];
                candidates.push(Candidate {
                    rank: 1,
                    start: m.start(),
                    end: m.end(),
                    value: EntityValue::Phone {
                        number: format!("+86{national}"),
                    },
                });
            }
        }
        for m in p.international.find_iter(text) {
            let digits: String = m.as_str().chars().filter(char::is_ascii_digit).collect();
            let digits = digits.strip_prefix("00").unwrap_or(&digits);
            if isolated(text, m.start(), m.end()) && (8..=15).contains(&digits.len()) {
                candidates.push(Candidate {
                    rank: 1,
                    start: m.start(),
                    end: m.end(),
                    value: EntityValue::Phone {
                        number: format!("+{digits}"),
                    },
                });
            }
        }
        self.dates(text, &mut candidates);
        amounts(text, &mut candidates);
        for (i, regex) in self.order_patterns.iter().enumerate() {
            for captures in regex.captures_iter(text) {
                let Some(m) = captures.get(1).or_else(|| captures.get(0)) else {
                    continue;
                };
                let number = m.as_str();
                if !number.bytes().any(|b| b.is_ascii_digit())
                    || !isolated(text, m.start(), m.end())
                {
                    continue;
                }
                candidates.push(Candidate {
                    rank: 4 + u8::try_from(i.min(10)).unwrap_or(10),
                    start: m.start(),
                    end: m.end(),
                    value: EntityValue::OrderNumber {
                        number: number.to_uppercase(),
                    },
                });
            }
        }
        resolve(candidates)
            .into_iter()
            .map(|c| {
                let range = normalised.source_range(c.start..c.end);
                Entity {
                    value: c.value,
                    text: message.get(range.clone()).unwrap_or_default().to_owned(),
                    start: range.start,
                    end: range.end,
                }
            })
            .collect()
    }

    fn dates(&self, text: &str, out: &mut Vec<Candidate>) {
        let p = &*PATTERNS;
        let number = |c: &regex::Captures<'_>, i: usize| -> Option<u32> {
            c.get(i).and_then(|m| m.as_str().parse().ok())
        };
        for regex in [&p.iso_date, &p.zh_date] {
            for c in regex.captures_iter(text) {
                let (Some(year), Some(month), Some(day)) =
                    (number(&c, 1), number(&c, 2), number(&c, 3))
                else {
                    continue;
                };
                if let (Some(m), Some(date)) = (c.get(0), absolute(Some(year as i32), month, day))
                    && isolated(text, m.start(), m.end())
                {
                    out.push(Candidate {
                        rank: 2,
                        start: m.start(),
                        end: m.end(),
                        value: date,
                    });
                }
            }
        }
        for c in p.zh_month_day.captures_iter(text) {
            if let (Some(m), Some(month), Some(day)) = (c.get(0), number(&c, 1), number(&c, 2))
                && let Some(date) = absolute(None, month, day)
            {
                out.push(Candidate {
                    rank: 2,
                    start: m.start(),
                    end: m.end(),
                    value: date,
                });
            }
        }
        for c in p.slash_date.captures_iter(text) {
            let (Some(m), Some(a), Some(b)) = (c.get(0), number(&c, 1), number(&c, 2)) else {
                continue;
            };
            if !isolated(text, m.start(), m.end()) {
                continue;
            }
            let year = number(&c, 3).map(|y| if y < 100 { 2000 + y as i32 } else { y as i32 });
            // Month first (11/25) unless that cannot be a month (25/11).
            let date = absolute(year, a, b).or_else(|| absolute(year, b, a));
            if let Some(date) = date {
                out.push(Candidate {
                    rank: 2,
                    start: m.start(),
                    end: m.end(),
                    value: date,
                });
            }
        }
        for m in p.relative_date.find_iter(text) {
            let days = match m.as_str() {
                "the day before yesterday" | "前天" => -2,
                "yesterday" | "昨天" | "昨日" => -1,
                "today" | "今天" | "今日" => 0,
                "tomorrow" | "明天" | "明日" => 1,
                "the day after tomorrow" | "后天" => 2,
                "大前天" => -3,
                "大后天" => 3,
                _ => continue,
            };
            let ascii = m.as_str().is_ascii();
            if ascii && !word_bounded(text, m.start(), m.end()) {
                continue;
            }
            out.push(Candidate {
                rank: 2,
                start: m.start(),
                end: m.end(),
                value: EntityValue::Date {
                    date: DateValue::Relative { days },
                },
            });
        }
    }
}

fn amounts(text: &str, out: &mut Vec<Candidate>) {
    let p = &*PATTERNS;
    let currency = |symbol: &str| -> Option<Currency> {
        Some(match symbol {
            "¥" | "rmb" | "cny" | "元" | "块" | "块钱" | "人民币" => Currency::Cny,
            "$" | "us$" | "usd" | "dollar" | "dollars" | "bucks" | "美元" => Currency::Usd,
            "€" | "eur" | "euro" | "euros" | "欧元" => Currency::Eur,
            "£" | "gbp" | "pound" | "pounds" | "英镑" => Currency::Gbp,
            _ => return None,
        })
    };
    let value = |whole: &str, fraction: Option<regex::Match<'_>>| {
        let whole = whole.replace(',', "");
        match fraction {
            Some(f) => format!("{whole}.{}", f.as_str()),
            None => whole,
        }
    };
    for c in p.amount_prefix.captures_iter(text) {
        let (Some(m), Some(symbol), Some(whole)) = (c.get(0), c.get(1), c.get(2)) else {
            continue;
        };
        let Some(currency) = currency(symbol.as_str()) else {
            continue;
        };
        if symbol.as_str().is_ascii() && !word_bounded(text, symbol.start(), symbol.end()) {
            continue;
        }
        let value = value(whole.as_str(), c.get(3));
        out.push(Candidate {
            rank: 3,
            start: m.start(),
            end: m.end(),
            value: EntityValue::Amount { value, currency },
        });
    }
    for c in p.amount_suffix.captures_iter(text) {
        let (Some(m), Some(whole), Some(unit)) = (c.get(0), c.get(1), c.get(3)) else {
            continue;
        };
        let Some(currency) = currency(unit.as_str()) else {
            continue;
        };
        if !isolated(text, m.start(), whole.end())
            || (unit.as_str().is_ascii() && !word_bounded(text, unit.start(), m.end()))
        {
            continue;
        }
        let value = value(whole.as_str(), c.get(2));
        out.push(Candidate {
            rank: 3,
            start: m.start(),
            end: m.end(),
            value: EntityValue::Amount { value, currency },
        });
    }
}

fn absolute(year: Option<i32>, month: u32, day: u32) -> Option<EntityValue> {
    if !(1..=12).contains(&month) || day == 0 {
        return None;
    }
    let leap = year.is_none_or(|y| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day > days_in_month || year.is_some_and(|y| !(1900..=2200).contains(&y)) {
        return None;
    }
    Some(EntityValue::Date {
        date: DateValue::Absolute {
            year,
            month: month as u8,
            day: day as u8,
        },
    })
}

/// True when the span is not glued to further ASCII letters or digits.
fn isolated(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(|c| c.is_ascii_alphanumeric())
        && !after.is_some_and(|c| c.is_ascii_alphanumeric())
}

/// True when the span does not start or end inside an ASCII word.
fn word_bounded(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(|c| c.is_ascii_alphabetic())
        && !after.is_some_and(|c| c.is_ascii_alphabetic())
}

/// Keeps the best candidates that do not overlap, in text order.
fn resolve(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    candidates.sort_by(|a, b| {
        (a.rank, b.end - b.start, a.start).cmp(&(b.rank, a.end - a.start, b.start))
    });
    let mut kept: Vec<Candidate> = Vec::new();
    for candidate in candidates {
        if kept
            .iter()
            .all(|k| candidate.end <= k.start || k.end <= candidate.start)
        {
            kept.push(candidate);
        }
    }
    kept.sort_by_key(|c| c.start);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(message: &str) -> Vec<EntityValue> {
        EntityExtractor::new()
            .extract(message)
            .into_iter()
            .map(|e| e.value)
            .collect()
    }

    fn order(number: &str) -> EntityValue {
        EntityValue::OrderNumber {
            number: number.to_owned(),
        }
    }

    fn phone(number: &str) -> EntityValue {
        EntityValue::Phone {
            number: number.to_owned(),
        }
    }

    fn amount(value: &str, currency: Currency) -> EntityValue {
        EntityValue::Amount {
            value: value.to_owned(),
            currency,
        }
    }

    fn date(year: Option<i32>, month: u8, day: u8) -> EntityValue {
        EntityValue::Date {
            date: DateValue::Absolute { year, month, day },
        }
    }

    fn relative(days: i32) -> EntityValue {
        EntityValue::Date {
            date: DateValue::Relative { days },
        }
    }

    #[test]
    fn finds_order_numbers() {
        assert_eq!(
            values("订单号：ＡＢ１２３４５６７８还没发货"),
            [order("AB12345678")]
        );
        assert_eq!(values("my order #A1B2C3 hasn't shipped"), [order("A1B2C3")]);
        assert_eq!(
            values("order number 2026112500123"),
            [order("2026112500123")]
        );
        assert_eq!(values("单号 SF1234567890123"), [order("SF1234567890123")]);
        assert_eq!(values("ref XK29384756 please"), [order("XK29384756")]);
        assert!(values("abcdefghij has no digits").is_empty());
        assert!(values("the code 1234567 is short").is_empty());
    }

    #[test]
    fn accepts_configured_order_patterns() {
        let extractor = EntityExtractor::with_order_patterns(&[r"\b(ord-[0-9]{4})\b"]).unwrap();
        let found = extractor.extract("Where is ORD-1234? Not XK29384756.");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].value, order("ORD-1234"));
        assert_eq!(found[0].text, "ORD-1234");
        assert!(EntityExtractor::with_order_patterns(&["(unclosed"]).is_err());
    }

    #[test]
    fn finds_phone_numbers() {
        assert_eq!(values("我的手机号是13812345678"), [phone("+8613812345678")]);
        assert_eq!(values("call 138-1234-5678"), [phone("+8613812345678")]);
        assert_eq!(values("+86 138 1234 5678"), [phone("+8613812345678")]);
        assert_eq!(
            values("reach me at +44 20 7946 0958"),
            [phone("+442079460958")]
        );
        assert_eq!(
            values("手机 １３９ ８７６５ ４３２１"),
            [phone("+8613987654321")]
        );
    }

    #[test]
    fn finds_amounts_with_currency() {
        assert_eq!(values("退我￥128.50"), [amount("128.50", Currency::Cny)]);
        assert_eq!(
            values("charged $1,299.99 twice"),
            [amount("1299.99", Currency::Usd)]
        );
        assert_eq!(values("多扣了30元"), [amount("30", Currency::Cny)]);
        assert_eq!(values("才50块钱"), [amount("50", Currency::Cny)]);
        assert_eq!(values("I paid 20 USD"), [amount("20", Currency::Usd)]);
        assert_eq!(values("RMB 300"), [amount("300", Currency::Cny)]);
        assert_eq!(values("€15"), [amount("15", Currency::Eur)]);
        assert_eq!(values("it costs 12 euros"), [amount("12", Currency::Eur)]);
        assert!(values("3 items").is_empty());
    }

    #[test]
    fn finds_dates() {
        assert_eq!(values("2026-11-25 delivery"), [date(Some(2026), 11, 25)]);
        assert_eq!(values("2026年11月25日下单"), [date(Some(2026), 11, 25)]);
        assert_eq!(values("11月25号到货"), [date(None, 11, 25)]);
        assert_eq!(values("on 11/25"), [date(None, 11, 25)]);
        assert_eq!(values("on 25/11/2026"), [date(Some(2026), 11, 25)]);
        assert_eq!(
            values("昨天下的单，今天还没到"),
            [relative(-1), relative(0)]
        );
        assert_eq!(values("It came yesterday"), [relative(-1)]);
        assert_eq!(values("前天"), [relative(-2)]);
        assert!(
            values("2026-02-30")
                .iter()
                .all(|v| !matches!(v, EntityValue::Date { .. }))
        );
        assert!(values("13/13").is_empty());
        assert!(values("todays").is_empty());
    }

    #[test]
    fn finds_email_addresses() {
        assert_eq!(
            values("write to Li.Wei+cs@Example.com.cn"),
            [EntityValue::Email {
                address: "li.wei+cs@example.com.cn".to_owned()
            }]
        );
    }

    #[test]
    fn reports_spans_in_the_original_message() {
        let message = "订单号：ＡＢ１２３４５６７８，电话 13812345678，退款￥20";
        let found = EntityExtractor::new().extract(message);
        assert_eq!(found.len(), 3, "{found:?}");
        for entity in &found {
            assert_eq!(&message[entity.start..entity.end], entity.text);
        }
        assert_eq!(found[0].text, "ＡＢ１２３４５６７８");
        assert_eq!(found[1].text, "13812345678");
        assert_eq!(found[2].text, "￥20");
    }

    #[test]
    fn prefers_the_more_specific_kind_on_overlap() {
        // A mobile number is also 11 digits that could be an order number.
        assert_eq!(values("13812345678"), [phone("+8613812345678")]);
        // The year-month-day is a date, not an amount or an order number.
        assert_eq!(
            values("20 dollars on 2026-01-05"),
            [amount("20", Currency::Usd), date(Some(2026), 1, 5)]
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_spans_are_valid(message in "\\PC{0,60}") {
            for entity in EntityExtractor::new().extract(&message) {
                proptest::prop_assert_eq!(message.get(entity.start..entity.end), Some(entity.text.as_str()));
            }
        }
    }
}
