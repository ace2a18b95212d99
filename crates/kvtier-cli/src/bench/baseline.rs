//! The memcpy baseline every engine number is compared with, measured in the same run.

use std::time::Instant;

use super::buffers::{AlignedBuf, SourceRing, GIB};
use super::report::{gbps, median, BaselineSection};

/// Timed passes; the median is reported so one disturbed pass does not skew it.
const PASSES: usize = 7;

/// Measures single-thread `copy_from_slice` of exactly one chunk, cold.
///
/// "Cold" matters: the engine copies gigabytes, so its copies stream through memory. The
/// source rotates over the ring (≥ 64 MiB, larger than any LLC) and the destination over
/// ≥ 1 GiB of pre-touched page-aligned memory, so neither side is cache- or fault-assisted.
pub fn measure(ring: &SourceRing, chunk_bytes: usize) -> BaselineSection {
    let slots = GIB.div_ceil(chunk_bytes.max(1)).max(2);
    let mut dst = AlignedBuf::new(slots * chunk_bytes);
    let mut pass_gbps = Vec::with_capacity(PASSES);
    let mut src_slot = 0usize;
    for _ in 0..PASSES {
        let t0 = Instant::now();
        for d in dst.chunks_exact_mut(chunk_bytes.max(1)) {
            d.copy_from_slice(ring.slot(src_slot));
            src_slot += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        pass_gbps.push(gbps(dst.len() as u64, secs));
        // Keep the destination observable so the copies cannot be optimised away.
        std::hint::black_box(&dst[..]);
    }
    BaselineSection {
        memcpy_gbps: median(&pass_gbps),
        memcpy_copy_bytes: chunk_bytes,
        memcpy_dst_span_bytes: dst.len(),
        memcpy_pass_gbps: pass_gbps,
    }
}
