//! `kvtier-server`: the same server as `kvtier serve`, as a standalone binary.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "kvtier-server", version, about = "kvtier cache server")]
struct Cli {
    #[command(flatten)]
    serve: kvtier_server::cli::ServeArgs,
}

fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("KVTIER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: never ANSI codes in log files.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .init();
    kvtier_server::cli::run(&Cli::parse().serve)
}
