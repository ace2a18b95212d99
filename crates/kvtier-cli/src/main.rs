//! The `kvtier` command over the kvtier engine: benchmarks (`bench`), the cache server
//! (`serve`) and the disk-tier inspector (`inspect`).

mod bench;
mod inspect;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(name = "kvtier", version, about = "Tiered KV-cache engine tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a synthetic workload against an embedded engine and compare it with memcpy.
    Bench(bench::BenchArgs),
    /// List what a disk tier directory holds (chunks, bytes, models, tenants) and verify it.
    Inspect(inspect::InspectArgs),
    /// Run the cache server: one engine per node shared by many engine processes over a
    /// Unix socket (shared-memory transfers) and optionally TCP, with admin HTTP.
    Serve(kvtier_server::cli::ServeArgs),
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => kvtier_server::cli::run(&args),
        Command::Inspect(args) => inspect::run(&args),
    }
}

/// Logs go to stderr so that `--json` output on stdout stays machine-readable.
/// `KVTIER_LOG` (an `EnvFilter` directive, e.g. `debug` or `kvtier=trace`) sets the level.
fn init_tracing() {
    let filter = EnvFilter::try_from_env("KVTIER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
