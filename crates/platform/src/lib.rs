//! The platform kit: mechanisms every Tandem service shares, never business rules.
//!
//! - [`config`]: layered, typed configuration that reports every problem at once.
//! - [`telemetry`], [`metrics`], [`propagation`]: logs, traces (W3C context over gRPC and the
//!   bus), Prometheus metrics.
//! - [`grpc`]: the server kit (health, reflection, limits, graceful shutdown).
//! - [`auth`]: JWT verification, roles and the caller's tenant.
//! - [`error`]: the closed error-code set and its one mapping to `tonic::Status`.
//! - [`bus`]: the event bus port with its NATS JetStream and in-process adapters.
//! - [`db`], [`outbox`], [`inbox`]: storage pools, the transactional outbox and relay, the
//!   consumer inbox.
//! - [`runtime`]: wiring a service process, alone or in the standalone mode.
//! - [`shutdown`]: signal handling.

pub mod auth;
pub mod bus;
pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod inbox;
pub mod metrics;
pub mod outbox;
pub mod paging;
pub mod propagation;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
