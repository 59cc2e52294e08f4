//! The `tandem-routing` binary: runs the routing service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem_platform::runtime::binary_main::<tandem_routing::Routing>().await
}
