//! Tandem's wire contracts, shared by every service and client.
//!
//! - [`pb`]: code generated from `proto/` (gRPC services and event payloads), one module per
//!   protobuf package, e.g. `pb::routing::v1::HandoffAssigned`.
//! - [`events`]: the event catalogue. Every event type declares its subject and stream exactly
//!   once; nobody formats a subject anywhere else.
//! - [`ids`]: identifier newtypes shared by services, starting with [`ids::TenantId`].
//! - [`headers`]: the message header names used on the bus.
//!
//! This crate holds contracts only: no I/O and no business rules.

pub mod events;
pub mod headers;
pub mod ids;

/// Generated protobuf and gRPC code, one module per package.
#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
pub mod pb {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("tandem.common.v1");
        }
    }
    pub mod dialog {
        pub mod v1 {
            tonic::include_proto!("tandem.dialog.v1");
        }
    }
    pub mod routing {
        pub mod v1 {
            tonic::include_proto!("tandem.routing.v1");
        }
    }
    pub mod knowledge {
        pub mod v1 {
            tonic::include_proto!("tandem.knowledge.v1");
        }
    }
    pub mod feedback {
        pub mod v1 {
            tonic::include_proto!("tandem.feedback.v1");
        }
    }
    pub mod policy {
        pub mod v1 {
            tonic::include_proto!("tandem.policy.v1");
        }
    }
}

/// The encoded `FileDescriptorSet` of every package, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
