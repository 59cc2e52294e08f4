//! The gRPC adapter: `tandem.policy.v1.PolicyService` over [`App`].
//!
//! Roles: `Decide` is for services (dialog) and administrators; reads are open to every staff
//! role; changes to scenarios, pins, rollbacks and rules need an administrator or a supervisor.
//! Validation failures answer `INVALID_ARGUMENT` with every problem listed in the message and as
//! `google.rpc.BadRequest` field violations in the status details.

use std::sync::Arc;

use tandem_platform::auth::{Caller, Role, caller};
use tandem_platform::error::status_from;
use tandem_platform::paging;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::policy::v1 as pb;
use tandem_proto::pb::policy::v1::policy_service_server::PolicyService;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::app::{Actor, App, PolicyError};
use crate::document::{self, Format};
use crate::store::{ListFilter, now_micros, timestamp_micros};

const READERS: &[Role] = &[Role::Admin, Role::Supervisor, Role::Agent, Role::Service];
const WRITERS: &[Role] = &[Role::Admin, Role::Supervisor];
const DECIDERS: &[Role] = &[Role::Service, Role::Admin, Role::Supervisor];

/// The gRPC service.
pub struct PolicyGrpc {
    app: Arc<App>,
}

impl PolicyGrpc {
    /// Wraps the application.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

fn status(e: &PolicyError) -> Status {
    if let PolicyError::Invalid(errors) = e {
        let mut details = ErrorDetails::new();
        for v in errors {
            details.add_bad_request_violation(v.path.clone(), v.message.clone());
        }
        return Status::with_error_details(tonic::Code::InvalidArgument, e.to_string(), details);
    }
    status_from(e)
}

fn who<'a, T>(req: &'a Request<T>, roles: &[Role]) -> Result<&'a Caller, Status> {
    let c = caller(req)?;
    c.require_any(roles).map_err(|e| status_from(&e))?;
    Ok(c)
}

fn actor(c: &Caller, reason: &str) -> Actor {
    Actor {
        id: c.subject.clone(),
        reason: reason.to_owned(),
    }
}

fn bad(path: &str, message: &str) -> Status {
    status(&PolicyError::Invalid(vec![
        tandem_policy_client::violation(path, message),
    ]))
}

fn page_size(page: Option<&common::PageRequest>) -> Result<usize, Status> {
    paging::page_size(page).map_err(|e| bad(e.path, &e.message))
}

fn page_token(page: Option<&common::PageRequest>) -> Result<Option<String>, Status> {
    paging::page_token(page).map_err(|e| bad(e.path, &e.message))
}

/// A newest-first listing filter from a scenario, a time range and a page.
fn list_filter(
    scenario_id: &str,
    range: Option<&common::TimeRange>,
    page: Option<&common::PageRequest>,
) -> Result<(ListFilter, usize), Status> {
    let size = page_size(page)?;
    let start = range
        .and_then(|r| r.start.as_ref())
        .map_or(0, timestamp_micros);
    let end = range
        .and_then(|r| r.end.as_ref())
        .map_or(now_micros().saturating_add(1), timestamp_micros);
    if end < start {
        return Err(bad("range", "end is before start"));
    }
    let cursor = match page_token(page)? {
        None => (i64::MAX, String::new()),
        Some(t) => {
            let (at, id) = t
                .split_once(':')
                .and_then(|(a, id)| Some((a.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| bad("page.page_token", "is not a token this service issued"))?;
            (at, id)
        }
    };
    Ok((
        ListFilter {
            scenario_id: scenario_id.to_owned(),
            start,
            end,
            cursor,
            limit: i64::try_from(size + 1).unwrap_or(21),
        },
        size,
    ))
}

fn format_of(value: i32) -> Result<Format, Status> {
    Format::from_wire(value).ok_or_else(|| {
        bad(
            "format",
            "must be SCENARIO_FORMAT_YAML or SCENARIO_FORMAT_JSON",
        )
    })
}

fn check_id(path: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(bad(path, "is empty"));
    }
    if id.chars().count() > 64 || id.chars().any(char::is_control) {
        return Err(bad(path, "is not a valid identifier"));
    }
    Ok(())
}

#[tonic::async_trait]
impl PolicyService for PolicyGrpc {
    async fn upsert_scenario(
        &self,
        req: Request<pb::UpsertScenarioRequest>,
    ) -> Result<Response<pb::UpsertScenarioResponse>, Status> {
        let c = who(&req, WRITERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c, &req.get_ref().reason));
        let r = req.into_inner();
        let scenario = r.scenario.ok_or_else(|| bad("scenario", "is missing"))?;
        let out = self
            .app
            .upsert(
                &tenant,
                scenario,
                r.expected_version,
                &actor,
                r.validate_only,
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UpsertScenarioResponse {
            scenario: Some(out.scenario),
            version: out.version,
            created: out.created,
        }))
    }

    async fn get_scenario(
        &self,
        req: Request<pb::GetScenarioRequest>,
    ) -> Result<Response<pb::GetScenarioResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        check_id("scenario_id", &req.get_ref().scenario_id)?;
        let s = self
            .app
            .get(&tenant, &req.get_ref().scenario_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetScenarioResponse { scenario: Some(s) }))
    }

    async fn list_scenarios(
        &self,
        req: Request<pb::ListScenariosRequest>,
    ) -> Result<Response<pb::ListScenariosResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let size = page_size(r.page.as_ref())?;
        let after = page_token(r.page.as_ref())?.unwrap_or_default();
        let all = self.app.list(&tenant).await.map_err(|e| status(&e))?;
        let mut page: Vec<pb::Scenario> = all
            .into_iter()
            .filter(|s| s.id > after)
            .filter(|s| r.tier == 0 || s.tier == r.tier)
            .filter(|s| r.strategy == 0 || s.strategy == r.strategy)
            .take(size + 1)
            .collect();
        let more = page.len() > size;
        page.truncate(size);
        let last = page.last().map(|s| s.id.clone());
        Ok(Response::new(pb::ListScenariosResponse {
            scenarios: page,
            page: paging::next_page(more, last),
        }))
    }

    async fn delete_scenario(
        &self,
        req: Request<pb::DeleteScenarioRequest>,
    ) -> Result<Response<pb::DeleteScenarioResponse>, Status> {
        let c = who(&req, WRITERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c, &req.get_ref().reason));
        let r = req.into_inner();
        check_id("scenario_id", &r.scenario_id)?;
        self.app
            .delete(&tenant, &r.scenario_id, r.expected_version, &actor)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteScenarioResponse {}))
    }

    async fn import_scenarios(
        &self,
        req: Request<pb::ImportScenariosRequest>,
    ) -> Result<Response<pb::ImportScenariosResponse>, Status> {
        let c = who(&req, WRITERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c, &req.get_ref().reason));
        let r = req.into_inner();
        let format = format_of(r.format)?;
        let parsed = document::parse(format, &r.content);
        let result = match parsed {
            Ok(scenarios) => {
                self.app
                    .import(&tenant, scenarios, &actor, r.validate_only)
                    .await
            }
            Err(errors) => Err(PolicyError::Invalid(errors)),
        };
        match result {
            Ok(out) => Ok(Response::new(pb::ImportScenariosResponse {
                errors: Vec::new(),
                scenarios: out.scenarios,
                created: out.created,
                updated: out.updated,
                unchanged: out.unchanged,
            })),
            // A dry run reports the problems in the response; a real import fails with them.
            Err(PolicyError::Invalid(errors)) if r.validate_only => {
                Ok(Response::new(pb::ImportScenariosResponse {
                    errors,
                    ..pb::ImportScenariosResponse::default()
                }))
            }
            Err(e) => Err(status(&e)),
        }
    }

    async fn export_scenarios(
        &self,
        req: Request<pb::ExportScenariosRequest>,
    ) -> Result<Response<pb::ExportScenariosResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let format = format_of(r.format)?;
        let all = self.app.list(&tenant).await.map_err(|e| status(&e))?;
        let chosen: Vec<pb::Scenario> = if r.scenario_ids.is_empty() {
            all
        } else {
            let mut chosen = Vec::with_capacity(r.scenario_ids.len());
            for id in &r.scenario_ids {
                let s = all.iter().find(|s| &s.id == id).ok_or_else(|| {
                    status(&PolicyError::NotFound(format!("scenario {id:?} not found")))
                })?;
                chosen.push(s.clone());
            }
            chosen
        };
        let content = document::render(format, &chosen).map_err(|e| {
            tracing::error!(error = %e, "cannot render scenarios");
            Status::internal("internal error")
        })?;
        Ok(Response::new(pb::ExportScenariosResponse {
            format: r.format,
            content,
        }))
    }

    async fn decide(
        &self,
        req: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::DecideResponse>, Status> {
        let tenant = who(&req, DECIDERS)?.tenant.clone();
        let ctx = req
            .get_ref()
            .context
            .as_ref()
            .ok_or_else(|| bad("context", "is missing"))?;
        let decision = self
            .app
            .decide(&tenant, ctx)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DecideResponse {
            decision: Some(decision),
        }))
    }

    async fn list_policy_versions(
        &self,
        req: Request<pb::ListPolicyVersionsRequest>,
    ) -> Result<Response<pb::ListPolicyVersionsResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        check_id("scenario_id", &r.scenario_id)?;
        let size = page_size(r.page.as_ref())?;
        let before = match page_token(r.page.as_ref())? {
            None => None,
            Some(t) => Some(
                t.parse::<i64>()
                    .map_err(|_| bad("page.page_token", "is not a token this service issued"))?,
            ),
        };
        let mut versions = self
            .app
            .store()
            .versions(
                &tenant,
                &r.scenario_id,
                before,
                i64::try_from(size + 1).unwrap_or(21),
            )
            .await
            .map_err(|e| status(&e.into()))?;
        if versions.is_empty() && before.is_none() {
            return Err(status(&PolicyError::NotFound(format!(
                "scenario {:?} not found",
                r.scenario_id
            ))));
        }
        let more = versions.len() > size;
        versions.truncate(size);
        let last = versions.last().map(|v| v.version.to_string());
        Ok(Response::new(pb::ListPolicyVersionsResponse {
            versions,
            page: paging::next_page(more, last),
        }))
    }

    async fn rollback_scenario(
        &self,
        req: Request<pb::RollbackScenarioRequest>,
    ) -> Result<Response<pb::RollbackScenarioResponse>, Status> {
        let c = who(&req, WRITERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c, &req.get_ref().reason));
        let r = req.into_inner();
        check_id("scenario_id", &r.scenario_id)?;
        let (scenario, version) = self
            .app
            .rollback(&tenant, &r.scenario_id, r.to_version, &actor)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::RollbackScenarioResponse {
            scenario: Some(scenario),
            version: Some(version),
        }))
    }

    async fn pin_scenario(
        &self,
        req: Request<pb::PinScenarioRequest>,
    ) -> Result<Response<pb::PinScenarioResponse>, Status> {
        let c = who(&req, WRITERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c, &req.get_ref().reason));
        check_id("scenario_id", &req.get_ref().scenario_id)?;
        let s = self
            .app
            .set_pin(&tenant, &req.get_ref().scenario_id, true, &actor)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::PinScenarioResponse { scenario: Some(s) }))
    }

    async fn unpin_scenario(
        &self,
        req: Request<pb::UnpinScenarioRequest>,
    ) -> Result<Response<pb::UnpinScenarioResponse>, Status> {
        let c = who(&req, WRITERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c, &req.get_ref().reason));
        check_id("scenario_id", &req.get_ref().scenario_id)?;
        let s = self
            .app
            .set_pin(&tenant, &req.get_ref().scenario_id, false, &actor)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UnpinScenarioResponse {
            scenario: Some(s),
        }))
    }

    async fn list_adjustments(
        &self,
        req: Request<pb::ListAdjustmentsRequest>,
    ) -> Result<Response<pb::ListAdjustmentsResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let (filter, size) = list_filter(&r.scenario_id, r.range.as_ref(), r.page.as_ref())?;
        let mut items = self
            .app
            .adjustments(&tenant, &filter)
            .await
            .map_err(|e| status(&e))?;
        let more = items.len() > size;
        items.truncate(size);
        let last = items.last().map(|a| {
            format!(
                "{}:{}",
                a.created_at.as_ref().map_or(0, timestamp_micros),
                a.id
            )
        });
        Ok(Response::new(pb::ListAdjustmentsResponse {
            adjustments: items,
            page: paging::next_page(more, last),
        }))
    }

    async fn list_shadow_decisions(
        &self,
        req: Request<pb::ListShadowDecisionsRequest>,
    ) -> Result<Response<pb::ListShadowDecisionsResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let (filter, size) = list_filter(&r.scenario_id, r.range.as_ref(), r.page.as_ref())?;
        let (mut records, rate) = self
            .app
            .store()
            .shadow_decisions(&tenant, &filter, r.only_diverged)
            .await
            .map_err(|e| status(&e.into()))?;
        let more = records.len() > size;
        records.truncate(size);
        let last = records.last().map(|d| {
            format!(
                "{}:{}",
                d.decided_at.as_ref().map_or(0, timestamp_micros),
                d.id
            )
        });
        Ok(Response::new(pb::ListShadowDecisionsResponse {
            records,
            divergence_rate: rate,
            page: paging::next_page(more, last),
        }))
    }

    async fn upsert_adjustment_rule(
        &self,
        req: Request<pb::UpsertAdjustmentRuleRequest>,
    ) -> Result<Response<pb::UpsertAdjustmentRuleResponse>, Status> {
        let tenant = who(&req, WRITERS)?.tenant.clone();
        let rule = req
            .into_inner()
            .rule
            .ok_or_else(|| bad("rule", "is missing"))?;
        let rule = self
            .app
            .upsert_rule(&tenant, rule)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UpsertAdjustmentRuleResponse {
            rule: Some(rule),
        }))
    }

    async fn list_adjustment_rules(
        &self,
        req: Request<pb::ListAdjustmentRulesRequest>,
    ) -> Result<Response<pb::ListAdjustmentRulesResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let size = page_size(r.page.as_ref())?;
        let after = page_token(r.page.as_ref())?.unwrap_or_default();
        let scenario = (!r.scenario_id.is_empty()).then_some(r.scenario_id.as_str());
        let mut rules = self
            .app
            .store()
            .rules(
                &tenant,
                scenario,
                &after,
                i64::try_from(size + 1).unwrap_or(21),
            )
            .await
            .map_err(|e| status(&e.into()))?;
        let more = rules.len() > size;
        rules.truncate(size);
        let last = rules.last().map(|r| r.id.clone());
        Ok(Response::new(pb::ListAdjustmentRulesResponse {
            rules,
            page: paging::next_page(more, last),
        }))
    }
}
