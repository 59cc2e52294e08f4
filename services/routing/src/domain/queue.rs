//! Queues: required skills, priority weights, business hours, out-of-hours behaviour, overflow
//! steps, maximum length and offer timeout.

use std::time::Duration;

use chrono::{DateTime, Datelike as _, NaiveDate, NaiveDateTime, Timelike as _, Utc};
use serde::{Deserialize, Serialize};

use super::agent::{SkillRequirement, check_level, check_skill_name};
use super::{check_id, check_len};
use crate::error::{RoutingError, invalid};

/// The shortest offer timeout a queue may set.
pub const MIN_OFFER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest offer timeout a queue may set.
pub const MAX_OFFER_TIMEOUT: Duration = Duration::from_secs(300);
/// The offer timeout of a queue that sets none.
pub const DEFAULT_OFFER_TIMEOUT: Duration = Duration::from_secs(30);

/// Weights that turn a base priority into an effective one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PriorityWeights {
    /// Added for VIP customers.
    pub vip_boost: f64,
    /// Multiplied by the negative-emotion severity (0..1).
    pub emotion_weight: f64,
    /// Added per second waited.
    pub ageing_per_second: f64,
}

/// One weekly opening window, in the queue's local time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklyWindow {
    /// 1 = Monday … 7 = Sunday.
    pub day: u32,
    /// Opening, minutes after local midnight.
    pub start_minute: u32,
    /// Closing (exclusive), minutes after local midnight.
    pub end_minute: u32,
}

/// When a queue is staffed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessHours {
    /// The zone as given: an IANA name (`Asia/Shanghai`, `Europe/Berlin`, with its daylight
    /// saving rules), a fixed offset (`UTC`, `+08:00`, `UTC-05:30`), or empty for UTC.
    pub timezone: String,
    /// Opening windows; none means always open.
    pub windows: Vec<WeeklyWindow>,
    /// Closed local dates, `YYYY-MM-DD`.
    pub holidays: Vec<String>,
}

/// What happens to a handoff that arrives outside business hours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutOfHours {
    /// Back to the bot, which offers to take a message.
    #[default]
    LeaveMessage,
    /// Back to the bot without a message offer.
    ReturnToBot,
}

/// What an overflow step does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverflowAction {
    /// Drops these skills from the ticket's requirements.
    WidenSkills(Vec<String>),
    /// Moves the ticket to this queue.
    MoveToQueue(String),
}

/// An escalation applied once a ticket has waited `after` in the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverflowStep {
    /// Wait before it applies.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// What it does.
    pub action: OverflowAction,
}

/// How a queue orders eligible agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Best skill match, then most spare capacity, then longest idle.
    #[default]
    LeastLoaded,
    /// Longest idle first.
    RoundRobin,
}

/// A queue's definition.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSpec {
    /// Identifier: lower-case letters, digits, `_` and `-`, at most 64.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Scenarios routed here when the handoff names no queue.
    pub scenario_ids: Vec<String>,
    /// Skills every agent taking from the queue needs.
    pub required_skills: Vec<SkillRequirement>,
    /// Priority weights.
    pub weights: PriorityWeights,
    /// Opening hours.
    pub hours: BusinessHours,
    /// Out-of-hours behaviour.
    pub out_of_hours: OutOfHours,
    /// Overflow steps, ascending by `after`.
    pub overflow: Vec<OverflowStep>,
    /// Most waiting tickets; 0 = unlimited.
    pub max_length: i32,
    /// Time to accept an offer.
    pub offer_timeout: Duration,
    /// Agent ordering.
    pub strategy: Strategy,
}

impl QueueSpec {
    /// A queue that is always open, needs no skills and uses the defaults.
    pub fn open(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            name: id.to_owned(),
            scenario_ids: Vec::new(),
            required_skills: Vec::new(),
            weights: PriorityWeights::default(),
            hours: BusinessHours::default(),
            out_of_hours: OutOfHours::default(),
            overflow: Vec::new(),
            max_length: 0,
            offer_timeout: DEFAULT_OFFER_TIMEOUT,
            strategy: Strategy::default(),
        }
    }

    /// Checks every field; the first problem is reported.
    pub fn validate(&self) -> Result<(), RoutingError> {
        check_queue_id("queue.id", &self.id)?;
        check_len("queue.name", &self.name, 200)?;
        if self.scenario_ids.len() > 100 {
            return Err(invalid("queue.scenario_ids has more than 100 entries"));
        }
        for (i, scenario) in self.scenario_ids.iter().enumerate() {
            check_id(&format!("queue.scenario_ids[{i}]"), scenario)?;
        }
        if self.required_skills.len() > 10 {
            return Err(invalid("queue.required_skills has more than 10 entries"));
        }
        for (i, skill) in self.required_skills.iter().enumerate() {
            check_skill_name(&format!("queue.required_skills[{i}].name"), &skill.name)?;
            check_level(
                &format!("queue.required_skills[{i}].min_level"),
                skill.min_level,
            )?;
        }
        for (name, value) in [
            ("vip_boost", self.weights.vip_boost),
            ("emotion_weight", self.weights.emotion_weight),
            ("ageing_per_second", self.weights.ageing_per_second),
        ] {
            if !value.is_finite() || !(0.0..=1000.0).contains(&value) {
                return Err(invalid(format!(
                    "queue.weights.{name} is {value}, must be 0..=1000"
                )));
            }
        }
        self.hours.validate()?;
        if self.overflow.len() > 10 {
            return Err(invalid("queue.overflow has more than 10 steps"));
        }
        let mut previous = Duration::ZERO;
        for (i, step) in self.overflow.iter().enumerate() {
            if step.after.is_zero() || step.after < previous {
                return Err(invalid(format!(
                    "queue.overflow[{i}].after must be positive and not shorter than the step before"
                )));
            }
            previous = step.after;
            match &step.action {
                OverflowAction::WidenSkills(skills) => {
                    if skills.is_empty() {
                        return Err(invalid(format!(
                            "queue.overflow[{i}].drop_skills is empty for WIDEN_SKILLS"
                        )));
                    }
                    for skill in skills {
                        check_skill_name(&format!("queue.overflow[{i}].drop_skills"), skill)?;
                    }
                }
                OverflowAction::MoveToQueue(target) => {
                    check_queue_id(&format!("queue.overflow[{i}].target_queue_id"), target)?;
                    if *target == self.id {
                        return Err(invalid(format!(
                            "queue.overflow[{i}].target_queue_id is the queue itself"
                        )));
                    }
                }
            }
        }
        if self.max_length < 0 {
            return Err(invalid("queue.max_length must not be negative"));
        }
        if self.offer_timeout < MIN_OFFER_TIMEOUT || self.offer_timeout > MAX_OFFER_TIMEOUT {
            return Err(invalid(format!(
                "queue.offer_timeout is {:?}, must be 5s..=300s",
                self.offer_timeout
            )));
        }
        Ok(())
    }

    /// Returns whether the queue is open at `at`.
    pub fn is_open(&self, at: DateTime<Utc>) -> bool {
        self.hours.is_open(at)
    }
}

/// Checks a queue identifier.
pub fn check_queue_id(field: &str, id: &str) -> Result<(), RoutingError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field} {id:?} must be 1 to 64 lower-case letters, digits, '_' or '-'"
        )))
    }
}

/// Parses a fixed UTC offset into minutes east of UTC: empty, `UTC`, `Z`, `GMT`, or
/// `[UTC|GMT]±HH[:MM]`.
pub fn parse_utc_offset(zone: &str) -> Option<i32> {
    let zone = zone.trim();
    let rest = zone
        .strip_prefix("UTC")
        .or_else(|| zone.strip_prefix("GMT"))
        .unwrap_or(zone);
    if rest.is_empty() || rest == "Z" {
        return Some(0);
    }
    let (sign, digits) = match rest.as_bytes().first()? {
        b'+' => (1, &rest[1..]),
        b'-' => (-1, &rest[1..]),
        _ => return None,
    };
    // Only ASCII digits and one colon may follow the sign: this also keeps the split below on
    // a character boundary (a multi-byte character there would make `split_at` panic).
    if !digits.bytes().all(|b| b.is_ascii_digit() || b == b':') {
        return None;
    }
    let (hours, minutes) = match digits.split_once(':') {
        Some((h, m)) => (h, m),
        None if digits.len() == 4 => digits.split_at(2),
        None => (digits, "0"),
    };
    if hours.is_empty() || hours.len() > 2 || minutes.is_empty() || minutes.len() > 2 {
        return None;
    }
    let hours: i32 = hours.parse().ok()?;
    let minutes: i32 = minutes.parse().ok()?;
    if hours > 14 || minutes > 59 {
        return None;
    }
    Some(sign * (hours * 60 + minutes))
}

/// A queue's time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// A fixed offset, minutes east of UTC.
    Fixed(i32),
    /// An IANA zone, whose offset follows its daylight saving rules.
    Iana(chrono_tz::Tz),
}

impl Zone {
    /// Parses a fixed offset (see [`parse_utc_offset`]) or an IANA zone name such as
    /// `Asia/Shanghai` (case as in the IANA database).
    pub fn parse(zone: &str) -> Option<Self> {
        if let Some(minutes) = parse_utc_offset(zone) {
            return Some(Zone::Fixed(minutes));
        }
        zone.trim().parse::<chrono_tz::Tz>().ok().map(Zone::Iana)
    }

    /// The local wall-clock time at `at`.
    pub fn local(self, at: DateTime<Utc>) -> NaiveDateTime {
        match self {
            Zone::Fixed(minutes) => at.naive_utc() + chrono::Duration::minutes(i64::from(minutes)),
            Zone::Iana(tz) => at.with_timezone(&tz).naive_local(),
        }
    }
}

impl BusinessHours {
    /// Checks the zone, windows and holidays.
    pub fn validate(&self) -> Result<(), RoutingError> {
        if Zone::parse(&self.timezone).is_none() {
            return Err(invalid(format!(
                "queue.business_hours.timezone {:?} is neither an IANA time zone such as \
                 \"Asia/Shanghai\" nor a fixed UTC offset such as \"+08:00\" or \"UTC\"",
                self.timezone
            )));
        }
        if self.windows.len() > 50 {
            return Err(invalid(
                "queue.business_hours.windows has more than 50 entries",
            ));
        }
        for (i, window) in self.windows.iter().enumerate() {
            if !(1..=7).contains(&window.day) {
                return Err(invalid(format!(
                    "queue.business_hours.windows[{i}].day is unspecified"
                )));
            }
            if window.start_minute > 1439
                || window.end_minute > 1440
                || window.end_minute <= window.start_minute
            {
                return Err(invalid(format!(
                    "queue.business_hours.windows[{i}] must have 0 <= start_minute < end_minute <= 1440"
                )));
            }
        }
        if self.holidays.len() > 366 {
            return Err(invalid(
                "queue.business_hours.holidays has more than 366 dates",
            ));
        }
        for (i, day) in self.holidays.iter().enumerate() {
            if NaiveDate::parse_from_str(day, "%Y-%m-%d").is_err() {
                return Err(invalid(format!(
                    "queue.business_hours.holidays[{i}] {day:?} is not YYYY-MM-DD"
                )));
            }
        }
        Ok(())
    }

    /// Returns whether `at` falls in an opening window and not on a holiday, in local time. In
    /// an IANA zone the windows follow the wall clock across daylight saving changes (a window
    /// in the hour skipped in spring does not open that day).
    pub fn is_open(&self, at: DateTime<Utc>) -> bool {
        let local = Zone::parse(&self.timezone)
            .unwrap_or(Zone::Fixed(0))
            .local(at);
        let date = local.date().format("%Y-%m-%d").to_string();
        if self.holidays.contains(&date) {
            return false;
        }
        if self.windows.is_empty() {
            return true;
        }
        let day = local.weekday().number_from_monday();
        let minute = local.hour() * 60 + local.minute();
        self.windows
            .iter()
            .any(|w| w.day == day && w.start_minute <= minute && minute < w.end_minute)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    #[test]
    fn parses_fixed_offsets_and_refuses_names() {
        assert_eq!(parse_utc_offset(""), Some(0));
        assert_eq!(parse_utc_offset("UTC"), Some(0));
        assert_eq!(parse_utc_offset("+08:00"), Some(480));
        assert_eq!(parse_utc_offset("UTC-05:30"), Some(-330));
        assert_eq!(parse_utc_offset("GMT+8"), Some(480));
        assert_eq!(parse_utc_offset("+0530"), Some(330));
        assert_eq!(parse_utc_offset("Asia/Shanghai"), None);
        assert_eq!(parse_utc_offset("+25:00"), None);
        // Non-ASCII or signed parts are refused, not split inside a character.
        for bad in ["+1é1", "+é", "UTC+0é", "+١٢", "++1", "+1:+5", "+1:2:3"] {
            assert_eq!(parse_utc_offset(bad), None, "{bad}");
        }
    }

    #[test]
    fn business_hours_follow_the_local_week_and_holidays() {
        // Monday to Friday 09:00-18:00 in UTC+8.
        let hours = BusinessHours {
            timezone: "+08:00".into(),
            windows: (1..=5)
                .map(|day| WeeklyWindow {
                    day,
                    start_minute: 9 * 60,
                    end_minute: 18 * 60,
                })
                .collect(),
            holidays: vec!["2026-10-01".into()],
        };
        // 2026-09-28 is a Monday. 01:30 UTC = 09:30 local.
        let monday_open = Utc.with_ymd_and_hms(2026, 9, 28, 1, 30, 0).unwrap();
        assert!(hours.is_open(monday_open));
        // 00:30 UTC = 08:30 local, before opening.
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 28, 0, 30, 0).unwrap()));
        // Saturday.
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 10, 3, 2, 0, 0).unwrap()));
        // A Thursday that is a holiday (local date 2026-10-01).
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 10, 1, 2, 0, 0).unwrap()));
        // 16:30 UTC Sunday = 00:30 Monday local: closed; 10:00 UTC Monday = 18:00 local: closed.
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 27, 16, 30, 0).unwrap()));
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 28, 10, 0, 0).unwrap()));
        assert!(BusinessHours::default().is_open(monday_open));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut q = QueueSpec::open("billing");
        assert!(q.validate().is_ok());
        q.offer_timeout = Duration::from_secs(1);
        assert!(
            q.validate()
                .unwrap_err()
                .to_string()
                .contains("offer_timeout")
        );
        let mut q = QueueSpec::open("Billing");
        assert!(q.validate().unwrap_err().to_string().contains("queue.id"));
        q.id = "billing".into();
        q.overflow = vec![OverflowStep {
            after: Duration::from_secs(60),
            action: OverflowAction::MoveToQueue("billing".into()),
        }];
        assert!(q.validate().unwrap_err().to_string().contains("itself"));
        let mut q = QueueSpec::open("billing");
        q.hours.timezone = "Europe/Paris".into();
        assert!(q.validate().is_ok());
        for unknown in [
            "Mars/Olympus",
            "Europe/Pariss",
            "+25:00",
            "Berlin",
            "+1é1",
            "+٠٨:٠٠",
        ] {
            q.hours.timezone = unknown.into();
            let error = q.validate().unwrap_err();
            assert!(matches!(error, RoutingError::InvalidArgument(_)));
            assert!(
                error.to_string().contains("queue.business_hours.timezone"),
                "{error}"
            );
        }
    }

    #[test]
    fn iana_zones_parse_beside_fixed_offsets() {
        assert_eq!(Zone::parse("+08:00"), Some(Zone::Fixed(480)));
        assert_eq!(Zone::parse(""), Some(Zone::Fixed(0)));
        assert_eq!(
            Zone::parse("Asia/Shanghai"),
            Some(Zone::Iana(chrono_tz::Asia::Shanghai))
        );
        assert_eq!(
            Zone::parse(" Europe/Berlin "),
            Some(Zone::Iana(chrono_tz::Europe::Berlin))
        );
        assert_eq!(Zone::parse("Mars/Olympus"), None);
    }

    #[test]
    fn europe_berlin_hours_follow_daylight_saving() {
        // Every day 09:00-17:00 Berlin time, plus Sunday 02:00-03:00 (skipped on 2026-03-29).
        let mut windows: Vec<WeeklyWindow> = (1..=7)
            .map(|day| WeeklyWindow {
                day,
                start_minute: 9 * 60,
                end_minute: 17 * 60,
            })
            .collect();
        windows.push(WeeklyWindow {
            day: 7,
            start_minute: 2 * 60,
            end_minute: 3 * 60,
        });
        let hours = BusinessHours {
            timezone: "Europe/Berlin".into(),
            windows,
            holidays: Vec::new(),
        };
        assert!(hours.validate().is_ok());
        let at = |m, d, h, min| Utc.with_ymd_and_hms(2026, m, d, h, min, 0).unwrap();
        // Saturday 2026-03-28, CET (UTC+1): 07:30 UTC = 08:30, 08:30 UTC = 09:30.
        assert!(!hours.is_open(at(3, 28, 7, 30)));
        assert!(hours.is_open(at(3, 28, 8, 30)));
        // Sunday 2026-03-29 clocks go from 02:00 CET to 03:00 CEST (UTC+2): 07:00 UTC is 09:00,
        // open (a fixed +01:00 would say 08:00); 06:59 UTC is 08:59; 15:00 UTC is 17:00.
        assert!(hours.is_open(at(3, 29, 7, 0)));
        assert!(!hours.is_open(at(3, 29, 6, 59)));
        assert!(hours.is_open(at(3, 29, 14, 59)));
        assert!(!hours.is_open(at(3, 29, 15, 0)));
        // The skipped hour: 00:59 UTC is 01:59 CET, 01:00 UTC is already 03:00 CEST.
        assert!(!hours.is_open(at(3, 29, 0, 59)));
        assert!(!hours.is_open(at(3, 29, 1, 0)));
        // A week earlier (CET) the 02:00-03:00 window opens: 01:30 UTC is 02:30.
        assert!(hours.is_open(at(3, 22, 1, 30)));
        // Sunday 2026-10-25 back to CET: 07:30 UTC is 08:30, 08:00 UTC is 09:00.
        assert!(!hours.is_open(at(10, 25, 7, 30)));
        assert!(hours.is_open(at(10, 25, 8, 0)));
        let fixed = BusinessHours {
            timezone: "+01:00".into(),
            ..hours
        };
        assert!(
            !fixed.is_open(at(3, 29, 7, 0)),
            "a fixed offset ignores summer time"
        );
    }

    #[test]
    fn asia_shanghai_opening_hours_and_holidays() {
        // Monday to Friday 09:00-18:00 China Standard Time (UTC+8, no daylight saving).
        let hours = BusinessHours {
            timezone: "Asia/Shanghai".into(),
            windows: (1..=5)
                .map(|day| WeeklyWindow {
                    day,
                    start_minute: 9 * 60,
                    end_minute: 18 * 60,
                })
                .collect(),
            holidays: vec!["2026-10-01".into()],
        };
        assert!(hours.validate().is_ok());
        // Monday 2026-09-28: 01:30 UTC = 09:30, 00:30 UTC = 08:30, 10:00 UTC = 18:00.
        assert!(hours.is_open(Utc.with_ymd_and_hms(2026, 9, 28, 1, 30, 0).unwrap()));
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 28, 0, 30, 0).unwrap()));
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 28, 10, 0, 0).unwrap()));
        // Sunday 16:30 UTC is Monday 00:30 in Shanghai: closed; Sunday 23:00 UTC is 07:00.
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 27, 23, 0, 0).unwrap()));
        // National Day (local date 2026-10-01, a Thursday), even at 10:00 local.
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 10, 1, 2, 0, 0).unwrap()));
        // Wednesday 2026-09-30 16:30 UTC is already 00:30 on the holiday.
        assert!(!hours.is_open(Utc.with_ymd_and_hms(2026, 9, 30, 16, 30, 0).unwrap()));
        assert!(hours.is_open(Utc.with_ymd_and_hms(2026, 10, 2, 2, 0, 0).unwrap()));
    }
}
