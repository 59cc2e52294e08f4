//! `tandem`: one command for running and trying Tandem.
//!
//! - `tandem standalone`: every service in one process on one gRPC port, SQLite under a data
//!   directory and the in-process bus. No other software needed.
//! - `tandem serve <service>`: one service against PostgreSQL and NATS JetStream.
//! - `tandem chat` / `tandem agent`: a customer and an agent desk in the terminal, scriptable
//!   from standard input.
//! - `tandem token`: a development token for a tenant and role.
//! - `tandem nlu`: train and measure the built-in language understanding, analyse a message.

#![allow(clippy::print_stdout)]

mod agent;
mod chat;
mod client;
mod demo;
mod nlu;
mod reference;
mod standalone;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: an AI customer-service bot and human agents working as one team"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs all five services in one process (SQLite, in-process bus).
    Standalone(standalone::Options),
    /// Runs one service against PostgreSQL and NATS JetStream.
    Serve {
        /// dialog, routing, knowledge, feedback or policy.
        service: ServiceName,
        /// A TOML configuration file; `TANDEM_<SERVICE>__SECTION__KEY` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// A customer in the terminal: talk to the bot and, after a handoff, to an agent.
    Chat(chat::Options),
    /// An agent desk in the terminal: offers with the handoff package, replies, suggestions.
    Agent(agent::Options),
    /// Prints a development token signed with the configured development key.
    Token(token::Options),
    /// Trains and measures the built-in language understanding; analyses a message.
    Nlu(nlu::Options),
    /// Prints reference documentation generated from the contracts.
    Reference {
        /// asyncapi, events or grpc.
        kind: reference::Kind,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ServiceName {
    Dialog,
    Routing,
    Knowledge,
    Feedback,
    Policy,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = std::env::vars().collect();
    let result = match cli.command {
        Command::Standalone(options) => standalone::run(options, env).await,
        Command::Serve { service, config } => {
            use tandem_platform::runtime::{Args, main};
            let args = Args { config };
            match service {
                ServiceName::Dialog => main::<tandem_dialog::Dialog>(args, env).await,
                ServiceName::Routing => main::<tandem_routing::Routing>(args, env).await,
                ServiceName::Knowledge => main::<tandem_knowledge::Knowledge>(args, env).await,
                ServiceName::Feedback => main::<tandem_feedback::Feedback>(args, env).await,
                ServiceName::Policy => main::<tandem_policy::Policy>(args, env).await,
            }
        }
        Command::Chat(options) => chat::run(options, env).await,
        Command::Agent(options) => agent::run(options, env).await,
        Command::Token(options) => token::run(options, &env),
        Command::Nlu(options) => nlu::run(options),
        Command::Reference { kind } => reference::render(kind).map(|text| print!("{text}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem: {error:#}");
            ExitCode::FAILURE
        }
    }
}
