//! The `tandem-policy` binary: runs the policy service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem_platform::runtime::binary_main::<tandem_policy::Policy>().await
}
