#!/usr/bin/env python3
"""Reference implementation of the kvtier key encoding, version 1 (docs/key-spec.md).

Written from the spec alone, independently of the Rust code, so that the golden vectors in
docs/key-vectors.json are checked by two implementations.

    python3 tools/keyspec_ref.py --check   # recompute every vector, compare with the file
    python3 tools/keyspec_ref.py --write   # regenerate the file (only when the spec changes)

Needs the `blake3` package (pip install blake3).
"""
import argparse
import json
import pathlib
import struct
import sys

import blake3

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "key-vectors.json"


def u32(v):
    return struct.pack("<I", v)


def string(s):
    b = s.encode("utf-8")
    return u32(len(b)) + b


def namespace(ident, salt):
    h = blake3.blake3()
    h.update(b"kvtier-key-v1")
    h.update(string(ident["model_name"]))
    h.update(string(ident.get("model_revision") or ""))
    # A layout replicated over the tensor-parallel ranks (MLA) hashes 0xFFFFFFFF as its rank.
    rank = 0xFFFFFFFF if ident.get("replicated") else ident["rank"]
    for v in (ident["world_size"], rank, ident["pp_size"], ident["pp_rank"]):
        h.update(u32(v))
    layout = ident["layout"]
    h.update(string(layout["tag"]))
    h.update(u32(len(layout["groups"])))
    for g in layout["groups"]:
        for f in ("num_layers", "num_kv_heads", "head_dim", "planes"):
            h.update(u32(g[f]))
        h.update(string(g["dtype"]))
    if salt:
        h.update(b"\x01" + string(salt))
    else:
        h.update(b"\x00")
    return h.digest()


def chunk_keys(ident, chunk_size, save_unfull, salt, tokens):
    n = len(tokens) // chunk_size
    if save_unfull and len(tokens) % chunk_size:
        n += 1
    prev = namespace(ident, salt)
    keys = []
    for i in range(n):
        chunk = tokens[i * chunk_size:(i + 1) * chunk_size]
        digest = blake3.blake3(b"".join(u32(t) for t in chunk)).digest()
        prev = blake3.blake3(prev + u32(len(chunk)) + digest).digest()
        keys.append(prev.hex())
    return keys


def tokens_of(case):
    t = case["tokens"]
    if isinstance(t, dict):  # {"range": [start, stop]}
        return list(range(*t["range"]))
    return t


def ident(model, layout, world_size=1, rank=0, revision=None, pp=(1, 0), replicated=False):
    extra = {"replicated": True} if replicated else {}
    return {
        "model_name": model,
        "model_revision": revision,
        "world_size": world_size,
        "rank": rank,
        "pp_size": pp[0],
        "pp_rank": pp[1],
        "layout": layout,
        **extra,
    }


def simple_layout(layers, heads, dim, dtype, planes=2):
    return {"tag": "layer-major", "groups": [
        {"num_layers": layers, "num_kv_heads": heads, "head_dim": dim, "dtype": dtype, "planes": planes}]}


def cases():
    tiny = simple_layout(2, 2, 4, "f16")
    llama = simple_layout(32, 8, 128, "bf16")
    hybrid = {"tag": "layer-major", "groups": [
        {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64, "dtype": "bf16", "planes": 2},
        {"num_layers": 2, "num_kv_heads": 1, "head_dim": 576, "dtype": "f8e4m3", "planes": 1}]}
    mla = simple_layout(4, 1, 576, "bf16", planes=1)
    ten = list(range(1, 11))
    return [
        dict(name="tiny, two full chunks, tail dropped", identity=ident("kvtier/golden", tiny),
             chunk_size=4, save_unfull_chunk=False, cache_salt=None, tokens=ten),
        dict(name="tiny, prefix of the above gives the same keys", identity=ident("kvtier/golden", tiny),
             chunk_size=4, save_unfull_chunk=False, cache_salt=None, tokens=ten[:8]),
        dict(name="tiny, tail kept (save_unfull_chunk)", identity=ident("kvtier/golden", tiny),
             chunk_size=4, save_unfull_chunk=True, cache_salt=None, tokens=ten),
        dict(name="tiny, tenant salt", identity=ident("kvtier/golden", tiny),
             chunk_size=4, save_unfull_chunk=False, cache_salt="tenant-a", tokens=ten),
        dict(name="tiny, rank 1 of 2", identity=ident("kvtier/golden", tiny, world_size=2, rank=1),
             chunk_size=4, save_unfull_chunk=False, cache_salt=None, tokens=ten),
        dict(name="tiny, model revision", identity=ident("kvtier/golden", tiny, revision="r1"),
             chunk_size=4, save_unfull_chunk=False, cache_salt=None, tokens=ten),
        dict(name="tiny, pipeline stage 1 of 2", identity=ident("kvtier/golden", tiny, pp=(2, 1)),
             chunk_size=4, save_unfull_chunk=False, cache_salt=None, tokens=ten),
        dict(name="extreme token ids", identity=ident("kvtier/golden", tiny),
             chunk_size=2, save_unfull_chunk=True, cache_salt=None, tokens=[4294967295, 0, 65536, 123456789, 7]),
        dict(name="empty prompt", identity=ident("kvtier/golden", tiny),
             chunk_size=4, save_unfull_chunk=True, cache_salt=None, tokens=[]),
        dict(name="llama3-8b shape, 600 tokens, chunk 256", identity=ident("meta-llama/Llama-3.1-8B", llama),
             chunk_size=256, save_unfull_chunk=False, cache_salt=None, tokens={"range": [0, 600]}),
        dict(name="hybrid layout with an MLA-style group, unicode salt", identity=ident("org/hybrid-model", hybrid),
             chunk_size=16, save_unfull_chunk=False, cache_salt="tenant-\u00e9", tokens={"range": [100, 148]}),
        dict(name="MLA latent replicated over 2 ranks, rank 0", identity=ident("deepseek/mla", mla, world_size=2,
             rank=0, replicated=True), chunk_size=16, save_unfull_chunk=False, cache_salt=None,
             tokens={"range": [0, 40]}),
        dict(name="MLA latent replicated over 2 ranks, rank 1 (same keys)", identity=ident("deepseek/mla", mla,
             world_size=2, rank=1, replicated=True), chunk_size=16, save_unfull_chunk=False, cache_salt=None,
             tokens={"range": [0, 40]}),
    ]


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true")
    g.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.write:
        out = []
        for c in cases():
            c = dict(c)
            c["keys"] = chunk_keys(c["identity"], c["chunk_size"], c["save_unfull_chunk"], c["cache_salt"], tokens_of(c))
            out.append(c)
        VECTORS.write_text(json.dumps({"key_spec_version": 1, "vectors": out}, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {len(out)} vectors to {VECTORS}")
        return 0
    data = json.loads(VECTORS.read_text())
    bad = 0
    for c in data["vectors"]:
        got = chunk_keys(c["identity"], c["chunk_size"], c["save_unfull_chunk"], c["cache_salt"], tokens_of(c))
        if got != c["keys"]:
            bad += 1
            print(f"MISMATCH: {c['name']}\n  file: {c['keys']}\n  here: {got}", file=sys.stderr)
    print(f"{len(data['vectors']) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
