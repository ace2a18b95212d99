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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    kvtier_server::cli::run(&Cli::parse().serve)
}
