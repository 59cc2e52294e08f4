//! The `tandem-knowledge` binary: runs the knowledge service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem_platform::runtime::binary_main::<tandem_knowledge::Knowledge>().await
}
