//! Adapters: storage, the event consumers and the gRPC service.

pub mod bus;
pub mod grpc;
pub mod sql;
