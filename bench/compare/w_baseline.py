"""Hardware baselines measured in the same run as the comparison (own process).

- memcpy: glibc memcpy (through ctypes), one thread, chunk-sized copies rotating through
  source and destination pools larger than L3 (a real KV copy comes from cold memory).
- disk, on the directory the disk workloads use, one file per chunk as LMCache's
  LocalDiskBackend and kvtier's disk tier lay them out (fio-like, psync, 1 job):
  * write + fsync per file (buffered write, then fsync): the floor of a durable put;
  * O_DIRECT sequential write;
  * O_DIRECT sequential read of those files.
"""
import argparse
import ctypes
import os
import shutil

from common import SHAPES, GIB, aligned_buffer, emit, gbps, now, stats

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.memcpy.restype = ctypes.c_void_p
libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def addr(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def memcpy_bench(chunk, pool_bytes, reps):
    n = max(1, pool_bytes // chunk)
    src = aligned_buffer(n * chunk)
    dst = aligned_buffer(n * chunk)
    s0, d0 = addr(src), addr(dst)
    out = []
    for r in range(reps + 1):  # first pass is a warm-up
        t = now()
        for i in range(n):
            libc.memcpy(d0 + i * chunk, s0 + i * chunk, chunk)
        dt = now() - t
        if r:
            out.append(gbps(n * chunk, dt))
    return out


def disk_bench(dirpath, chunk, n, reps):
    buf = aligned_buffer(chunk)
    res = {"write_fsync": [], "odirect_write": [], "odirect_read": []}
    for _ in range(reps):
        base = os.path.join(dirpath, "baseline")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        os.sync()
        t = now()
        for i in range(n):
            fd = os.open(os.path.join(base, f"f.{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, buf)
            os.fsync(fd)
            os.close(fd)
        res["write_fsync"].append(gbps(n * chunk, now() - t))
        t = now()
        for i in range(n):
            fd = os.open(os.path.join(base, f"d.{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            os.write(fd, buf)
            os.close(fd)
        res["odirect_write"].append(gbps(n * chunk, now() - t))
        t = now()
        for i in range(n):
            fd = os.open(os.path.join(base, f"d.{i}"), os.O_RDONLY | os.O_DIRECT)
            got = os.preadv(fd, [buf], 0)
            os.close(fd)
            assert got == chunk, f"short O_DIRECT read: {got}"
        res["odirect_read"].append(gbps(n * chunk, now() - t))
        shutil.rmtree(base, ignore_errors=True)
        os.sync()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=SHAPES)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memcpy-pool-gib", type=float, default=0.5)
    ap.add_argument("--disk-dir", required=True)
    ap.add_argument("--disk-chunks", type=int, required=True)
    a = ap.parse_args()
    chunk = SHAPES[a.shape]["bytes"]
    m = memcpy_bench(chunk, int(a.memcpy_pool_gib * GIB), max(3, a.reps))
    # --disk-chunks 0: no disk baselines (shapes only the L1 row uses).
    d = (disk_bench(a.disk_dir, chunk, a.disk_chunks, a.reps) if a.disk_chunks
         else {"write_fsync": [], "odirect_write": [], "odirect_read": []})
    emit({
        "shape": a.shape,
        "threads": 1,
        "memcpy_gbps": stats(m),
        "write_fsync_gbps": stats(d["write_fsync"]),
        "odirect_write_gbps": stats(d["odirect_write"]),
        "odirect_read_gbps": stats(d["odirect_read"]),
        "disk_chunks": a.disk_chunks,
        "memcpy_pool_bytes": int(a.memcpy_pool_gib * GIB),
    })


if __name__ == "__main__":
    main()
