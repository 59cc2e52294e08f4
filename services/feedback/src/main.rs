//! The `tandem-feedback` binary: runs the feedback service against PostgreSQL and NATS.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let env = std::env::vars().collect();
    let result = match tandem_platform::runtime::Args::parse(std::env::args()) {
        Ok(args) => tandem_platform::runtime::main::<tandem_feedback::Feedback>(args, env).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-feedback: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
