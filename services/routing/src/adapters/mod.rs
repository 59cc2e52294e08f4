//! Adapters: the gRPC service and the desk session ([`grpc`], [`session`]), conversions between
//! the wire and the domain ([`convert`]), the bus consumers ([`consumers`]) and the wake-ups of
//! desk sessions by offers other replicas made ([`wakeups`]).

pub mod consumers;
pub mod convert;
pub mod grpc;
pub mod session;
pub mod wakeups;
