//! The `kvtier` command over the kvtier engine: benchmarks (`bench`), the cache server
//! (`serve`) and the disk-tier inspector (`inspect`).

mod bench;
mod inspect;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "kvtier",
    version,
    about = "Tiered KV-cache engine tools",
    after_help = env_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a synthetic workload against an embedded engine and compare it with memcpy.
    ///
    /// The default run (llama3-8b shapes, 4 GiB L1, 1 GiB documents) holds about 6.5 GB of
    /// RAM and takes a minute or two; `--model tiny` is a quick check (64 MiB L1, seconds).
    /// The table ends with a legend of its figures.
    #[command(after_help = env_help())]
    Bench(bench::BenchArgs),
    /// List what a disk tier directory holds (chunks, bytes, models, tenants) and verify it.
    Inspect(inspect::InspectArgs),
    /// Run the cache server: one engine per node shared by many engine processes over a
    /// Unix socket (shared-memory transfers) and optionally TCP, with admin HTTP.
    #[command(after_help = env_help())]
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

/// The environment variables section of `--help`, from the engine's own list.
fn env_help() -> String {
    let mut s = String::from("Environment variables:\n");
    let mut line = |name: &str, about: &str| s.push_str(&format!("  {name:<24} {about}\n"));
    line(
        "KVTIER_<KEY>",
        "any engine config key, e.g. KVTIER_MAX_LOCAL_CPU_SIZE=8 (wins over the config file)",
    );
    for v in kvtier::config::ENV_VARS {
        line(v.name, v.about);
    }
    s.push_str("Other KVTIER_* variables are ignored with a warning naming the closest one.");
    s
}

/// Logs go to stderr so that `--json` output on stdout stays machine-readable; colours only
/// when stderr is a terminal (never in files or pipes) and `NO_COLOR` is unset.
/// `KVTIER_LOG` (an `EnvFilter` directive, e.g. `debug` or `kvtier=trace`) sets the level.
fn init_tracing() {
    let filter = EnvFilter::try_from_env("KVTIER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .init();
}
