//! Metric queries: validation of what is asked, the rollup grain that answers it, and the
//! series built from the rollup rows.

use std::collections::BTreeMap;

use chrono::{TimeZone as _, Utc};
use chrono_tz::Tz;
use tandem_proto::pb::common::v1::{Channel, HandlerKind, HandoffReason, Language};

use super::rollup::{grain, metric, quantile};
use super::{DAY, FieldError, HOUR, Micros};

/// `Dimension` values (tandem.feedback.v1).
pub mod dimension {
    /// Scenario.
    pub const SCENARIO: i32 = 1;
    /// Intent.
    pub const INTENT: i32 = 2;
    /// Channel.
    pub const CHANNEL: i32 = 3;
    /// Handler kind.
    pub const HANDLER_KIND: i32 = 4;
    /// Agent.
    pub const AGENT: i32 = 5;
    /// Team.
    pub const TEAM: i32 = 6;
    /// Handoff reason.
    pub const HANDOFF_REASON: i32 = 7;
    /// Language.
    pub const LANGUAGE: i32 = 8;
}

/// `Granularity` values.
pub mod granularity {
    /// Hourly buckets.
    pub const HOUR: i32 = 1;
    /// Daily buckets in the request's time zone.
    pub const DAY: i32 = 2;
    /// One bucket.
    pub const TOTAL: i32 = 3;
}

/// A dimension's rollup column and whether it holds an enum.
pub fn column(dimension: i32) -> Option<(&'static str, bool)> {
    Some(match dimension {
        dimension::SCENARIO => ("scenario", false),
        dimension::INTENT => ("intent", false),
        dimension::CHANNEL => ("channel", true),
        dimension::HANDLER_KIND => ("handler", true),
        dimension::AGENT => ("agent", false),
        dimension::TEAM => ("team", false),
        dimension::HANDOFF_REASON => ("reason", true),
        dimension::LANGUAGE => ("language", true),
        _ => return None,
    })
}

/// Parses an enum dimension's value name (e.g. `CHANNEL_WECHAT`) into its number.
pub fn parse_enum(dimension: i32, name: &str) -> Option<i64> {
    let value = match dimension {
        dimension::CHANNEL => Channel::from_str_name(name).map(|v| v as i32),
        dimension::HANDLER_KIND => HandlerKind::from_str_name(name).map(|v| v as i32),
        dimension::HANDOFF_REASON => HandoffReason::from_str_name(name).map(|v| v as i32),
        dimension::LANGUAGE => Language::from_str_name(name).map(|v| v as i32),
        _ => None,
    };
    value.map(i64::from)
}

/// Returns an enum dimension's value name.
pub fn enum_name(dimension: i32, value: i64) -> String {
    let value = i32::try_from(value).unwrap_or_default();
    let name = match dimension {
        dimension::CHANNEL => Channel::try_from(value).ok().map(|v| v.as_str_name()),
        dimension::HANDLER_KIND => HandlerKind::try_from(value).ok().map(|v| v.as_str_name()),
        dimension::HANDOFF_REASON => HandoffReason::try_from(value).ok().map(|v| v.as_str_name()),
        dimension::LANGUAGE => Language::try_from(value).ok().map(|v| v.as_str_name()),
        _ => None,
    };
    name.map_or_else(|| value.to_string(), str::to_owned)
}

/// Values accepted for one dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterValues {
    /// For text columns.
    Text(Vec<String>),
    /// For enum columns.
    Int(Vec<i64>),
}

/// A filter on one rollup column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Column name.
    pub column: &'static str,
    /// Accepted values.
    pub values: FilterValues,
}

/// A validated metric query.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricQuery {
    /// `MetricName` values, without duplicates.
    pub metrics: Vec<i32>,
    /// Inclusive start.
    pub start: Micros,
    /// Exclusive end.
    pub end: Micros,
    /// Filters.
    pub filters: Vec<Filter>,
    /// Dimensions grouped by, in request order.
    pub group_by: Vec<i32>,
    /// `Granularity` value (unspecified is DAY).
    pub granularity: i32,
    /// Time zone of DAY buckets.
    pub timezone: Tz,
}

/// A metric query as received.
#[derive(Clone, Debug, Default)]
pub struct MetricRequest {
    /// Metrics.
    pub metrics: Vec<i32>,
    /// Range start, if set.
    pub start: Option<Micros>,
    /// Range end, if set.
    pub end: Option<Micros>,
    /// (dimension, values) filters.
    pub filters: Vec<(i32, Vec<String>)>,
    /// Group-by dimensions.
    pub group_by: Vec<i32>,
    /// Granularity.
    pub granularity: i32,
    /// IANA time zone, empty for UTC.
    pub timezone: String,
}

/// The earliest time a range may start: 2000-01-01T00:00:00Z.
pub const EARLIEST: Micros = super::feedback::EARLIEST;

/// Checks a time range: start set, start < end, not before 2000, not more than a day ahead,
/// and at most `max_len` long. `field` prefixes the error paths.
pub fn check_range(
    field: &str,
    start: Option<Micros>,
    end: Option<Micros>,
    now: Micros,
    max_len: Micros,
    errors: &mut Vec<FieldError>,
) -> Option<(Micros, Micros)> {
    let Some(start) = start else {
        errors.push(FieldError::new(format!("{field}.start"), "is required"));
        return None;
    };
    let end = end.unwrap_or(now);
    let before = errors.len();
    if start < EARLIEST {
        errors.push(FieldError::new(
            format!("{field}.start"),
            "is before 2000-01-01",
        ));
    }
    if end > now + DAY {
        errors.push(FieldError::new(
            format!("{field}.end"),
            "is more than a day in the future",
        ));
    }
    if start >= end {
        errors.push(FieldError::new(field, "start must be before end"));
    } else if end - start > max_len {
        errors.push(FieldError::new(
            field,
            format!("spans more than {} days", max_len / DAY),
        ));
    }
    (errors.len() == before).then_some((start, end))
}

impl MetricRequest {
    /// Validates the request, listing every problem.
    pub fn validate(&self, now: Micros) -> Result<MetricQuery, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut metrics = Vec::new();
        if self.metrics.is_empty() || self.metrics.len() > 13 {
            errors.push(FieldError::new("metrics", "give 1 to 13 metrics"));
        }
        for (i, m) in self.metrics.iter().enumerate() {
            if !(1..=13).contains(m) {
                errors.push(FieldError::new(
                    format!("metrics[{i}]"),
                    format!("unknown metric {m}"),
                ));
            } else if !metrics.contains(m) {
                metrics.push(*m);
            }
        }
        let granularity = match self.granularity {
            0 => granularity::DAY,
            g @ 1..=3 => g,
            other => {
                errors.push(FieldError::new(
                    "granularity",
                    format!("unknown granularity {other}"),
                ));
                granularity::DAY
            }
        };
        let max_len = if granularity == granularity::HOUR {
            31 * DAY
        } else {
            400 * DAY
        };
        let range = check_range("range", self.start, self.end, now, max_len, &mut errors);
        if self.filters.len() > 8 {
            errors.push(FieldError::new("filters", "at most 8 filters"));
        }
        let mut filters = Vec::new();
        for (i, (dim, values)) in self.filters.iter().enumerate() {
            let Some((column, is_enum)) = column(*dim) else {
                errors.push(FieldError::new(
                    format!("filters[{i}].dimension"),
                    format!("unknown dimension {dim}"),
                ));
                continue;
            };
            if values.is_empty() || values.len() > 50 {
                errors.push(FieldError::new(
                    format!("filters[{i}].values"),
                    "give 1 to 50 values",
                ));
                continue;
            }
            let values = if is_enum {
                let mut parsed = Vec::new();
                for (j, name) in values.iter().enumerate() {
                    match parse_enum(*dim, name) {
                        Some(v) => parsed.push(v),
                        None => errors.push(FieldError::new(
                            format!("filters[{i}].values[{j}]"),
                            format!("unknown value {name:?}"),
                        )),
                    }
                }
                FilterValues::Int(parsed)
            } else {
                FilterValues::Text(values.clone())
            };
            filters.push(Filter { column, values });
        }
        if self.group_by.len() > 2 {
            errors.push(FieldError::new("group_by", "at most 2 dimensions"));
        }
        for (i, dim) in self.group_by.iter().enumerate() {
            if column(*dim).is_none() {
                errors.push(FieldError::new(
                    format!("group_by[{i}]"),
                    format!("unknown dimension {dim}"),
                ));
            } else if self.group_by[..i].contains(dim) {
                errors.push(FieldError::new(
                    format!("group_by[{i}]"),
                    "repeats a dimension",
                ));
            }
        }
        let timezone = if self.timezone.is_empty() {
            Tz::UTC
        } else {
            match self.timezone.parse::<Tz>() {
                Ok(tz) => tz,
                Err(_) => {
                    errors.push(FieldError::new(
                        "timezone",
                        format!("unknown IANA time zone {:?}", self.timezone),
                    ));
                    Tz::UTC
                }
            }
        };
        match range {
            Some((start, end)) if errors.is_empty() => Ok(MetricQuery {
                metrics,
                start,
                end,
                filters,
                group_by: self.group_by.clone(),
                granularity,
                timezone,
            }),
            _ => Err(errors),
        }
    }
}

impl MetricQuery {
    /// Returns the rollup grain that answers the query: the tenant rows when nothing is filtered
    /// or grouped on, the scenario rows when nothing but the scenario is; daily rows only for UTC days over a range of whole
    /// UTC days.
    pub fn grain(&self) -> i64 {
        let whole_days = self.start % DAY == 0 && self.end % DAY == 0;
        let daily = self.granularity != granularity::HOUR && self.timezone == Tz::UTC && whole_days;
        let whole_tenant = self.filters.is_empty() && self.group_by.is_empty();
        let scenario_only = self.filters.iter().all(|f| f.column == "scenario")
            && self.group_by.iter().all(|d| *d == dimension::SCENARIO);
        match (whole_tenant, scenario_only, daily) {
            (true, _, true) => grain::TENANT_DAY,
            (true, _, false) => grain::TENANT_HOUR,
            (false, true, true) => grain::SCENARIO_DAY,
            (false, true, false) => grain::SCENARIO_HOUR,
            (false, false, true) => grain::DAY,
            (false, false, false) => grain::HOUR,
        }
    }

    /// Returns how the store may group rollup buckets itself: `None` to return them as they
    /// are, `Some(None)` for one bucket, `Some(Some(offset))` for days of a zone whose UTC offset
    /// (in microseconds) does not change over the range.
    pub fn sql_bucketing(&self) -> Option<Option<Micros>> {
        match self.granularity {
            granularity::TOTAL => Some(None),
            granularity::HOUR => None,
            _ => {
                let offset = |at: Micros| -> Option<Micros> {
                    use chrono::Offset as _;
                    let t = self.timezone.timestamp_micros(at).single()?;
                    Some(i64::from(t.offset().fix().local_minus_utc()) * 1_000_000)
                };
                let first = offset(self.start)?;
                // Any change of offset (daylight saving) inside the range is seen at some day
                // boundary; check them all (at most 400).
                let mut at = self.start;
                while at < self.end {
                    if offset(at)? != first {
                        return None;
                    }
                    at += DAY;
                }
                (offset(self.end)? == first).then_some(Some(first))
            }
        }
    }

    /// Returns the first and the end (exclusive) bucket start to read.
    pub fn bucket_range(&self) -> (Micros, Micros) {
        (self.start, self.end)
    }

    /// Returns the output bucket of a rollup bucket.
    pub fn output_bucket(&self, bucket: Micros) -> Micros {
        match self.granularity {
            granularity::HOUR => bucket.div_euclid(HOUR) * HOUR,
            granularity::TOTAL => self.start,
            _ => local_day_start(self.timezone, bucket),
        }
    }

    /// Returns the group-by columns.
    pub fn group_columns(&self) -> Vec<(&'static str, bool)> {
        self.group_by.iter().filter_map(|d| column(*d)).collect()
    }
}

/// Returns the start (as UTC microseconds) of the local day that contains `at`.
pub fn local_day_start(tz: Tz, at: Micros) -> Micros {
    if tz == Tz::UTC {
        return at.div_euclid(DAY) * DAY;
    }
    let Some(local) = tz.timestamp_micros(at).single() else {
        return at.div_euclid(DAY) * DAY;
    };
    let midnight = local.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default();
    tz.from_local_datetime(&midnight)
        .earliest()
        .map_or(at.div_euclid(DAY) * DAY, |t| {
            t.with_timezone(&Utc).timestamp_micros()
        })
}

/// A dimension value read from a rollup row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DimValue {
    /// A text column.
    Text(String),
    /// An enum column.
    Int(i64),
}

/// Summed rollup rows of one metric, bucket and group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollupRow {
    /// Metric.
    pub metric: i32,
    /// Bucket start.
    pub bucket: Micros,
    /// Group values, in `group_by` order.
    pub group: Vec<DimValue>,
    /// Numerator.
    pub num: i64,
    /// Denominator.
    pub den: i64,
    /// Observations.
    pub cnt: i64,
    /// Sum.
    pub total: i64,
}

/// Summed histogram cells of one metric, bucket and group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistRow {
    /// Metric.
    pub metric: i32,
    /// Bucket start.
    pub bucket: Micros,
    /// Group values.
    pub group: Vec<DimValue>,
    /// Cell.
    pub cell: i32,
    /// Observations.
    pub cnt: i64,
}

/// One point of a series.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Bucket start.
    pub bucket: Micros,
    /// Value: a rate 0..1, a score, or mean seconds.
    pub value: f64,
    /// Numerator.
    pub numerator: i64,
    /// Denominator.
    pub denominator: i64,
    /// Observations.
    pub count: i64,
    /// Percentiles in microseconds, for durations.
    pub percentiles: Option<[f64; 3]>,
}

/// One metric for one group.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Metric.
    pub metric: i32,
    /// (dimension, value name) pairs in `group_by` order.
    pub group: Vec<(i32, String)>,
    /// Points in time order.
    pub points: Vec<Point>,
}

#[derive(Default)]
struct Acc {
    num: i64,
    den: i64,
    cnt: i64,
    total: i64,
    hist: BTreeMap<i32, i64>,
}

/// The most series a response may carry.
pub const MAX_SERIES: usize = 1000;

/// Builds the series of a query from its rollup and histogram rows. Fails when there would be
/// more than [`MAX_SERIES`] series.
pub fn build_series(
    query: &MetricQuery,
    rows: &[RollupRow],
    hist: &[HistRow],
) -> Result<Vec<Series>, usize> {
    let mut groups: BTreeMap<(i32, Vec<DimValue>), BTreeMap<Micros, Acc>> = BTreeMap::new();
    for row in rows {
        let acc = groups
            .entry((row.metric, row.group.clone()))
            .or_default()
            .entry(query.output_bucket(row.bucket))
            .or_default();
        acc.num += row.num;
        acc.den += row.den;
        acc.cnt += row.cnt;
        acc.total += row.total;
    }
    for row in hist {
        let acc = groups
            .entry((row.metric, row.group.clone()))
            .or_default()
            .entry(query.output_bucket(row.bucket))
            .or_default();
        *acc.hist.entry(row.cell).or_default() += row.cnt;
    }
    let mut series = Vec::new();
    for ((metric, group), buckets) in groups {
        let points: Vec<Point> = buckets
            .into_iter()
            .filter_map(|(bucket, acc)| point(metric, bucket, &acc))
            .collect();
        if points.is_empty() {
            continue;
        }
        let group = query
            .group_by
            .iter()
            .zip(group)
            .map(|(dim, value)| {
                let name = match value {
                    DimValue::Text(text) => text,
                    DimValue::Int(v) => enum_name(*dim, v),
                };
                (*dim, name)
            })
            .collect();
        series.push(Series {
            metric,
            group,
            points,
        });
    }
    if series.len() > MAX_SERIES {
        return Err(series.len());
    }
    // Series in request order of the metrics, then by group.
    series.sort_by_key(|s| {
        (
            query.metrics.iter().position(|m| *m == s.metric),
            s.group.clone(),
        )
    });
    Ok(series)
}

fn point(metric_name: i32, bucket: Micros, acc: &Acc) -> Option<Point> {
    let ratio = |num: i64, den: i64| num as f64 / den as f64;
    match metric_name {
        metric::NPS if acc.den > 0 => Some(Point {
            bucket,
            value: 100.0 * ratio(acc.num, acc.den),
            numerator: acc.num,
            denominator: acc.den,
            count: acc.cnt,
            percentiles: None,
        }),
        metric::CES if acc.cnt > 0 => Some(Point {
            bucket,
            value: ratio(acc.total, acc.cnt),
            numerator: acc.total,
            denominator: acc.cnt,
            count: acc.cnt,
            percentiles: None,
        }),
        m if metric::is_duration(m) && acc.cnt > 0 => Some(Point {
            bucket,
            value: ratio(acc.total, acc.cnt) / 1e6,
            numerator: 0,
            denominator: 0,
            count: acc.cnt,
            percentiles: Some([
                quantile(&acc.hist, 0.5).unwrap_or_default(),
                quantile(&acc.hist, 0.95).unwrap_or_default(),
                quantile(&acc.hist, 0.99).unwrap_or_default(),
            ]),
        }),
        metric::NPS | metric::CES => None,
        m if metric::is_duration(m) => None,
        _ if acc.den > 0 => Some(Point {
            bucket,
            value: ratio(acc.num, acc.den),
            numerator: acc.num,
            denominator: acc.den,
            count: acc.den,
            percentiles: None,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Micros = 1_750_000_000_000_000;

    #[test]
    fn absurd_ranges_and_unknown_values_are_all_reported() {
        let request = MetricRequest {
            metrics: vec![1, 99],
            start: Some(NOW),
            end: Some(NOW - HOUR),
            filters: vec![
                (3, vec!["CHANNEL_CARRIER_PIGEON".into()]),
                (42, vec!["x".into()]),
            ],
            group_by: vec![1, 1, 2],
            granularity: 1,
            timezone: "Mars/Olympus".into(),
        };
        let errors = request.validate(NOW).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "metrics[1]",
            "range",
            "filters[0].values[0]",
            "filters[1].dimension",
            "group_by",
            "group_by[1]",
            "timezone",
        ] {
            assert!(
                fields.contains(&expected),
                "{expected} missing from {fields:?}"
            );
        }
        let too_long = MetricRequest {
            metrics: vec![1],
            start: Some(NOW - 40 * DAY),
            end: Some(NOW),
            granularity: granularity::HOUR,
            ..MetricRequest::default()
        };
        assert!(too_long.validate(NOW).is_err());
        let from_the_stone_age = MetricRequest {
            metrics: vec![1],
            start: Some(0),
            end: Some(DAY),
            ..MetricRequest::default()
        };
        assert!(from_the_stone_age.validate(NOW).is_err());
    }

    #[test]
    fn day_buckets_follow_the_time_zone() {
        let shanghai: Tz = "Asia/Shanghai".parse().unwrap();
        // 2025-01-01T17:00Z is 2025-01-02T01:00 in Shanghai, whose day starts at 2025-01-01T16:00Z.
        let at = Utc
            .with_ymd_and_hms(2025, 1, 1, 17, 0, 0)
            .unwrap()
            .timestamp_micros();
        let start = Utc
            .with_ymd_and_hms(2025, 1, 1, 16, 0, 0)
            .unwrap()
            .timestamp_micros();
        assert_eq!(local_day_start(shanghai, at), start);
        assert_eq!(local_day_start(Tz::UTC, at), at - 17 * HOUR);
    }

    #[test]
    fn rates_carry_their_numerator_and_denominator() {
        let query = MetricRequest {
            metrics: vec![metric::CSAT, metric::QUEUE_WAIT],
            start: Some(NOW - DAY),
            end: Some(NOW),
            granularity: granularity::TOTAL,
            ..MetricRequest::default()
        }
        .validate(NOW)
        .unwrap();
        let rows = [
            RollupRow {
                metric: metric::CSAT,
                bucket: NOW - HOUR,
                group: vec![],
                num: 3,
                den: 4,
                cnt: 4,
                total: 0,
            },
            RollupRow {
                metric: metric::QUEUE_WAIT,
                bucket: NOW - HOUR,
                group: vec![],
                num: 0,
                den: 0,
                cnt: 2,
                total: 4_000_000,
            },
        ];
        let hist = [HistRow {
            metric: metric::QUEUE_WAIT,
            bucket: NOW - HOUR,
            group: vec![],
            cell: crate::domain::rollup::cell_of(2_000_000),
            cnt: 2,
        }];
        let series = build_series(&query, &rows, &hist).unwrap();
        assert_eq!(series.len(), 2);
        let csat = &series[0].points[0];
        assert_eq!((csat.numerator, csat.denominator, csat.value), (3, 4, 0.75));
        let wait = &series[1].points[0];
        assert_eq!(wait.value, 2.0);
        let p50 = wait.percentiles.unwrap()[0];
        assert!((p50 - 2_000_000.0).abs() / 2_000_000.0 < 0.045);
    }
}
