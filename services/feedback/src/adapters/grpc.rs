//! The gRPC `FeedbackService`: roles from the token, wire ↔ domain conversions, and the one
//! mapping of [`FeedbackError`] to `tonic::Status`.

use tandem_platform::auth::{Caller, Role, caller};
use tandem_platform::error::status_from;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::feedback::v1 as pb;
use tandem_proto::pb::feedback::v1::feedback_service_server::FeedbackService;
use tonic::{Request, Response, Status};

use crate::adapters::sql::{AlertFilter, StoredAlert};
use crate::app::{FeedbackApp, FeedbackError, duration, micros, timestamp};
use crate::domain::Micros;
use crate::domain::alert::AlertRule;
use crate::domain::feedback::{FeedbackInput, Score};
use crate::domain::query::MetricRequest;

impl From<FeedbackError> for Status {
    fn from(error: FeedbackError) -> Self {
        status_from(&error)
    }
}

fn now() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

fn authorize<'a, T>(request: &'a Request<T>, roles: &[Role]) -> Result<&'a Caller, Status> {
    let caller = caller(request)?;
    caller.require_any(roles).map_err(|e| status_from(&e))?;
    Ok(caller)
}

fn invalid(message: impl Into<String>) -> Status {
    status_from(&FeedbackError::InvalidArgument(message.into()))
}

fn time(field: &str, value: Option<&prost_types::Timestamp>) -> Result<Option<Micros>, Status> {
    match value {
        None => Ok(None),
        Some(ts) => micros(ts)
            .map(Some)
            .ok_or_else(|| invalid(format!("{field}: not a valid timestamp"))),
    }
}

fn span(value: Option<&prost_types::Duration>) -> Micros {
    value.map_or(0, |d| {
        d.seconds.saturating_mul(1_000_000) + i64::from(d.nanos / 1000)
    })
}

fn page_size(page: Option<&common::PageRequest>) -> Result<i64, Status> {
    match page.map_or(0, |p| p.page_size) {
        0 => Ok(20),
        n @ 1..=100 => Ok(i64::from(n)),
        n => Err(invalid(format!("page.page_size: {n} is not in 1..100"))),
    }
}

fn input_from(feedback: pb::Feedback) -> Result<FeedbackInput, Status> {
    let score = feedback.score.map(|score| match score {
        pb::feedback::Score::Csat(v) => Score::Csat(v),
        pb::feedback::Score::Nps(v) => Score::Nps(v),
        pb::feedback::Score::Ces(v) => Score::Ces(v),
        pb::feedback::Score::Thumbs(v) => Score::Thumbs(v),
    });
    Ok(FeedbackInput {
        client_feedback_id: feedback.client_feedback_id,
        conversation_id: feedback.conversation_id,
        channel: feedback.channel,
        subject: feedback.subject,
        score,
        comment: feedback.comment,
        language: feedback.language,
        question_id: feedback.question_id,
        submitted_at: time("feedback.submitted_at", feedback.submitted_at.as_ref())?,
    })
}

fn rule_from(rule: pb::AlertRule) -> AlertRule {
    AlertRule {
        id: rule.id,
        name: rule.name,
        kind: rule.kind,
        scenario_id: rule.scenario_id,
        metric: rule.metric,
        condition: rule.condition,
        threshold: rule.threshold,
        window: span(rule.window.as_ref()),
        baseline_window: span(rule.baseline_window.as_ref()),
        min_samples: rule.min_samples,
        severity: rule.severity,
        enabled: rule.enabled,
        created_at: 0,
        updated_at: 0,
    }
}

fn rule_to(rule: AlertRule) -> pb::AlertRule {
    pb::AlertRule {
        id: rule.id,
        name: rule.name,
        kind: rule.kind,
        scenario_id: rule.scenario_id,
        metric: rule.metric,
        condition: rule.condition,
        threshold: rule.threshold,
        window: Some(duration(rule.window)),
        baseline_window: (rule.baseline_window > 0).then(|| duration(rule.baseline_window)),
        min_samples: rule.min_samples,
        severity: rule.severity,
        enabled: rule.enabled,
        created_at: Some(timestamp(rule.created_at)),
        updated_at: Some(timestamp(rule.updated_at)),
    }
}

fn alert_to(alert: StoredAlert) -> pb::Alert {
    pb::Alert {
        id: alert.id,
        rule_id: alert.rule_id,
        kind: alert.kind,
        scenario_id: alert.scenario_id,
        metric: alert.metric,
        observed_value: alert.observed,
        threshold: alert.threshold,
        baseline: alert.baseline,
        window: Some(duration(alert.window)),
        severity: alert.severity,
        status: alert.status,
        explanation: alert.explanation,
        raised_at: Some(timestamp(alert.raised_at)),
        acknowledged_at: alert.acknowledged_at.map(timestamp),
        acknowledged_by: alert.acknowledged_by,
        resolved_at: alert.resolved_at.map(timestamp),
    }
}

fn micros_duration(us: f64) -> prost_types::Duration {
    duration(us.round() as i64)
}

/// The gRPC face of the feedback service.
#[derive(Clone)]
pub struct FeedbackGrpc {
    app: FeedbackApp,
}

impl FeedbackGrpc {
    /// Wraps the use cases.
    pub fn new(app: FeedbackApp) -> Self {
        Self { app }
    }
}

const READERS: &[Role] = &[Role::Supervisor, Role::Admin, Role::Service];

#[tonic::async_trait]
impl FeedbackService for FeedbackGrpc {
    async fn submit_feedback(
        &self,
        request: Request<pb::SubmitFeedbackRequest>,
    ) -> Result<Response<pb::SubmitFeedbackResponse>, Status> {
        let tenant = authorize(
            &request,
            &[Role::Channel, Role::Service, Role::Supervisor, Role::Admin],
        )?
        .tenant
        .clone();
        let feedback = request
            .into_inner()
            .feedback
            .ok_or_else(|| invalid("feedback: is required"))?;
        let input = input_from(feedback)?;
        let (feedback, duplicate) = self.app.submit(&tenant, input, now()).await?;
        Ok(Response::new(pb::SubmitFeedbackResponse {
            feedback: Some(feedback),
            duplicate,
        }))
    }

    async fn import_feedback(
        &self,
        request: Request<pb::ImportFeedbackRequest>,
    ) -> Result<Response<pb::ImportFeedbackResponse>, Status> {
        let tenant = authorize(&request, &[Role::Supervisor, Role::Admin, Role::Service])?
            .tenant
            .clone();
        let request = request.into_inner();
        let report = self
            .app
            .import(
                &tenant,
                request.format,
                &request.content,
                request.default_channel,
                request.dry_run,
                now(),
            )
            .await?;
        Ok(Response::new(pb::ImportFeedbackResponse {
            imported: report.imported,
            duplicates: report.duplicates,
            failed: report.failed,
            errors: report
                .errors
                .into_iter()
                .map(
                    |(row_number, external_id, field, message)| common::RowError {
                        row_number,
                        external_id,
                        field,
                        message,
                    },
                )
                .collect(),
        }))
    }

    async fn submit_agent_review(
        &self,
        request: Request<pb::SubmitAgentReviewRequest>,
    ) -> Result<Response<pb::SubmitAgentReviewResponse>, Status> {
        let caller = authorize(&request, &[Role::Agent, Role::Supervisor])?.clone();
        let review = request
            .into_inner()
            .review
            .ok_or_else(|| invalid("review: is required"))?;
        let review = self
            .app
            .review(&caller.tenant, &caller.subject, review, now())
            .await?;
        Ok(Response::new(pb::SubmitAgentReviewResponse {
            review: Some(review),
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let tenant = authorize(&request, READERS)?.tenant.clone();
        let request = request.into_inner();
        let range = request.range.unwrap_or_default();
        let query = MetricRequest {
            metrics: request.metrics,
            start: time("range.start", range.start.as_ref())?,
            end: time("range.end", range.end.as_ref())?,
            filters: request
                .filters
                .into_iter()
                .map(|f| (f.dimension, f.values))
                .collect(),
            group_by: request.group_by,
            granularity: request.granularity,
            timezone: request.timezone,
        };
        let series = self.app.metrics(&tenant, &query, now()).await?;
        Ok(Response::new(pb::GetMetricsResponse {
            series: series
                .into_iter()
                .map(|s| pb::MetricSeries {
                    metric: s.metric,
                    group: s
                        .group
                        .into_iter()
                        .map(|(dimension, value)| pb::DimensionValue { dimension, value })
                        .collect(),
                    points: s
                        .points
                        .into_iter()
                        .map(|p| pb::MetricPoint {
                            bucket_start: Some(timestamp(p.bucket)),
                            value: p.value,
                            numerator: p.numerator,
                            denominator: p.denominator,
                            count: p.count,
                            p50: p.percentiles.map(|q| micros_duration(q[0])),
                            p95: p.percentiles.map(|q| micros_duration(q[1])),
                            p99: p.percentiles.map(|q| micros_duration(q[2])),
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn get_top_problems(
        &self,
        request: Request<pb::GetTopProblemsRequest>,
    ) -> Result<Response<pb::GetTopProblemsResponse>, Status> {
        let tenant = authorize(&request, READERS)?.tenant.clone();
        let request = request.into_inner();
        let range = match request.range {
            None => (None, None),
            Some(range) => (
                time("range.start", range.start.as_ref())?,
                time("range.end", range.end.as_ref())?,
            ),
        };
        let clusters = self
            .app
            .top_problems(
                &tenant,
                &request.scenario_id,
                range,
                request.language,
                request.limit,
                now(),
            )
            .await?;
        Ok(Response::new(pb::GetTopProblemsResponse {
            clusters: clusters
                .into_iter()
                .map(|c| pb::ProblemCluster {
                    id: c.id,
                    scenario_id: c.scenario_id,
                    keywords: c.keywords,
                    count: c.count,
                    previous_count: c.previous_count,
                    trend: c.trend,
                    example_comments: c.examples,
                    intents: c.intents,
                    language: c.language,
                })
                .collect(),
        }))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let tenant = authorize(&request, READERS)?.tenant.clone();
        let request = request.into_inner();
        let limit = page_size(request.page.as_ref())?;
        let token = request.page.map(|p| p.page_token).unwrap_or_default();
        let before = if token.is_empty() {
            None
        } else {
            let (at, id) = token
                .split_once(':')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| invalid("page.page_token: not a token of this listing"))?;
            Some((at, id))
        };
        if !(0..=3).contains(&request.status) {
            return Err(invalid(format!(
                "status: unknown status {}",
                request.status
            )));
        }
        let range = request.range.unwrap_or_default();
        let filter = AlertFilter {
            status: request.status,
            scenario_id: request.scenario_id,
            from: time("range.start", range.start.as_ref())?,
            to: time("range.end", range.end.as_ref())?,
            before,
            limit: limit + 1,
        };
        let mut alerts = self.app.list_alerts(&tenant, &filter).await?;
        let next = if alerts.len() as i64 > limit {
            alerts.truncate(usize::try_from(limit).unwrap_or_default());
            alerts
                .last()
                .map(|a| format!("{}:{}", a.raised_at, a.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.into_iter().map(alert_to).collect(),
            page: Some(common::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn upsert_alert_rule(
        &self,
        request: Request<pb::UpsertAlertRuleRequest>,
    ) -> Result<Response<pb::UpsertAlertRuleResponse>, Status> {
        let tenant = authorize(&request, &[Role::Admin])?.tenant.clone();
        let rule = request
            .into_inner()
            .rule
            .ok_or_else(|| invalid("rule: is required"))?;
        let rule = self
            .app
            .upsert_rule(&tenant, rule_from(rule), now())
            .await?;
        Ok(Response::new(pb::UpsertAlertRuleResponse {
            rule: Some(rule_to(rule)),
        }))
    }

    async fn list_alert_rules(
        &self,
        request: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        let tenant = authorize(&request, READERS)?.tenant.clone();
        let request = request.into_inner();
        let limit = page_size(request.page.as_ref())?;
        let after = request.page.map(|p| p.page_token).unwrap_or_default();
        let mut rules = self
            .app
            .list_rules(&tenant, &request.scenario_id, &after, limit + 1)
            .await?;
        let next = if rules.len() as i64 > limit {
            rules.truncate(usize::try_from(limit).unwrap_or_default());
            rules.last().map(|r| r.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAlertRulesResponse {
            rules: rules.into_iter().map(rule_to).collect(),
            page: Some(common::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn acknowledge_alert(
        &self,
        request: Request<pb::AcknowledgeAlertRequest>,
    ) -> Result<Response<pb::AcknowledgeAlertResponse>, Status> {
        let caller = authorize(&request, &[Role::Supervisor, Role::Admin])?.clone();
        let request = request.into_inner();
        let alert = self
            .app
            .acknowledge(
                &caller.tenant,
                &request.alert_id,
                &caller.subject,
                &request.comment,
                now(),
            )
            .await?;
        Ok(Response::new(pb::AcknowledgeAlertResponse {
            alert: Some(alert_to(alert)),
        }))
    }
}
