//! The `tandem-dialog` binary: runs the dialog service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem_platform::runtime::binary_main::<tandem_dialog::Dialog>().await
}
