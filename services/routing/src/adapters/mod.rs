//! Adapters: the gRPC service and the desk session ([`grpc`], [`session`]), conversions between
//! the wire and the domain ([`convert`]) and the bus consumers ([`consumers`]).

pub mod consumers;
pub mod convert;
pub mod grpc;
pub mod session;
