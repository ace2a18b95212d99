//! `kvtier inspect PATH [--verify]`: what a disk tier directory holds, read-only.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

/// Options of `kvtier inspect`.
#[derive(Clone, Debug, Args)]
pub struct InspectArgs {
    /// Disk tier directory (one `local_disk` path).
    pub path: PathBuf,
    /// Read every payload and check its checksum.
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `kvtier inspect`; exits non-zero when `--verify` finds a bad record.
pub fn run(args: &InspectArgs) -> Result<()> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} files")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(if args.verify {
        "verifying"
    } else {
        "reading headers"
    });
    let rep = kvtier::tier::inspect_disk(&args.path, args.verify, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("inspecting {}", args.path.display()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{}: {} chunks, {} payload bytes ({} on disk)",
            rep.root.display(),
            rep.chunks,
            rep.payload_bytes,
            rep.file_bytes
        );
        println!("models:");
        for (m, g) in &rep.models {
            println!(
                "  {m}: {} chunks, {} tokens, {} bytes",
                g.chunks, g.tokens, g.payload_bytes
            );
        }
        println!("tenants (cache_salt):");
        for (s, g) in &rep.salts {
            println!("  {s}: {} chunks, {} tokens", g.chunks, g.tokens);
        }
        if rep.tmp_files > 0 {
            println!(
                "{} temporary files of interrupted writes (removed at the next start)",
                rep.tmp_files
            );
        }
        println!(
            "{}: {} bad records",
            if rep.verified {
                "checksums verified"
            } else {
                "headers checked (add --verify for payloads)"
            },
            rep.bad.len()
        );
        for b in &rep.bad {
            println!("  {}: {}", b.path.display(), b.problem);
        }
    }
    if !rep.bad.is_empty() {
        anyhow::bail!("{} bad records in {}", rep.bad.len(), rep.root.display());
    }
    Ok(())
}
