//! Logs, traces and metrics, set up once per process.
//!
//! - Logs: `tracing` with a pretty or JSON formatter; `RUST_LOG` overrides the configured filter.
//! - Traces: optional OTLP/gRPC export; W3C trace context crosses gRPC metadata and bus headers
//!   through [`crate::propagation`].
//! - Metrics: the `metrics` facade with a Prometheus `/metrics` listener when configured.

use std::collections::HashMap;
use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A bad log filter.
    #[error("invalid log filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built.
    #[error("cannot set up trace export: {0}")]
    Otlp(String),
    /// The Prometheus listener could not start.
    #[error("cannot start the metrics listener: {0}")]
    Metrics(String),
    /// A global subscriber exists already.
    #[error("telemetry is initialised already")]
    AlreadyInitialised,
}

/// Keeps exporters alive; call [`TelemetryGuard::shutdown`] before exit to flush spans.
#[must_use = "dropping the guard loses buffered spans"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops the trace exporter. Blocking work runs off the async runtime.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = provider.force_flush();
                let _ = provider.shutdown();
            })
            .await;
        }
    }
}

/// Initialises logging, tracing and metrics for `service`.
///
/// `env` is consulted for `RUST_LOG` only. Must be called from within a tokio runtime when OTLP
/// export or the metrics listener is configured.
pub fn init(
    service: &str,
    cfg: &TelemetryConfig,
    env: &HashMap<String, String>,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter_text = env
        .get("RUST_LOG")
        .cloned()
        .unwrap_or_else(|| cfg.log_filter.clone());
    let filter =
        EnvFilter::try_new(&filter_text).map_err(|e| TelemetryError::Filter(e.to_string()))?;

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    let provider = if cfg.otlp_endpoint.is_empty() {
        // A local provider still creates valid span contexts, so trace ids propagate across
        // services even when nothing is exported.
        SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .build()
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.otlp_endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.trace_sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(format!("tandem-{service}"))
                    .build(),
            )
            .build()
    };
    let otel_layer =
        tracing_opentelemetry::layer().with_tracer(provider.tracer(format!("tandem-{service}")));

    let fmt_layer = match cfg.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(true)
            .compact()
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    opentelemetry::global::set_tracer_provider(provider.clone());

    if !cfg.metrics_addr.is_empty() {
        let addr: SocketAddr = cfg
            .metrics_addr
            .parse()
            .map_err(|e: std::net::AddrParseError| TelemetryError::Metrics(e.to_string()))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets(crate::metrics::LATENCY_BUCKETS_SECONDS)
            .map_err(|e| TelemetryError::Metrics(e.to_string()))?
            .install()
            .map_err(|e| TelemetryError::Metrics(e.to_string()))?;
        crate::metrics::describe();
    }
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}
