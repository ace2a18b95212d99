#!/usr/bin/env python3
"""Checks the layer order of the core crate (crates/kvtier/src).

Every top-level module of the crate has a place in LAYERS below (lowest first; the same
order lib.rs documents). A module may use only modules listed before it. The check reads the
`crate::` paths of every source file (`use crate::...` trees, `crate::a::b` in code and
`crate::Name` through lib.rs's re-exports), maps each file to its top-level module and fails
on:

* an upward import: a module using one listed after it;
* a cycle between top-level modules (reported separately, since it is what makes an order
  impossible in the first place);
* a top-level module missing from LAYERS, so a new module has to be placed on purpose.

Comments (doc links included: they may point anywhere) and string literals are ignored;
`#[cfg(test)]` code is checked like any other code. lib.rs itself is the crate root and
may name every module.

    python3 tools/check_layers.py            # check; exit status 1 on any violation
    python3 tools/check_layers.py --graph    # also print the module graph

Needs only the Python standard library.
"""
import argparse
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "crates" / "kvtier" / "src"

# Lowest first. Keep in step with the crate doc in lib.rs.
LAYERS = [
    # Leaves: used by everything, using nothing of the crate but `error`.
    ("error", "the error type"),
    ("metrics", "Prometheus metrics (plain numbers in, no tier types)"),
    ("layout", "KV layout of a model: dtype, layer groups, bytes per token"),
    # Data flow, bottom up.
    ("keys", "token chunks to chained chunk keys"),
    ("api", "the KvCache trait and the values it returns (shared by engine and client)"),
    ("memory", "the pool and its buffers; where tiers get buffers (BufferSource)"),
    ("chunk", "chunk metadata, checksums, record encoding (a chunk holds a pool buffer)"),
    ("policy", "eviction order"),
    ("transport", "network links, RESP and the kvtier wire protocol"),
    ("tier", "the Tier trait and the storage levels"),
    ("manager", "the ordered tier list"),
    ("config", "the engine's settings (names option types of the parts below)"),
    ("engine", "assembly from config, and the API over tokens and KV bytes"),
]

RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

USE_RE = re.compile(r"\b(?:pub(?:\([^)]*\))?\s+)?use\s+crate::([^;]*);", re.S)
PATH_RE = re.compile(r"\bcrate::([A-Za-z_][A-Za-z0-9_]*)")
ROOT_USE_RE = re.compile(r"\bpub\s+use\s+([A-Za-z_][A-Za-z0-9_]*)::([^;]*);", re.S)


def strip_comments_and_strings(text):
    """Blanks comments, string and char literals, keeping line numbers."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (
            i and (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append("\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append("\n" * text.count("\n", i, j + 1))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'", text[i:]):
            m = re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'", text[i:])
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def split_top(tree):
    """Splits the items of a `{a, b::{c, d}}` use group at its top level."""
    items, depth, cur = [], 0, []
    for ch in tree:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [s.strip() for s in items if s.strip()]


def first_segments(tree):
    """Top-level names a `use crate::<tree>` reaches: `a::b` -> a, `{a::x, b}` -> a, b."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", tree))
    if tree.startswith("{") and tree.endswith("}"):
        out = []
        for item in split_top(tree[1:-1]):
            out.extend(first_segments(item))
        return out
    return [tree.split("::")[0]]


def root_exports(lib_text):
    """Names lib.rs re-exports at the crate root, mapped to the module they come from."""
    names = {}
    for m in ROOT_USE_RE.finditer(strip_comments_and_strings(lib_text)):
        # `a as b` -> `a::b`: the name exported is the last segment either way.
        tree = re.sub(r"\s+as\s+", "::", m.group(2))
        module, tree = m.group(1), re.sub(r"\s+", "", tree)
        if tree.startswith("{"):
            leaves = split_top(tree[1:-1])
        else:
            leaves = [tree]
        for leaf in leaves:
            name = leaf.split("::")[-1]
            names[name] = module
    return names


def module_of(path):
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path, exports):
    """(target module, line) for every crate path in the file."""
    text = strip_comments_and_strings(path.read_text())
    found = []

    def add(name, pos):
        target = exports.get(name, name)
        found.append((target, text.count("\n", 0, pos) + 1))

    spans = []
    for m in USE_RE.finditer(text):
        spans.append(m.span())
        for name in first_segments(m.group(1)):
            add(name, m.start())
    for m in PATH_RE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue
        add(m.group(1), m.start())
    return found


def find_cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(graph, comp):
    """The shortest cycle inside one strongly connected component, as a closed path."""
    best = None
    for start in sorted(comp):
        prev, frontier, last = {start: None}, [start], None
        while frontier and last is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w == start:
                        last = v
                        break
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if last is not None:
                    break
            frontier = nxt
        if last is None:
            continue
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        path = path[::-1] + [start]
        if best is None or len(path) < len(best):
            best = path
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="print the module graph")
    args = ap.parse_args()

    exports = root_exports((SRC / "lib.rs").read_text())
    graph = {}  # module -> {target: [(file, line)]}
    problems = []
    modules = set()
    for path in sorted(SRC.rglob("*.rs")):
        if path == SRC / "lib.rs":
            continue
        src = module_of(path)
        modules.add(src)
        for target, line in imports(path, exports):
            if target == src:
                continue
            where = f"{path.relative_to(SRC.parent.parent.parent)}:{line}"
            seen = graph.setdefault(src, {}).setdefault(target, [])
            if where not in seen:
                seen.append(where)

    for m in sorted(modules | {t for ts in graph.values() for t in ts}):
        if m not in RANK:
            problems.append(f"module `{m}` has no place in LAYERS (tools/check_layers.py)")

    for comp in find_cycles({s: set(ts) for s, ts in graph.items()}):
        cycle = shortest_cycle(graph, set(comp))
        steps = "\n".join(
            f"    {a} -> {b} ({graph[a][b][0]}{', ...' if len(graph[a][b]) > 1 else ''})"
            for a, b in zip(cycle, cycle[1:])
        )
        problems.append(
            f"import cycle among {', '.join(comp)}; the shortest: {' -> '.join(cycle)}\n{steps}"
        )

    for s in sorted(graph):
        for t in sorted(graph[s]):
            if s in RANK and t in RANK and RANK[t] > RANK[s]:
                where = "\n".join(f"    {w}" for w in graph[s][t])
                problems.append(f"upward import: `{s}` uses `{t}`, a higher layer:\n{where}")

    if args.graph:
        for s in sorted(graph, key=lambda m: RANK.get(m, -1)):
            print(f"{s} -> {', '.join(sorted(graph[s], key=lambda m: RANK.get(m, -1)))}")

    order = " -> ".join(name for name, _ in LAYERS)
    if problems:
        print(f"layer check FAILED ({len(problems)} problems); order, lowest first: {order}")
        for p in problems:
            print("- " + p)
        return 1
    print(f"layer check ok: {len(modules)} modules, no cycles, no upward imports ({order})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
