//! W3C trace context across process boundaries: gRPC metadata and bus headers.
//!
//! The global propagator is set in [`crate::telemetry::init`]; without it these functions are
//! no-ops, which keeps tests and tools that skip telemetry working.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::propagation::{Extractor, Injector};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes the current span's trace context into bus headers.
pub fn inject_current(headers: &mut BTreeMap<String, String>) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MapInjector(headers))
    });
}

/// Makes `span` a child of the trace context carried in bus headers, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapExtractor(headers)));
    let _ = span.set_parent(parent);
}

/// A tonic client interceptor that sends the current trace context.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
        });
        Ok(request)
    }
}

/// A tower layer for the gRPC server: one span per call, joined to the caller's trace, plus
/// request count and latency metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTraceLayer;

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// The service made by [`ServerTraceLayer`].
#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let is_probe =
            method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.");
        let span = if is_probe {
            tracing::Span::none()
        } else {
            let span =
                tracing::info_span!("grpc.request", otel.kind = "server", rpc.method = %method);
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HttpExtractor(request.headers()))
            });
            let _ = span.set_parent(parent);
            span
        };
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let started = Instant::now();
                let mut result = future.await;
                if let Ok(response) = &mut result {
                    remap_size_limit_status(response.headers_mut());
                    remap_decode_failure_status(response.headers_mut());
                }
                if !is_probe {
                    let code = match &result {
                        Ok(response) => response
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("0")
                            .to_owned(),
                        Err(_) => "transport".to_owned(),
                    };
                    let method = metric_label(method);
                    metrics::counter!(crate::metrics::GRPC_REQUESTS_TOTAL, "method" => method.clone(), "code" => code).increment(1);
                    metrics::histogram!(crate::metrics::GRPC_REQUEST_SECONDS, "method" => method).record(started.elapsed().as_secs_f64());
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Every `/<package>.<Service>/<Method>` path of Tandem's contracts.
static KNOWN_METHODS: std::sync::LazyLock<std::collections::HashSet<String>> =
    std::sync::LazyLock::new(|| {
        let set = <prost_types::FileDescriptorSet as prost::Message>::decode(
            tandem_proto::FILE_DESCRIPTOR_SET,
        )
        .unwrap_or_default();
        let mut known = std::collections::HashSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        known
    });

/// The `method` label of a call's metrics: its path when it is one of the contracts' methods,
/// else `unknown`, so that callers sending made-up paths cannot add series without end.
fn metric_label(path: String) -> String {
    if KNOWN_METHODS.contains(&path) {
        path
    } else {
        "unknown".to_owned()
    }
}

/// tonic reports a message over the size limit as OUT_OF_RANGE; gRPC's own guidance, and our
/// closed error-code set, call that RESOURCE_EXHAUSTED. Tandem's services never return
/// OUT_OF_RANGE themselves, so any such status on a trailers-only response comes from the codec.
fn remap_size_limit_status(headers: &mut http::HeaderMap) {
    const OUT_OF_RANGE: &str = "11";
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) == Some(OUT_OF_RANGE) {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

/// The start of the text tonic-prost gives a request that is not a valid protobuf message
/// (`prost::DecodeError`'s `Display`, which tonic-prost 0.14 wraps in INTERNAL).
const DECODE_FAILURE_TEXT: &str = "failed to decode Protobuf message";

/// tonic answers a request body that does not decode as the method's message with INTERNAL;
/// the client sent bad input, which our closed error-code set calls INVALID_ARGUMENT. Tandem's
/// handlers mask the text of their own internal errors ("internal error"), so an INTERNAL
/// carrying the decode-failure text on a trailers-only response comes from the codec. The text
/// itself is kept: it says which field failed to decode.
fn remap_decode_failure_status(headers: &mut http::HeaderMap) {
    const INTERNAL: &str = "13";
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) == Some(INTERNAL)
        && headers
            .get("grpc-message")
            .is_some_and(|m| percent_decoded_starts_with(m.as_bytes(), DECODE_FAILURE_TEXT))
    {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

/// Tells whether a percent-encoded `grpc-message` value (tonic escapes spaces and a few other
/// bytes) starts with `prefix`.
fn percent_decoded_starts_with(encoded: &[u8], prefix: &str) -> bool {
    let mut encoded = encoded.iter().copied();
    prefix.bytes().all(|expected| {
        let byte = match encoded.next() {
            Some(b'%') => {
                let hex = [encoded.next(), encoded.next()];
                match hex {
                    [Some(high), Some(low)] => std::str::from_utf8(&[high, low])
                        .ok()
                        .and_then(|hex| u8::from_str_radix(hex, 16).ok()),
                    _ => None,
                }
            }
            other => other,
        };
        byte == Some(expected)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_label_only_the_contracts_methods() {
        let known = "/tandem.policy.v1.PolicyService/Decide".to_owned();
        assert_eq!(metric_label(known.clone()), known);
        assert_eq!(
            metric_label("/tandem.policy.v1.PolicyService/Nope".into()),
            "unknown"
        );
        assert_eq!(metric_label("/x.Y/z-1234".into()), "unknown");
    }

    #[test]
    fn decode_failure_text_matches_encoded_and_plain_messages() {
        let text = DECODE_FAILURE_TEXT;
        assert!(percent_decoded_starts_with(
            b"failed%20to%20decode%20Protobuf%20message:%20invalid%20wire%20type",
            text
        ));
        assert!(percent_decoded_starts_with(
            b"failed to decode Protobuf message: buffer underflow",
            text
        ));
        assert!(!percent_decoded_starts_with(b"internal%20error", text));
        assert!(!percent_decoded_starts_with(b"failed%20to%2", text));
        assert!(!percent_decoded_starts_with(b"failed%zzto", text));
    }

    #[test]
    fn only_internal_decode_failures_become_invalid_argument() {
        let headers = |status: &'static str, message: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-status", http::HeaderValue::from_static(status));
            headers.insert("grpc-message", http::HeaderValue::from_static(message));
            remap_decode_failure_status(&mut headers);
            headers["grpc-status"].to_str().unwrap().to_owned()
        };
        let decode_failure = "failed%20to%20decode%20Protobuf%20message:%20invalid%20varint";
        assert_eq!(headers("13", decode_failure), "3");
        assert_eq!(headers("13", "internal%20error"), "13");
        assert_eq!(headers("2", decode_failure), "2");
    }

    #[test]
    fn bus_headers_carry_the_trace_across() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;

        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = BTreeMap::new();
            let producer = tracing::info_span!("produce");
            let trace_id = {
                let _g = producer.enter();
                inject_current(&mut headers);
                use opentelemetry::trace::TraceContextExt as _;
                producer.context().span().span_context().trace_id()
            };
            let traceparent = headers.get("traceparent").expect("traceparent injected");
            assert!(traceparent.contains(&trace_id.to_string()), "{traceparent}");

            let consumer = tracing::info_span!("consume");
            set_parent_from(&consumer, &headers);
            use opentelemetry::trace::TraceContextExt as _;
            assert_eq!(
                consumer.context().span().span_context().trace_id(),
                trace_id
            );
        });
    }
}
