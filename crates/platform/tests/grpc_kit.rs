//! The gRPC server kit as a client sees it, over real loopback sockets: health, reflection,
//! authentication, limits, malformed requests, graceful shutdown and trace context.
//!
//! The business service is the generated `PolicyService` with a test implementation whose
//! `GetScenario` echoes the verified caller back; every other method is unimplemented.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use tandem_platform::auth::{AuthInterceptor, Authenticator, Role, TENANT_HEADER, TokenIssuer};
use tandem_platform::config::{AuthConfig, GrpcConfig, Secret};
use tandem_platform::grpc::{GrpcServer, ServeError};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::policy::v1 as policy;
use tandem_proto::pb::policy::v1::policy_service_client::PolicyServiceClient;
use tandem_proto::pb::policy::v1::policy_service_server::{
    PolicyService, PolicyServiceServer, SERVICE_NAME as POLICY,
};

/// `GetScenario` answers a scenario whose `names` carry the caller's tenant and subject and the
/// trace id of the server-side span; a scenario id `sleep-<ms>` makes it sleep first.
struct EchoPolicy;

fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_string()
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of this test"))
}

#[tonic::async_trait]
impl PolicyService for EchoPolicy {
    async fn get_scenario(
        &self,
        request: Request<policy::GetScenarioRequest>,
    ) -> Result<Response<policy::GetScenarioResponse>, Status> {
        let caller = tandem_platform::auth::caller(&request)?.clone();
        let trace_id = current_trace_id();
        let id = request.into_inner().scenario_id;
        if let Some(ms) = id.strip_prefix("sleep-").and_then(|ms| ms.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let names = HashMap::from([
            ("tenant".to_owned(), caller.tenant.to_string()),
            ("subject".to_owned(), caller.subject),
            ("trace_id".to_owned(), trace_id),
        ]);
        Ok(Response::new(policy::GetScenarioResponse {
            scenario: Some(policy::Scenario {
                id,
                names,
                ..Default::default()
            }),
        }))
    }

    async fn upsert_scenario(
        &self,
        _: Request<policy::UpsertScenarioRequest>,
    ) -> Result<Response<policy::UpsertScenarioResponse>, Status> {
        unimplemented()
    }

    async fn list_scenarios(
        &self,
        _: Request<policy::ListScenariosRequest>,
    ) -> Result<Response<policy::ListScenariosResponse>, Status> {
        unimplemented()
    }

    async fn delete_scenario(
        &self,
        _: Request<policy::DeleteScenarioRequest>,
    ) -> Result<Response<policy::DeleteScenarioResponse>, Status> {
        unimplemented()
    }

    async fn import_scenarios(
        &self,
        _: Request<policy::ImportScenariosRequest>,
    ) -> Result<Response<policy::ImportScenariosResponse>, Status> {
        unimplemented()
    }

    async fn export_scenarios(
        &self,
        _: Request<policy::ExportScenariosRequest>,
    ) -> Result<Response<policy::ExportScenariosResponse>, Status> {
        unimplemented()
    }

    async fn decide(
        &self,
        _: Request<policy::DecideRequest>,
    ) -> Result<Response<policy::DecideResponse>, Status> {
        unimplemented()
    }

    async fn list_policy_versions(
        &self,
        _: Request<policy::ListPolicyVersionsRequest>,
    ) -> Result<Response<policy::ListPolicyVersionsResponse>, Status> {
        unimplemented()
    }

    async fn rollback_scenario(
        &self,
        _: Request<policy::RollbackScenarioRequest>,
    ) -> Result<Response<policy::RollbackScenarioResponse>, Status> {
        unimplemented()
    }

    async fn pin_scenario(
        &self,
        _: Request<policy::PinScenarioRequest>,
    ) -> Result<Response<policy::PinScenarioResponse>, Status> {
        unimplemented()
    }

    async fn unpin_scenario(
        &self,
        _: Request<policy::UnpinScenarioRequest>,
    ) -> Result<Response<policy::UnpinScenarioResponse>, Status> {
        unimplemented()
    }

    async fn list_adjustments(
        &self,
        _: Request<policy::ListAdjustmentsRequest>,
    ) -> Result<Response<policy::ListAdjustmentsResponse>, Status> {
        unimplemented()
    }

    async fn list_shadow_decisions(
        &self,
        _: Request<policy::ListShadowDecisionsRequest>,
    ) -> Result<Response<policy::ListShadowDecisionsResponse>, Status> {
        unimplemented()
    }

    async fn upsert_adjustment_rule(
        &self,
        _: Request<policy::UpsertAdjustmentRuleRequest>,
    ) -> Result<Response<policy::UpsertAdjustmentRuleResponse>, Status> {
        unimplemented()
    }

    async fn list_adjustment_rules(
        &self,
        _: Request<policy::ListAdjustmentRulesRequest>,
    ) -> Result<Response<policy::ListAdjustmentRulesResponse>, Status> {
        unimplemented()
    }
}

/// A kit server running the echo service behind the auth interceptor.
struct Running {
    channel: Channel,
    shutdown: CancellationToken,
    served: JoinHandle<Result<(), ServeError>>,
}

async fn start(grpc: GrpcConfig, auth: &AuthConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let authenticator = Arc::new(Authenticator::from_config(auth).unwrap());
    let mut server = GrpcServer::new(&grpc);
    server.add_service(InterceptedService::new(
        tandem_platform::limited!(PolicyServiceServer::new(EchoPolicy), &grpc),
        AuthInterceptor::new(authenticator),
    ));
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(server.serve(listener, shutdown.clone()));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Running {
        channel,
        shutdown,
        served,
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn dev_auth() -> AuthConfig {
    AuthConfig {
        allow_hs256: true,
        hs256_secret: Secret::new("s".repeat(32)),
        ..AuthConfig::default()
    }
}

fn token(cfg: &AuthConfig, tenant: &str) -> String {
    TokenIssuer::from_config(cfg)
        .unwrap()
        .issue(
            &TenantId::new(tenant).unwrap(),
            "agent-7",
            &[Role::Agent],
            Duration::from_secs(60),
        )
        .unwrap()
}

async fn get_scenario(
    channel: &Channel,
    token: Option<&str>,
    tenant: Option<&str>,
    scenario_id: &str,
) -> Result<policy::Scenario, Status> {
    let mut request = Request::new(policy::GetScenarioRequest {
        scenario_id: scenario_id.to_owned(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if let Some(tenant) = tenant {
        request
            .metadata_mut()
            .insert(TENANT_HEADER, tenant.parse().unwrap());
    }
    let response = PolicyServiceClient::new(channel.clone())
        .get_scenario(request)
        .await?;
    Ok(response.into_inner().scenario.unwrap())
}

async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

async fn list_services(channel: &Channel) -> Result<Vec<String>, Status> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    match responses.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_before_the_server_stops() {
    let not_serving_delay = Duration::from_millis(300);
    let server = start(
        GrpcConfig {
            not_serving_delay,
            ..GrpcConfig::default()
        },
        &dev_auth(),
    )
    .await;
    assert_eq!(health(&server.channel, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&server.channel, POLICY).await,
        ServingStatus::Serving
    );

    let cancelled_at = Instant::now();
    server.shutdown.cancel();
    loop {
        if health(&server.channel, POLICY).await == ServingStatus::NotServing {
            break;
        }
        assert!(
            cancelled_at.elapsed() < not_serving_delay,
            "still serving after the shutdown signal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(health(&server.channel, "").await, ServingStatus::NotServing);
    assert!(
        cancelled_at.elapsed() < not_serving_delay,
        "not serving was reported too late to be seen"
    );
    assert!(
        !server.served.is_finished(),
        "the server stopped before its not-serving delay"
    );

    let served =
        tokio::time::timeout(not_serving_delay + Duration::from_secs(1), server.served).await;
    served
        .expect("serve() did not return in time")
        .unwrap()
        .unwrap();
    assert!(cancelled_at.elapsed() >= not_serving_delay);
}

/// A health `Watch` (a load balancer's, a client's health checking) sees NOT_SERVING at the
/// shutdown signal and then ends with UNAVAILABLE when the drain begins, so it does not hold the
/// drain until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_sees_not_serving_and_ends_when_the_server_drains() {
    let not_serving_delay = Duration::from_millis(300);
    let server = start(
        GrpcConfig {
            not_serving_delay,
            drain_timeout: Duration::from_secs(30),
            ..GrpcConfig::default()
        },
        &dev_auth(),
    )
    .await;
    let mut watches = Vec::new();
    for service in ["", POLICY] {
        let mut watch = HealthClient::new(server.channel.clone())
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push(watch);
    }

    let cancelled_at = Instant::now();
    server.shutdown.cancel();
    for watch in &mut watches {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("no health change after the shutdown signal")
            .unwrap()
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing);
        assert!(cancelled_at.elapsed() < not_serving_delay);
    }
    for watch in &mut watches {
        let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("the watch did not end when the server drained");
        assert_eq!(end.unwrap_err().code(), Code::Unavailable);
        assert!(cancelled_at.elapsed() >= not_serving_delay);
    }
    // The open streams do not hold the drain: serve() returns long before the drain timeout.
    tokio::time::timeout(Duration::from_secs(5), server.served)
        .await
        .expect("serve() waited for the health watches")
        .unwrap()
        .unwrap();
    drop(watches);
}

#[tokio::test]
async fn reflection_lists_the_added_services_and_health_only() {
    let server = start(GrpcConfig::default(), &dev_auth()).await;
    let services = list_services(&server.channel).await.unwrap();
    assert!(services.iter().any(|s| s == POLICY), "{services:?}");
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );
    assert!(
        !services
            .iter()
            .any(|s| s == "tandem.routing.v1.RoutingService"),
        "{services:?}"
    );
    assert!(
        !services
            .iter()
            .any(|s| s == "tandem.dialog.v1.DialogService"),
        "{services:?}"
    );
}

#[tokio::test]
async fn reflection_switched_off_answers_unimplemented() {
    let server = start(
        GrpcConfig {
            reflection: false,
            ..GrpcConfig::default()
        },
        &dev_auth(),
    )
    .await;
    assert_eq!(
        list_services(&server.channel).await.unwrap_err().code(),
        Code::Unimplemented
    );
}

#[tokio::test]
async fn call_without_token_is_unauthenticated() {
    let server = start(GrpcConfig::default(), &dev_auth()).await;
    let status = get_scenario(&server.channel, None, None, "billing")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn garbage_token_is_unauthenticated() {
    let server = start(GrpcConfig::default(), &dev_auth()).await;
    let status = get_scenario(&server.channel, Some("not.a.jwt"), None, "billing")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn token_signed_by_another_key_is_unauthenticated() {
    let server = start(GrpcConfig::default(), &dev_auth()).await;
    let other = AuthConfig {
        hs256_secret: Secret::new("o".repeat(32)),
        ..dev_auth()
    };
    let status = get_scenario(
        &server.channel,
        Some(&token(&other, "acme")),
        None,
        "billing",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn valid_dev_token_reaches_the_handler_with_its_tenant() {
    let auth = dev_auth();
    let server = start(GrpcConfig::default(), &auth).await;
    let scenario = get_scenario(
        &server.channel,
        Some(&token(&auth, "acme")),
        Some("acme"),
        "billing",
    )
    .await
    .unwrap();
    assert_eq!(scenario.id, "billing");
    assert_eq!(scenario.names["tenant"], "acme");
    assert_eq!(scenario.names["subject"], "agent-7");
}

#[tokio::test]
async fn tenant_header_differing_from_the_token_is_permission_denied() {
    let auth = dev_auth();
    let server = start(GrpcConfig::default(), &auth).await;
    let status = get_scenario(
        &server.channel,
        Some(&token(&auth, "acme")),
        Some("globex"),
        "billing",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_public_key_files() {
    let verifying = AuthConfig {
        public_key_files: vec![
            fixture("test-only-rsa-public.pem"),
            fixture("test-only-ec-public.pem"),
        ],
        ..AuthConfig::default()
    };
    let server = start(GrpcConfig::default(), &verifying).await;
    for private in ["test-only-rsa-private.pem", "test-only-ec-private.pem"] {
        let signing = AuthConfig {
            signing_key_file: Some(fixture(private)),
            ..AuthConfig::default()
        };
        let scenario = get_scenario(
            &server.channel,
            Some(&token(&signing, "acme")),
            None,
            "billing",
        )
        .await
        .unwrap();
        assert_eq!(scenario.names["tenant"], "acme", "signed with {private}");
    }
    // A development token must not pass where only asymmetric keys are configured.
    let status = get_scenario(
        &server.channel,
        Some(&token(&dev_auth(), "acme")),
        None,
        "billing",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn rs256_token_verifies_against_a_jwks_file_by_kid() {
    let verifying = AuthConfig {
        jwks_file: Some(fixture("test-only-jwks.json")),
        ..AuthConfig::default()
    };
    let server = start(GrpcConfig::default(), &verifying).await;
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(fixture("test-only-rsa-private.pem")).unwrap(),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = tandem_platform::auth::Claims {
        sub: "agent-7".into(),
        tenant: "acme".into(),
        roles: vec![Role::Agent],
        exp: now + 60,
        iat: now,
        iss: "tandem".into(),
        aud: "tandem".into(),
    };
    let sign = |kid: &str| {
        let header = jsonwebtoken::Header {
            kid: Some(kid.to_owned()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256)
        };
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };

    let scenario = get_scenario(
        &server.channel,
        Some(&sign("test-only-rsa")),
        None,
        "billing",
    )
    .await
    .unwrap();
    assert_eq!(scenario.names["tenant"], "acme");
    let status = get_scenario(
        &server.channel,
        Some(&sign("rotated-away")),
        None,
        "billing",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn oversized_request_is_resource_exhausted() {
    let auth = dev_auth();
    let server = start(
        GrpcConfig {
            max_message_bytes: 4096,
            ..GrpcConfig::default()
        },
        &auth,
    )
    .await;
    let token = token(&auth, "acme");
    let fits = get_scenario(&server.channel, Some(&token), None, &"a".repeat(1024))
        .await
        .unwrap();
    assert_eq!(fits.id.len(), 1024);
    let status = get_scenario(&server.channel, Some(&token), None, &"a".repeat(8192))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

/// A codec that sends and receives message bodies as raw bytes, so a test can put anything on
/// the wire, including bytes that are no protobuf message at all.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `GetScenario` with `body` as the request message, exactly as given.
async fn get_scenario_raw(
    channel: &Channel,
    token: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut client = tonic::client::Grpc::new(channel.clone());
    client.ready().await.unwrap();
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let path = http::uri::PathAndQuery::from_static("/tandem.policy.v1.PolicyService/GetScenario");
    let response = client.unary(request, path, RawCodec).await?;
    Ok(response.into_inner())
}

#[tokio::test]
async fn request_that_is_not_a_protobuf_message_is_invalid_argument() {
    use prost::Message as _;

    let auth = dev_auth();
    let server = start(GrpcConfig::default(), &auth).await;
    let token = token(&auth, "acme");

    let status = get_scenario_raw(&server.channel, &token, vec![0xff, 0xff, 0xff])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to decode Protobuf message"),
        "{status:?}"
    );

    let valid = policy::GetScenarioRequest {
        scenario_id: "billing".into(),
    };
    let answer = get_scenario_raw(&server.channel, &token, valid.encode_to_vec())
        .await
        .unwrap();
    let scenario = policy::GetScenarioResponse::decode(answer.as_slice())
        .unwrap()
        .scenario
        .unwrap();
    assert_eq!(scenario.id, "billing");
    assert_eq!(scenario.names["tenant"], "acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_global_limit_are_shed_with_unavailable() {
    let auth = dev_auth();
    let server = start(
        GrpcConfig {
            global_concurrency_limit: 1,
            ..GrpcConfig::default()
        },
        &auth,
    )
    .await;
    let token = token(&auth, "acme");
    let started = Instant::now();
    let calls = (0..4).map(|_| {
        let (channel, token) = (server.channel.clone(), token.clone());
        tokio::spawn(async move {
            let result = get_scenario(&channel, Some(&token), None, "sleep-600").await;
            (result.map(|_| ()).map_err(|s| s.code()), started.elapsed())
        })
    });
    let results = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();

    let served = results.iter().filter(|(r, _)| r.is_ok()).count();
    let shed: Vec<Duration> = results
        .iter()
        .filter(|(r, _)| *r == Err(Code::Unavailable))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(
        served + shed.len(),
        results.len(),
        "only OK or UNAVAILABLE expected: {results:?}"
    );
    assert!(served >= 1, "{results:?}");
    assert!(!shed.is_empty(), "no call was shed: {results:?}");
    assert!(
        shed.iter().all(|t| *t < Duration::from_millis(500)),
        "shed calls waited in a queue: {results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_answered_while_the_global_limit_is_reached() {
    let auth = dev_auth();
    let server = start(
        GrpcConfig {
            global_concurrency_limit: 1,
            ..GrpcConfig::default()
        },
        &auth,
    )
    .await;
    let token = token(&auth, "acme");
    let busy = {
        let (channel, token) = (server.channel.clone(), token.clone());
        tokio::spawn(async move { get_scenario(&channel, Some(&token), None, "sleep-800").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shed = get_scenario(&server.channel, Some(&token), None, "now").await;
    assert_eq!(
        shed.unwrap_err().code(),
        Code::Unavailable,
        "the limit is reached"
    );
    assert_eq!(health(&server.channel, "").await, ServingStatus::Serving);
    busy.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_connection_limit_are_resource_exhausted() {
    let auth = dev_auth();
    let server = start(
        GrpcConfig {
            concurrency_limit_per_connection: 1,
            ..GrpcConfig::default()
        },
        &auth,
    )
    .await;
    let token = token(&auth, "acme");
    let calls = (0..3).map(|_| {
        let (channel, token) = (server.channel.clone(), token.clone());
        tokio::spawn(async move {
            get_scenario(&channel, Some(&token), None, "sleep-600")
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        })
    });
    let results = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    assert!(results.iter().any(Result::is_ok), "{results:?}");
    assert!(
        results.contains(&Err(Code::ResourceExhausted)),
        "{results:?}"
    );
}

#[tokio::test]
async fn slow_call_ends_at_the_request_timeout() {
    let auth = dev_auth();
    let server = start(
        GrpcConfig {
            request_timeout: Duration::from_millis(200),
            ..GrpcConfig::default()
        },
        &auth,
    )
    .await;
    let started = Instant::now();
    let status = get_scenario(
        &server.channel,
        Some(&token(&auth, "acme")),
        None,
        "sleep-2000",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_span_joins_the_callers_trace() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("grpc-kit-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let auth = dev_auth();
    let server = start(GrpcConfig::default(), &auth).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = Request::new(policy::GetScenarioRequest {
        scenario_id: "billing".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token(&auth, "acme")).parse().unwrap(),
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let scenario = PolicyServiceClient::new(server.channel.clone())
        .get_scenario(request)
        .await
        .unwrap()
        .into_inner()
        .scenario
        .unwrap();
    assert_eq!(scenario.names["trace_id"], trace_id);
}
