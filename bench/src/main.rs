//! `salon-bench`: a load generator that speaks only the Matrix client-server API, so
//! the same run measures Salon, Synapse or any other homeserver.
//!
//! `salon-bench run` measures one server and writes JSON; `salon-bench compare` prints
//! two of those side by side with ratios.

mod client;
mod rawhttp;
mod report;
mod scenarios;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "salon-bench",
    about = "Matrix homeserver load benchmark (client-server API only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one homeserver.
    Run(scenarios::RunArgs),
    /// Print two results side by side: `compare BASELINE.json CANDIDATE.json`.
    Compare {
        baseline: PathBuf,
        candidate: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => scenarios::run(args).await,
        Command::Compare {
            baseline,
            candidate,
        } => report::compare(&baseline, &candidate),
    }
}
