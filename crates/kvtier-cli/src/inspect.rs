//! `kvtier inspect PATH [--verify]`: what a disk tier directory holds, read-only.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvtier::tier::InspectReport;

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
    // A reader that goes away (`kvtier inspect DIR | head -1`) ends the output quietly;
    // the exit status still reports bad records.
    match print_report(&rep, args.json, &mut std::io::stdout().lock()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("writing the report to stdout")?,
    }
    if !rep.bad.is_empty() {
        anyhow::bail!("{} bad records in {}", rep.bad.len(), rep.root.display());
    }
    Ok(())
}

/// Writes the report: one JSON object, or the table.
fn print_report(rep: &InspectReport, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, rep)?;
        writeln!(out)?;
        return out.flush();
    }
    writeln!(
        out,
        "{}: {} chunks, {} payload bytes ({} on disk)",
        rep.root.display(),
        rep.chunks,
        rep.payload_bytes,
        rep.file_bytes
    )?;
    writeln!(out, "models:")?;
    for (m, g) in &rep.models {
        writeln!(
            out,
            "  {m}: {} chunks, {} tokens, {} bytes",
            g.chunks, g.tokens, g.payload_bytes
        )?;
    }
    writeln!(out, "tenants (cache_salt):")?;
    for (s, g) in &rep.salts {
        writeln!(out, "  {s}: {} chunks, {} tokens", g.chunks, g.tokens)?;
    }
    if !rep.marker {
        writeln!(
            out,
            "no marker file `{}` (a directory of an older kvtier; the next start adds it)",
            kvtier::tier::DISK_MARKER
        )?;
    }
    if rep.tmp_files > 0 {
        writeln!(
            out,
            "{} temporary files of interrupted writes (removed at the next start)",
            rep.tmp_files
        )?;
    }
    if rep.other_files > 0 {
        writeln!(
            out,
            "{} entries that are not chunk records (kvtier removes only its own)",
            rep.other_files
        )?;
    }
    writeln!(
        out,
        "{}: {} bad records",
        if rep.verified {
            "checksums verified"
        } else {
            "headers checked (add --verify for payloads)"
        },
        rep.bad.len()
    )?;
    for b in &rep.bad {
        writeln!(out, "  {}: {}", b.path.display(), b.problem)?;
    }
    out.flush()
}
