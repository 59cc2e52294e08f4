//! The `tandem-dialog` binary: runs the dialog service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let env = std::env::vars().collect();
    let result = match tandem_platform::runtime::Args::parse(std::env::args()) {
        Ok(args) => tandem_platform::runtime::main::<tandem_dialog::Dialog>(args, env).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-dialog: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
