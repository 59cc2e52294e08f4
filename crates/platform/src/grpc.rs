//! The gRPC server every service runs on: health, reflection, limits, tracing and a graceful
//! shutdown that reports NOT_SERVING before it drains.
//!
//! ```text
//! let mut server = GrpcServer::new(&cfg.grpc);
//! server.add_service(InterceptedService::new(limited!(RoutingServiceServer::new(svc), &cfg.grpc), auth));
//! server.serve(listener, shutdown).await?;
//! ```

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::GrpcConfig;
use crate::propagation::ServerTraceLayer;

/// Applies the configured message size limits to a generated tonic server.
#[macro_export]
macro_rules! limited {
    ($server:expr, $cfg:expr) => {
        $server
            .max_decoding_message_size($cfg.max_message_bytes)
            .max_encoding_message_size($cfg.max_message_bytes)
    };
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor sets.
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    /// The transport failed.
    #[error("grpc transport failed")]
    Transport(#[from] tonic::transport::Error),
}

/// A gRPC server under construction.
pub struct GrpcServer {
    cfg: GrpcConfig,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    health: HealthReporter,
}

impl GrpcServer {
    /// Starts a server description with health reporting; services are added next.
    pub fn new(cfg: &GrpcConfig) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            cfg: cfg.clone(),
            routes,
            names: Vec::new(),
            health,
        }
    }

    /// Adds a service; it reports SERVING as soon as the server runs.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Declares a service whose handlers are not mounted in this build: health and reflection
    /// describe it, calls to it answer UNIMPLEMENTED.
    pub fn declare(&mut self, name: &'static str) -> &mut Self {
        self.names.push(name);
        self
    }

    /// Returns the health reporter, for services that report their dependencies' state.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Returns the fully qualified names of the services added so far.
    pub fn service_names(&self) -> &[&'static str] {
        &self.names
    }

    /// Serves until `shutdown` is cancelled, then reports NOT_SERVING, waits the configured
    /// delay and drains in-flight calls (for at most `drain_timeout`).
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        if self.cfg.reflection {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for name in &self.names {
                builder = builder.with_service_name(*name);
            }
            let v1 = builder
                .build_v1()
                .map_err(|e| ServeError::Reflection(e.to_string()))?;
            self.routes.add_service(v1);
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for name in &self.names {
                builder = builder.with_service_name(*name);
            }
            let v1alpha = builder
                .build_v1alpha()
                .map_err(|e| ServeError::Reflection(e.to_string()))?;
            self.routes.add_service(v1alpha);
        }
        for name in &self.names {
            self.health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }

        let stop = CancellationToken::new();
        let health = self.health.clone();
        let names = self.names.clone();
        let not_serving_delay = self.cfg.not_serving_delay;
        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for name in names {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(
                delay_ms = not_serving_delay.as_millis() as u64,
                "not serving, draining"
            );
            tokio::time::sleep(not_serving_delay).await;
            trigger.cancel();
        });

        let cfg = &self.cfg;
        let mut builder = Server::builder()
            .timeout(cfg.request_timeout)
            .concurrency_limit_per_connection(cfg.concurrency_limit_per_connection)
            .load_shed(true)
            .max_concurrent_streams(Some(cfg.max_concurrent_streams))
            .http2_keepalive_interval(Some(cfg.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true);
        if !cfg.max_connection_age.is_zero() {
            builder = builder.max_connection_age(cfg.max_connection_age);
        }
        let global_limit = tower::ServiceBuilder::new()
            .map_result(overload_as_unavailable::<tonic::body::Body>)
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                cfg.global_concurrency_limit,
            ));
        let router = builder
            .layer(ServerTraceLayer)
            .layer(global_limit)
            .add_routes(self.routes.routes());

        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let drained = stop.clone();
        let serve = router.serve_with_incoming_shutdown(incoming, drained.cancelled_owned());
        let drain_timeout = cfg.drain_timeout;
        tokio::select! {
            result = serve => result?,
            () = async { stop.cancelled().await; tokio::time::sleep(drain_timeout).await } => {
                tracing::warn!(timeout_ms = drain_timeout.as_millis() as u64, "drain timed out, closing remaining calls");
            }
        }
        Ok(())
    }
}

/// Answers a call shed by the process-wide concurrency limit with UNAVAILABLE. Left alone, the
/// `Overloaded` error reaches tonic, which answers RESOURCE_EXHAUSTED ("too many active requests
/// for the connection"): right for its own per-connection limit, where one caller uses more than
/// its share, but wrong for overload of the whole process, which clients should back off from
/// and retry, possibly on another replica.
fn overload_as_unavailable<B: Default>(
    result: Result<http::Response<B>, tower::BoxError>,
) -> Result<http::Response<B>, tower::BoxError> {
    match result {
        Err(error) if error.is::<tower::load_shed::error::Overloaded>() => {
            Ok(tonic::Status::unavailable("server overloaded, retry later").into_http())
        }
        other => other,
    }
}
