//! A service running in-process for integration tests and benchmarks, on either deployment:
//! PostgreSQL with a real nats-server (throwaway servers from the testkit), or the standalone
//! engine (SQLite in a temporary directory and the in-process bus). The test gets the server's
//! address, a bus handle on the same bus, and development tokens the service accepts.
//!
//! Compiled with the `testing` feature only; services enable it in their dev-dependencies.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::auth::{Role, TokenIssuer};
use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use crate::runtime::{Service, serve_with};
use tandem_proto::ids::TenantId;

/// The development secret every rig signs and verifies tokens with.
const SECRET: &str = "tandem-test-secret-tandem-test-secret";

/// Adds a bearer token to every call of a generated client.
pub type Intercept = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// Keeps the rig's servers or directory alive.
#[allow(dead_code, clippy::large_enum_variant, reason = "held for their Drop")]
enum Keep {
    Servers(tandem_testkit::Postgres, tandem_testkit::NatsServer),
    Dir(tempfile::TempDir),
}

/// A running service.
pub struct ServiceRig {
    /// A handle on the bus the service uses.
    pub bus: Bus,
    /// That bus's settings, for consumer specs.
    pub bus_config: BusConfig,
    /// The gRPC address, `http://127.0.0.1:PORT`.
    pub url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _keep: Keep,
}

/// The auth settings of every rig: HS256 with the test secret.
pub fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

/// Signs a development token for `tenant`, valid ten minutes.
///
/// # Panics
/// When the tenant id is malformed: a test bug.
#[allow(
    clippy::unwrap_used,
    reason = "test support: a bad tenant id is a test bug"
)]
pub fn token(tenant: &str, subject: &str, roles: &[Role]) -> String {
    TokenIssuer::from_config(&auth())
        .unwrap()
        .issue(
            &TenantId::new(tenant).unwrap(),
            subject,
            roles,
            Duration::from_secs(600),
        )
        .unwrap()
}

/// An interceptor adding `token` as the bearer.
///
/// # Panics
/// When the token is not valid header text: a test bug.
#[allow(clippy::unwrap_used, reason = "test support")]
pub fn bearer(token: &str) -> Intercept {
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    Box::new(move |mut req: Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    })
}

#[allow(
    clippy::unwrap_used,
    reason = "test support: set-up failures end the test"
)]
impl ServiceRig {
    /// Starts `S` on a fresh database of a throwaway PostgreSQL and a throwaway nats-server.
    pub async fn production<S: Service>(settings: S::Settings) -> Self {
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let database = DatabaseConfig {
            url: Secret::new(pg.fresh_database().await.unwrap()),
            schema: S::NAME.into(),
            ..DatabaseConfig::default()
        };
        let bus_config = BusConfig {
            kind: BusKind::Nats,
            nats_url: nats.url(),
            ..BusConfig::default()
        };
        Self::start::<S>(
            settings,
            database,
            bus_config,
            None,
            Keep::Servers(pg, nats),
        )
        .await
    }

    /// Starts `S` on SQLite in a temporary directory and a fresh in-process bus.
    pub async fn standalone<S: Service>(settings: S::Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("{}.db", S::NAME));
        let database = DatabaseConfig {
            url: Secret::new(format!("sqlite://{}", file.display())),
            ..DatabaseConfig::default()
        };
        let bus_config = BusConfig {
            kind: BusKind::Memory,
            ..BusConfig::default()
        };
        let memory = Some(MemoryBus::new());
        Self::start::<S>(settings, database, bus_config, memory, Keep::Dir(dir)).await
    }

    async fn start<S: Service>(
        settings: S::Settings,
        database: DatabaseConfig,
        bus_config: BusConfig,
        memory: Option<MemoryBus>,
        keep: Keep,
    ) -> Self {
        let cfg = ServiceConfig {
            auth: auth(),
            database,
            bus: bus_config.clone(),
            outbox: OutboxConfig {
                poll_interval: Duration::from_millis(50),
                ..OutboxConfig::default()
            },
            service: settings,
            ..ServiceConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let server = {
            let (stop, memory) = (stop.clone(), memory.clone());
            tokio::spawn(async move { serve_with::<S>(cfg, memory.as_ref(), listener, stop).await })
        };
        let bus = Bus::connect(&bus_config, memory.as_ref()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        let rig = Self {
            bus,
            bus_config,
            url,
            stop,
            server,
            _keep: keep,
        };
        rig.wait_serving().await;
        rig
    }

    /// Waits until the server reports SERVING on its health service.
    async fn wait_serving(&self) {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut health = HealthClient::new(self.channel().await);
            if health.check(HealthCheckRequest::default()).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the service did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connects a channel to the service, retrying while it starts.
    pub async fn channel(&self) -> Channel {
        loop {
            match Channel::from_shared(self.url.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(channel) => return channel,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A channel and an interceptor carrying a token for `tenant` with `roles`.
    pub async fn authorised(
        &self,
        tenant: &str,
        subject: &str,
        roles: &[Role],
    ) -> (Channel, Intercept) {
        (self.channel().await, bearer(&token(tenant, subject, roles)))
    }

    /// Shuts the service down and checks it stopped cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}
