//! The gRPC server every service runs on: health, reflection, limits, tracing and a graceful
//! shutdown that reports NOT_SERVING before it drains.
//!
//! ```text
//! let mut server = GrpcServer::new(&cfg.grpc);
//! server.add_service(InterceptedService::new(limited!(RoutingServiceServer::new(svc), &cfg.grpc), auth));
//! server.serve(listener, shutdown).await?;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

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
    /// Cancelled when the server starts draining (after the not-serving delay).
    drain: CancellationToken,
}

impl GrpcServer {
    /// Starts a server description with health reporting; services are added next.
    pub fn new(cfg: &GrpcConfig) -> Self {
        let health = HealthReporter::new();
        let drain = CancellationToken::new();
        let mut routes = RoutesBuilder::default();
        routes.add_service(HealthServer::new(DrainingHealth {
            inner: HealthService::from_health_reporter(health.clone()),
            drain: drain.clone(),
        }));
        Self {
            cfg: cfg.clone(),
            routes,
            names: Vec::new(),
            health,
            drain,
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

        let stop = self.drain.clone();
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
            .concurrency_limit_per_connection(cfg.concurrency_limit_per_connection)
            .load_shed(true)
            .max_concurrent_streams(Some(cfg.max_concurrent_streams))
            .http2_keepalive_interval(Some(cfg.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true);
        if !cfg.max_connection_age.is_zero() {
            builder = builder.max_connection_age(cfg.max_connection_age);
        }
        let router = builder
            .layer(ServerTraceLayer)
            .layer(CallLimitsLayer::new(
                cfg.global_concurrency_limit,
                cfg.request_timeout,
            ))
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

/// The standard health service, except that its `Watch` streams end when the server starts
/// draining. A watcher (a load balancer, a client's health checking) sees NOT_SERVING at the
/// shutdown signal, then the stream ends with UNAVAILABLE; without this, an open `Watch` would
/// hold the drain until its timeout.
struct DrainingHealth {
    inner: HealthService,
    drain: CancellationToken,
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = UntilDrained;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(UntilDrained {
            statuses,
            drain: Drain::Awaited(Box::pin(self.drain.clone().cancelled_owned())),
        }))
    }
}

/// A health `Watch` stream that yields the statuses until the server drains, then UNAVAILABLE.
struct UntilDrained {
    statuses: tonic_health::server::WatchStream,
    drain: Drain,
}

enum Drain {
    /// Serving; the future completes when the drain begins.
    Awaited(Pin<Box<WaitForCancellationFutureOwned>>),
    /// Draining; UNAVAILABLE goes out once the statuses already changed have.
    Begun,
    /// UNAVAILABLE went out.
    Reported,
}

impl Stream for UntilDrained {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Drain::Awaited(drain) = &mut self.drain
            && drain.as_mut().poll(cx).is_ready()
        {
            self.drain = Drain::Begun;
        }
        if matches!(self.drain, Drain::Reported) {
            return Poll::Ready(None);
        }
        // The NOT_SERVING of the shutdown goes out before the stream ends.
        match Pin::new(&mut self.statuses).poll_next(cx) {
            Poll::Ready(item) => Poll::Ready(item),
            Poll::Pending if matches!(self.drain, Drain::Begun) => {
                self.drain = Drain::Reported;
                Poll::Ready(Some(Err(Status::unavailable(
                    "the server is shutting down",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The limits every call meets inside the server, after tracing (which then counts the codes
/// they answer with):
///
/// - **Process-wide concurrency.** A call beyond `global_concurrency_limit` calls in progress is
///   answered UNAVAILABLE at once ("server overloaded, retry later"), never queued: overload of
///   the whole process is something clients should back off from and retry, possibly on another
///   replica. (tonic's own per-connection limit answers RESOURCE_EXHAUSTED: there one caller
///   uses more than its share.) Health checks are never shed, so that an orchestrator does not
///   restart a replica because it is busy.
/// - **Deadline.** A call still running after `request_timeout`, or after the caller's
///   `grpc-timeout` if that is shorter, is dropped and answered DEADLINE_EXCEEDED: its work may
///   or may not have been done, which CANCELLED would not say.
#[derive(Clone, Debug)]
struct CallLimitsLayer {
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl CallLimitsLayer {
    fn new(concurrency: usize, timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.min(Semaphore::MAX_PERMITS))),
            timeout,
        }
    }
}

impl<S> tower::Layer<S> for CallLimitsLayer {
    type Service = CallLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimits {
            inner,
            permits: self.permits.clone(),
            timeout: self.timeout,
        }
    }
}

/// The service made by [`CallLimitsLayer`].
#[derive(Clone, Debug)]
struct CallLimits<S> {
    inner: S,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for CallLimits<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let permit = if request.uri().path().starts_with("/grpc.health.") {
            None
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return Box::pin(std::future::ready(Ok(Status::unavailable(
                        "server overloaded, retry later",
                    )
                    .into_http())));
                }
            }
        };
        let limit = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()))
            .map_or(self.timeout, |asked| asked.min(self.timeout));
        let call = self.inner.call(request);
        Box::pin(async move {
            let _permit = permit;
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "the call did not finish within its deadline ({} ms)",
                    limit.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

/// Reads a `grpc-timeout` header value: at most eight digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`). Anything else is ignored, as if the caller had set no deadline.
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(
            parse_grpc_timeout(b"200m"),
            Some(Duration::from_millis(200))
        );
        assert_eq!(parse_grpc_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"12x",
            b"-1S",
            b"1.5S",
            b"S1",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
