//! The `tandem-feedback` binary: runs the feedback service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem_platform::runtime::binary_main::<tandem_feedback::Feedback>().await
}
