//! Request traces: the Mooncake JSONL format and kvtier's simple text format.
//!
//! **Mooncake** (the traces Moonshot AI published with the Mooncake paper): one JSON object
//! per line, `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [..]}`; `hash_ids` are the prompt's block hashes, in order, one per
//! `--block-tokens` tokens (the last block may be partial: `input_length` says).
//!
//! **Simple** (`kvtier trace v1`): one request per line, `<arrival ms> <block> <block> ...`,
//! optionally ending with `+<n>`, a partial last block of `n` tokens. Blocks are any
//! whitespace-free names; like tokens, a name means a block *after its prefix*: `a b` and
//! `c b` share no block. Every named block is a full block. `#` starts a comment.
//!
//! ```text
//! # system prompt, document, question; then a follow-up turn
//! 0     sys doc1 doc2 q1 +100
//! 45000 sys doc1 doc2 q1 a1 q2 +37
//! ```
//!
//! Either way a block's identity is its whole prefix (as with kvtier's chained chunk keys),
//! so blocks are numbered densely here by (predecessor, name).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;

/// Trace file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TraceFormat {
    /// Mooncake JSONL when the first non-blank character is `{`, else simple.
    Auto,
    /// Mooncake JSONL.
    Mooncake,
    /// kvtier's simple text format.
    Simple,
}

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Arrival time, milliseconds from the start.
    pub at_ms: u64,
    /// The prompt's blocks, in order (dense block numbers).
    pub blocks: Vec<u32>,
    /// Prompt length in tokens (the last block may be partial).
    pub tokens: usize,
}

impl Request {
    /// Leading blocks that are full (cacheable unless `save_unfull_chunk`).
    pub fn full_blocks(&self, block_tokens: usize) -> usize {
        (self.tokens / block_tokens).min(self.blocks.len())
    }
}

/// A parsed trace.
#[derive(Clone, Debug)]
pub struct Trace {
    /// Requests in arrival order.
    pub requests: Vec<Request>,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Distinct blocks.
    pub unique_blocks: usize,
    /// The format it was read in.
    pub format: TraceFormat,
}

impl Trace {
    /// Block references (every block of every request).
    pub fn references(&self) -> u64 {
        self.requests.iter().map(|r| r.blocks.len() as u64).sum()
    }

    /// The hit rate no cache can beat: every reference but the first of each block.
    pub fn ceiling(&self) -> f64 {
        let refs = self.references();
        if refs == 0 {
            return 0.0;
        }
        (refs - self.unique_blocks as u64) as f64 / refs as f64
    }

    /// Reads a trace file.
    pub fn read(path: &Path, format: TraceFormat, block_tokens: usize) -> Result<Trace> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the trace {}", path.display()))?;
        Trace::parse(&text, format, block_tokens)
            .with_context(|| format!("in the trace {}", path.display()))
    }

    /// Parses trace text.
    pub fn parse(text: &str, format: TraceFormat, block_tokens: usize) -> Result<Trace> {
        ensure!(block_tokens > 0, "--block-tokens must be positive");
        let format = match format {
            TraceFormat::Auto if text.trim_start().starts_with('{') => TraceFormat::Mooncake,
            TraceFormat::Auto => TraceFormat::Simple,
            f => f,
        };
        let mut numbering = Numbering::default();
        let mut requests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let r = match format {
                TraceFormat::Mooncake => mooncake_line(line, block_tokens, &mut numbering),
                _ => simple_line(line, block_tokens, &mut numbering),
            }
            .with_context(|| format!("line {}", i + 1))?;
            if let Some(r) = r {
                requests.push(r);
            }
        }
        ensure!(!requests.is_empty(), "the trace holds no request");
        Ok(Trace {
            requests,
            block_tokens,
            unique_blocks: numbering.ids.len(),
            format,
        })
    }
}

/// Dense block numbers by (predecessor, name).
#[derive(Default)]
struct Numbering {
    ids: HashMap<(u32, String), u32>,
}

impl Numbering {
    fn chain<'a>(&mut self, names: impl Iterator<Item = &'a str>) -> Result<Vec<u32>> {
        let mut prev = u32::MAX;
        let mut out = Vec::new();
        for name in names {
            let next = u32::try_from(self.ids.len()).context("more than 2^32 distinct blocks")?;
            let id = *self.ids.entry((prev, name.to_string())).or_insert(next);
            out.push(id);
            prev = id;
        }
        Ok(out)
    }
}

#[derive(serde::Deserialize)]
struct MooncakeLine {
    timestamp: Option<u64>,
    input_length: Option<usize>,
    hash_ids: Vec<u64>,
}

fn mooncake_line(line: &str, bt: usize, ids: &mut Numbering) -> Result<Option<Request>> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let m: MooncakeLine = serde_json::from_str(line)
        .context("not a Mooncake request (a JSON object with `hash_ids`)")?;
    ensure!(!m.hash_ids.is_empty(), "`hash_ids` is empty");
    let n = m.hash_ids.len();
    let tokens = m.input_length.unwrap_or(n * bt);
    ensure!(
        tokens > (n - 1) * bt && tokens <= n * bt,
        "input_length {tokens} does not fit {n} blocks of {bt} tokens (is --block-tokens right?)"
    );
    let names: Vec<String> = m.hash_ids.iter().map(u64::to_string).collect();
    Ok(Some(Request {
        at_ms: m.timestamp.unwrap_or(0),
        blocks: ids.chain(names.iter().map(String::as_str))?,
        tokens,
    }))
}

fn simple_line(line: &str, bt: usize, ids: &mut Numbering) -> Result<Option<Request>> {
    let line = line.split('#').next().unwrap_or_default();
    let mut fields = line.split_whitespace().peekable();
    let Some(at) = fields.next() else {
        return Ok(None);
    };
    let at_ms: u64 = at
        .parse()
        .with_context(|| format!("`{at}` is not an arrival time in whole milliseconds"))?;
    let names: Vec<&str> = fields.collect();
    let mut tail = 0;
    // A partial block is named `+<n>`: blocks after the same prefix with the same length
    // hold the same tokens.
    if let Some(t) = names.last().and_then(|s| s.strip_prefix('+')) {
        tail = t
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0 && n < bt)
            .with_context(|| format!("`+{t}`: a partial block has 1..{bt} tokens"))?;
    }
    if names.is_empty() {
        bail!("a request needs at least one block after its arrival time");
    }
    let full = names.len() - usize::from(tail > 0);
    Ok(Some(Request {
        at_ms,
        blocks: ids.chain(names.into_iter())?,
        tokens: full * bt + tail,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mooncake_lines_number_blocks_by_prefix() {
        let t = Trace::parse(
            "{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [0, 1, 2]}\n\
             \n{\"timestamp\": 7, \"input_length\": 1024, \"hash_ids\": [0, 1]}\n",
            TraceFormat::Auto,
            512,
        )
        .unwrap();
        assert_eq!(t.format, TraceFormat::Mooncake);
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].blocks, vec![0, 1, 2]);
        assert_eq!(t.requests[1].blocks, vec![0, 1]);
        assert_eq!(t.requests[0].full_blocks(512), 2);
        assert_eq!(t.requests[1].full_blocks(512), 2);
        assert_eq!((t.references(), t.unique_blocks), (5, 3));
        assert!((t.ceiling() - 0.4).abs() < 1e-9);
    }

    #[test]
    fn simple_lines_with_names_tails_and_comments() {
        let t = Trace::parse(
            "# a comment\n0 sys doc q +100\n45 sys doc q a q2 # follow-up\n90 other doc\n",
            TraceFormat::Auto,
            512,
        )
        .unwrap();
        assert_eq!(t.format, TraceFormat::Simple);
        let r: Vec<_> = t
            .requests
            .iter()
            .map(|r| (r.at_ms, r.blocks.clone(), r.tokens))
            .collect();
        assert_eq!(r[0], (0, vec![0, 1, 2, 3], 3 * 512 + 100));
        assert_eq!(r[1], (45, vec![0, 1, 2, 4, 5], 5 * 512));
        // `doc` after `other` is another block than `doc` after `sys`.
        assert_eq!(r[2], (90, vec![6, 7], 2 * 512));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let e = |s: &str| format!("{:#}", Trace::parse(s, TraceFormat::Auto, 512).unwrap_err());
        assert!(e("{\"hash_ids\": [1, 2], \"input_length\": 5000}").contains("--block-tokens"));
        assert!(e("{\"hash_ids\": []}").contains("empty"));
        assert!(e("{\"timestamp\": 1}").contains("hash_ids"));
        assert!(e("soon a b").contains("milliseconds"));
        assert!(e("5 a +600").contains("partial block"));
        assert!(e("5").contains("at least one block"));
        assert!(e("# nothing\n\n").contains("no request"));
        assert!(e("0 a\nnope b").contains("line 2"));
    }
}
