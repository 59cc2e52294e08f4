//! The policy service end to end over gRPC and the bus, on both deployments: PostgreSQL with a
//! real nats-server (throwaway servers from the testkit), and the standalone engine (SQLite and
//! the in-process bus). Every case runs on both through the `both!` macro.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use tandem_platform::auth::Role;
use tandem_platform::bus::{Consumer, ConsumerSpec, RawEvent};
use tandem_platform::testing::{Intercept, ServiceRig};
use tandem_policy::{Policy, Settings};
use tandem_proto::events::POLICY;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::feedback::v1::{AlertKind, AlertRaised, AlertResolved, MetricName};
use tandem_proto::pb::policy::v1 as pb;
use tandem_proto::pb::policy::v1::policy_service_client::PolicyServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

#[path = "support/rules.rs"]
mod rules;
use rules::live_rule_below_0_7;

type Client = PolicyServiceClient<InterceptedService<Channel, Intercept>>;

/// The policy service running in-process, and what a test needs around it.
struct Rig(ServiceRig);

impl Rig {
    async fn production() -> Self {
        Self(ServiceRig::production::<Policy>(Settings::default()).await)
    }

    async fn standalone() -> Self {
        Self(ServiceRig::standalone::<Policy>(Settings::default()).await)
    }

    async fn client(&self, tenant: &str, roles: &[Role]) -> Client {
        let (channel, intercept) = self.0.authorised(tenant, "u-1", roles).await;
        PolicyServiceClient::with_interceptor(channel, intercept)
    }

    async fn policy_updates(&self, name: &str) -> Consumer {
        let spec =
            ConsumerSpec::new(name, &POLICY, &self.0.bus_config).event::<pb::PolicyUpdated>();
        self.0.bus.consumer(&spec).await.unwrap()
    }

    async fn publish(&self, event: RawEvent) {
        self.0.bus.publish_batch(&[event]).await.unwrap();
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

async fn next_update(consumer: &mut Consumer) -> pb::PolicyUpdated {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("no policy update within 10 s")
        .unwrap();
    let event = delivery.event.decode::<pb::PolicyUpdated>().unwrap().event;
    delivery.ack().await.unwrap();
    event
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod production {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Rig::production()).await }) *
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Rig::standalone()).await }) *
        }
    };
}

both!(
    starter_policies_import_export_and_version,
    bad_input_is_refused_with_every_problem_and_nothing_written,
    decisions_and_shadow_mode,
    alerts_adjust_within_guardrails_and_pins_and_rollbacks_work,
    roles_are_enforced,
);

fn example(name: &str) -> String {
    let path = tandem_testkit::workspace_root().join(format!("examples/policies/{name}.yaml"));
    std::fs::read_to_string(path).unwrap()
}

const INDUSTRIES: [&str; 6] = [
    "ecommerce",
    "banking",
    "telecom",
    "retail",
    "airline",
    "insurance",
];

fn import(
    format: pb::ScenarioFormat,
    content: String,
    validate_only: bool,
) -> pb::ImportScenariosRequest {
    pb::ImportScenariosRequest {
        format: format as i32,
        content,
        validate_only,
        reason: "starter".into(),
    }
}

async fn starter_policies_import_export_and_version(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut updates = rig.policy_updates("test-updates").await;
    for (i, industry) in INDUSTRIES.iter().enumerate() {
        let mut c = rig.client(&format!("t{i}"), &[Role::Admin]).await;
        let out = c
            .import_scenarios(import(pb::ScenarioFormat::Yaml, example(industry), false))
            .await
            .unwrap_or_else(|s| panic!("{industry}: {s:?}"))
            .into_inner();
        assert!(out.errors.is_empty(), "{industry}: {:?}", out.errors);
        assert!(out.created >= 4, "{industry}: created {}", out.created);
        assert!(out.scenarios.iter().all(|s| s.version == 1));
        // Export, then import the export: nothing changes.
        for format in [pb::ScenarioFormat::Yaml, pb::ScenarioFormat::Json] {
            let doc = c
                .export_scenarios(pb::ExportScenariosRequest {
                    format: format as i32,
                    scenario_ids: Vec::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .content;
            let again = c
                .import_scenarios(import(format, doc, false))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                (again.created, again.updated),
                (0, 0),
                "{industry} {format:?}"
            );
            assert_eq!(again.unchanged, out.created);
        }
    }
    // Every created scenario published one update.
    let first = next_update(&mut updates).await;
    assert_eq!(first.version, 1);
    assert_eq!(first.cause, pb::ChangeCause::Import as i32);

    // Edit one scenario: a new version with the reason; the history lists both, newest first.
    let mut c = rig.client("t0", &[Role::Admin]).await;
    let mut s = c
        .get_scenario(pb::GetScenarioRequest {
            scenario_id: "refund".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .scenario
        .unwrap();
    s.description = "Refunds, edited".into();
    let up = c
        .upsert_scenario(pb::UpsertScenarioRequest {
            scenario: Some(s.clone()),
            expected_version: 1,
            reason: "clarify the description".into(),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.scenario.as_ref().unwrap().version, 2);
    assert!(!up.created);
    let versions = c
        .list_policy_versions(pb::ListPolicyVersionsRequest {
            scenario_id: "refund".into(),
            page: Some(tandem_proto::pb::common::v1::PageRequest {
                page_size: 1,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions.versions[0].version, 2);
    assert_eq!(versions.versions[0].reason, "clarify the description");
    let token = versions.page.unwrap().next_page_token;
    assert!(!token.is_empty());
    let older = c
        .list_policy_versions(pb::ListPolicyVersionsRequest {
            scenario_id: "refund".into(),
            page: Some(tandem_proto::pb::common::v1::PageRequest {
                page_size: 1,
                page_token: token,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(older.versions[0].version, 1);
    // Delete keeps the history; re-creating continues the numbering.
    c.delete_scenario(pb::DeleteScenarioRequest {
        scenario_id: "refund".into(),
        expected_version: 2,
        reason: "retired".into(),
    })
    .await
    .unwrap();
    let gone = c
        .get_scenario(pb::GetScenarioRequest {
            scenario_id: "refund".into(),
        })
        .await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    let back = c
        .rollback_scenario(pb::RollbackScenarioRequest {
            scenario_id: "refund".into(),
            to_version: 1,
            reason: "needed after all".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.version.as_ref().unwrap().version, 4);
    assert_eq!(back.version.unwrap().restored_version, 1);
    assert_eq!(
        back.scenario.unwrap().description,
        first_description(&rig).await
    );
    rig.stop().await;
}

async fn first_description(rig: &Rig) -> String {
    let mut c = rig.client("t0", &[Role::Admin]).await;
    c.list_policy_versions(pb::ListPolicyVersionsRequest {
        scenario_id: "refund".into(),
        page: None,
    })
    .await
    .unwrap()
    .into_inner()
    .versions
    .into_iter()
    .find(|v| v.version == 1)
    .unwrap()
    .scenario
    .unwrap()
    .description
}

fn violations(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn bad_input_is_refused_with_every_problem_and_nothing_written(
    rig: impl Future<Output = Rig>,
) {
    let rig = rig.await;
    let mut c = rig.client("acme", &[Role::Admin]).await;
    let doc = r#"
scenarios:
  - id: refund
    intents: [refund_request]
    intent_priority: 5
    tier: TIER_STANDARD
    strategy: STRATEGY_BOT_FIRST
  - id: complaint
    intents: [refund_request, complain]
    intent_priority: 5
    tier: TIER_COMPLEX
    strategy: STRATEGY_HUMAN_FIRST
    thresholds: { min_intent_confidence: 0.95 }
    guardrails: { min_intent_confidence: { min: 0.5, max: 0.9 } }
  - id: Bad Id
    intents: [x]
    tier: TIER_NOPE
"#;
    let err = c
        .import_scenarios(import(pb::ScenarioFormat::Yaml, doc.into(), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["scenarios[2]"], "{err:?}");

    let doc = doc.replace(
        "tier: TIER_NOPE",
        "tier: TIER_STANDARD\n    strategy: STRATEGY_BOT_ONLY",
    );
    let err = c
        .import_scenarios(import(pb::ScenarioFormat::Yaml, doc.clone(), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let found = violations(&err);
    for expected in [
        "scenarios[complaint].thresholds.min_intent_confidence",
        "scenarios[Bad Id].id",
        "scenarios.intents",
    ] {
        assert!(
            found.iter().any(|f| f == expected),
            "{expected} not in {found:?}"
        );
    }
    // A dry run lists the same problems in the response.
    let dry = c
        .import_scenarios(import(pb::ScenarioFormat::Yaml, doc, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.errors.len(), found.len());
    // Nothing was written: the two valid scenarios of the document are absent.
    let listed = c
        .list_scenarios(pb::ListScenariosRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.scenarios.is_empty());

    // An unknown strategy on a single upsert.
    let err = c
        .upsert_scenario(pb::UpsertScenarioRequest {
            scenario: Some(pb::Scenario {
                id: "x".into(),
                intents: vec!["x".into()],
                tier: 1,
                strategy: 9,
                ..pb::Scenario::default()
            }),
            ..pb::UpsertScenarioRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["scenarios[x].strategy"]);

    // Stale optimistic version, rollback to a missing version, unknown scenario.
    let ok = pb::Scenario {
        id: "x".into(),
        intents: vec!["x".into()],
        tier: 1,
        strategy: 2,
        ..pb::Scenario::default()
    };
    c.upsert_scenario(pb::UpsertScenarioRequest {
        scenario: Some(ok.clone()),
        ..pb::UpsertScenarioRequest::default()
    })
    .await
    .unwrap();
    let err = c
        .upsert_scenario(pb::UpsertScenarioRequest {
            scenario: Some(ok),
            expected_version: 7,
            ..pb::UpsertScenarioRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = c
        .rollback_scenario(pb::RollbackScenarioRequest {
            scenario_id: "x".into(),
            to_version: 42,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("42"));
    let err = c
        .pin_scenario(pb::PinScenarioRequest {
            scenario_id: "nope".into(),
            reason: String::new(),
        })
        .await;
    assert_eq!(err.unwrap_err().code(), Code::NotFound);
    let err = c
        .decide(pb::DecideRequest {
            context: Some(pb::DecisionContext {
                intent_confidence: 3.0,
                sentiment: -4.0,
                ..pb::DecisionContext::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err).len(), 2);
    let err = c
        .upsert_adjustment_rule(pb::UpsertAdjustmentRuleRequest {
            rule: Some(pb::AdjustmentRule {
                signal: pb::AdjustmentSignal::BotCsat as i32,
                threshold: 7.0,
                silence_timeout: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                ..pb::AdjustmentRule::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let found = violations(&err);
    for expected in [
        "rule.comparison",
        "rule.threshold",
        "rule.window",
        "rule.silence_timeout",
        "rule.effect",
    ] {
        assert!(
            found.iter().any(|f| f == expected),
            "{expected} not in {found:?}"
        );
    }
    rig.stop().await;
}

async fn decisions_and_shadow_mode(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut admin = rig.client("acme", &[Role::Admin]).await;
    admin
        .import_scenarios(import(
            pb::ScenarioFormat::Yaml,
            example("insurance"),
            false,
        ))
        .await
        .unwrap();
    let mut svc = rig.client("acme", &[Role::Service]).await;
    let scenarios = admin
        .list_scenarios(pb::ListScenariosRequest::default())
        .await
        .unwrap()
        .into_inner()
        .scenarios;
    let human_first = scenarios
        .iter()
        .find(|s| s.strategy == pb::Strategy::HumanFirst as i32)
        .unwrap()
        .clone();
    let ctx = pb::DecisionContext {
        intent: human_first.intents[0].clone(),
        intent_confidence: 0.99,
        within_business_hours: Some(true),
        queue_eta_seconds: Some(10),
        ..pb::DecisionContext::default()
    };
    let d = svc
        .decide(pb::DecideRequest {
            context: Some(ctx.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.scenario_id, human_first.id);
    assert_eq!(d.action, pb::DecisionAction::Handoff as i32);
    assert_eq!(d.rule_id, "human_first");
    assert_eq!(d.policy_version, 1);
    assert_eq!(d.routing, human_first.routing);
    // An unknown intent falls back to the default policy.
    let d = svc
        .decide(pb::DecideRequest {
            context: Some(pb::DecisionContext {
                intent: "weather".into(),
                intent_confidence: 0.1,
                ..ctx.clone()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.scenario_id, "default");

    // Shadow mode: the live decision is the default policy's; the scenario's own is recorded.
    let mut shadowed = human_first.clone();
    shadowed.mode = pb::Mode::Shadow as i32;
    admin
        .upsert_scenario(pb::UpsertScenarioRequest {
            scenario: Some(shadowed),
            reason: "trial".into(),
            ..pb::UpsertScenarioRequest::default()
        })
        .await
        .unwrap();
    let d = svc
        .decide(pb::DecideRequest {
            context: Some(pb::DecisionContext {
                conversation_id: "c-1".into(),
                ..ctx.clone()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.mode, pb::Mode::Shadow as i32);
    assert_eq!(d.action, pb::DecisionAction::BotAnswer as i32);
    assert_eq!(
        d.shadow.as_ref().unwrap().action,
        pb::DecisionAction::Handoff as i32
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let listed = admin
            .list_shadow_decisions(pb::ListShadowDecisionsRequest {
                scenario_id: human_first.id.clone(),
                ..pb::ListShadowDecisionsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        if !listed.records.is_empty() || tokio::time::Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(listed.records.len(), 1);
    assert!(listed.records[0].diverged);
    assert_eq!(listed.records[0].conversation_id, "c-1");
    assert!((listed.divergence_rate - 1.0).abs() < 1e-9);
    rig.stop().await;
}

fn alert(scenario: &str, value: f64, id: &str) -> RawEvent {
    let tenant = TenantId::new("acme").unwrap();
    let mut e = RawEvent::new(
        &tenant,
        &AlertRaised {
            alert_id: id.into(),
            kind: AlertKind::BotCsatBelowTarget as i32,
            scenario_id: scenario.into(),
            metric: MetricName::Csat as i32,
            observed_value: value,
            threshold: 0.7,
            ..AlertRaised::default()
        },
        Some(scenario.to_owned()),
    );
    e.id = format!("evt-{id}");
    e
}

/// The resolution of the alert `id` at `value` (NaN: without a measurement).
fn resolved(scenario: &str, value: f64, id: &str) -> RawEvent {
    let tenant = TenantId::new("acme").unwrap();
    let mut e = RawEvent::new(
        &tenant,
        &AlertResolved {
            alert_id: id.into(),
            kind: AlertKind::BotCsatBelowTarget as i32,
            scenario_id: scenario.into(),
            metric: MetricName::Csat as i32,
            observed_value: value,
            ..AlertResolved::default()
        },
        Some(scenario.to_owned()),
    );
    e.id = format!("evt-{id}-resolved");
    e
}

async fn alerts_adjust_within_guardrails_and_pins_and_rollbacks_work(
    rig: impl Future<Output = Rig>,
) {
    let rig = rig.await;
    let mut c = rig.client("acme", &[Role::Admin]).await;
    c.import_scenarios(import(
        pb::ScenarioFormat::Yaml,
        example("ecommerce"),
        false,
    ))
    .await
    .unwrap();
    let scenarios = c
        .list_scenarios(pb::ListScenariosRequest::default())
        .await
        .unwrap()
        .into_inner()
        .scenarios;
    // A bot-first scenario that may move to agent assist.
    let target = scenarios
        .iter()
        .find(|s| {
            s.strategy == pb::Strategy::BotFirst as i32
                && s.guardrails.as_ref().is_some_and(|g| {
                    g.allowed_strategies
                        .contains(&(pb::Strategy::AgentAssist as i32))
                })
        })
        .expect("a bot-first scenario allowing agent assist")
        .clone();
    let rule = c
        .upsert_adjustment_rule(pb::UpsertAdjustmentRuleRequest {
            rule: Some(pb::AdjustmentRule {
                name: "bot csat low".into(),
                ..live_rule_below_0_7(
                    &target.id,
                    pb::AdjustmentSignal::BotCsat,
                    3_600,
                    pb::adjustment_rule::Effect::SetStrategy(pb::Strategy::AgentAssist as i32),
                )
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert!(!rule.id.is_empty());
    let mut updates = rig.policy_updates("test-adjust").await;
    // Drain the import's updates.
    for _ in 0..scenarios.len() {
        next_update(&mut updates).await;
    }

    // A low CSAT alert moves the scenario to agent assist, as a new version with its metrics.
    rig.publish(alert(&target.id, 0.5, "a1")).await;
    let update = next_update(&mut updates).await;
    assert_eq!(update.scenario_id, target.id);
    assert_eq!(update.cause, pb::ChangeCause::Adjustment as i32);
    assert_eq!(update.version, 2);
    assert_eq!(update.actor, "system");
    assert_eq!(
        update.scenario.as_ref().unwrap().strategy,
        pb::Strategy::AgentAssist as i32
    );
    let versions = c
        .list_policy_versions(pb::ListPolicyVersionsRequest {
            scenario_id: target.id.clone(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions[0].rule_id, rule.id);
    assert!(
        versions[0]
            .metrics
            .contains_key("ADJUSTMENT_SIGNAL_BOT_CSAT")
    );

    // The same event redelivered changes nothing, and so does a further alert while the
    // change is in effect.
    rig.publish(alert(&target.id, 0.5, "a1")).await;
    rig.publish(alert(&target.id, 0.4, "a2")).await;
    // Pin: the revert the resolution of the alert brings is recorded as blocked, not applied.
    c.pin_scenario(pb::PinScenarioRequest {
        scenario_id: target.id.clone(),
        reason: "incident review".into(),
    })
    .await
    .unwrap();
    let pinned = next_update(&mut updates).await;
    assert_eq!(pinned.version, 3);
    assert!(pinned.scenario.unwrap().pinned);
    rig.publish(resolved(&target.id, 0.9, "a1")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let adjustments = loop {
        let listed = c
            .list_adjustments(pb::ListAdjustmentsRequest {
                scenario_id: target.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .adjustments;
        if listed.len() >= 2 || tokio::time::Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let statuses: Vec<i32> = adjustments.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [
            pb::AdjustmentStatus::BlockedByPin as i32,
            pb::AdjustmentStatus::Applied as i32
        ],
        "one firing, then the revert blocked by the pin (newest first): {adjustments:?}"
    );
    let now = c
        .get_scenario(pb::GetScenarioRequest {
            scenario_id: target.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .scenario
        .unwrap();
    assert_eq!(
        now.version, 3,
        "a pinned scenario is not changed by adjustments"
    );

    // Roll back to version 1 (bot first again), keeping the pin.
    let back = c
        .rollback_scenario(pb::RollbackScenarioRequest {
            scenario_id: target.id.clone(),
            to_version: 1,
            reason: "undo the adjustment".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let s = back.scenario.unwrap();
    assert_eq!(s.version, 4);
    assert_eq!(s.strategy, pb::Strategy::BotFirst as i32);
    assert!(s.pinned);
    assert_eq!(
        next_update(&mut updates).await.cause,
        pb::ChangeCause::Rollback as i32
    );

    // Pinned: a new low alert is blocked by the pin.
    rig.publish(alert(&target.id, 0.3, "a3")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = c
            .list_adjustments(pb::ListAdjustmentsRequest {
                scenario_id: target.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .adjustments;
        if listed.len() >= 3 {
            assert_eq!(
                listed[0].status,
                pb::AdjustmentStatus::BlockedByPin as i32,
                "{listed:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no third adjustment: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Unpin. The resolution of that alert ends the episode without a change (its firing
    // changed nothing to revert).
    c.unpin_scenario(pb::UnpinScenarioRequest {
        scenario_id: target.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let unpinned = next_update(&mut updates).await;
    assert!(!unpinned.scenario.unwrap().pinned);
    rig.publish(resolved(&target.id, 0.9, "a3")).await;

    // A new alert applies again; its resolution, even without a measurement, reverts at once
    // (the rule's window is an hour).
    rig.publish(alert(&target.id, 0.5, "a4")).await;
    let applied = next_update(&mut updates).await;
    assert_eq!(applied.version, 6);
    assert_eq!(applied.cause, pb::ChangeCause::Adjustment as i32);
    assert_eq!(
        applied.scenario.unwrap().strategy,
        pb::Strategy::AgentAssist as i32
    );
    rig.publish(resolved(&target.id, f64::NAN, "a4")).await;
    let reverted = next_update(&mut updates).await;
    assert_eq!(reverted.version, 7);
    assert_eq!(reverted.cause, pb::ChangeCause::Adjustment as i32);
    assert_eq!(
        reverted.scenario.unwrap().strategy,
        pb::Strategy::BotFirst as i32
    );
    rig.stop().await;
}

async fn roles_are_enforced(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut agent = rig.client("acme", &[Role::Agent]).await;
    let err = agent
        .import_scenarios(import(pb::ScenarioFormat::Yaml, example("retail"), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        agent
            .list_scenarios(pb::ListScenariosRequest::default())
            .await
            .is_ok()
    );
    // Tenants are isolated.
    let mut a = rig.client("tenant-a", &[Role::Admin]).await;
    a.import_scenarios(import(pb::ScenarioFormat::Yaml, example("retail"), false))
        .await
        .unwrap();
    let mut b = rig.client("tenant-b", &[Role::Admin]).await;
    let listed = b
        .list_scenarios(pb::ListScenariosRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.scenarios.is_empty());
    rig.stop().await;
}
