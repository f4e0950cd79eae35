#!/usr/bin/env python3
"""Finds import cycles between the top-level modules of one Rust crate.

Usage: module-cycles.py CRATE_SRC_DIR [-v]

Starts from `lib.rs` (or `main.rs` when there is no `lib.rs`), follows the `mod NAME;`
declarations to every file of the crate, and gives each file to its top-level module
(`src/state/evict.rs` belongs to `state`). A module depends on another when its code names
it: `crate::other::…` (in `use`, `pub use` or any path), `crate::{other::…, …}`, `super::…`
that climbs to the crate root, or `crate::Name` where the root re-exports `Name` from
`other` (`pub use other::Name;` in lib.rs).

Not counted: comments (doc links included), string literals, and test-only code: an item
under `#[cfg(test)]` (typically `mod tests { … }` or `mod tests;`, whose file is skipped).
Tests sit above everything they test, so they are no part of the layering.

With cycles: prints each group of modules that import each other (a strongly connected
component), the shortest cycle through each of its members and the lines that make those
edges, and exits 1. Otherwise prints the module count and exits 0. `-v` also prints the
dependency graph.
"""

import os
import re
import sys
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(src):
    """Blanks out comments and string/char literals, keeping line breaks (so line numbers
    still match)."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            i = j
            continue
        if src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("".join("\n" if ch == "\n" else " " for ch in src[i:j]))
            i = j
            continue
        m = re.match(r'b?r(#*)"', src[i:i + 260]) if c in "rb" else None
        if m and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            end = '"' + m.group(1)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "".join("\n" for ch in src[i:j] if ch == "\n"))
            i = j
            continue
        if c == '"' or (c == "b" and src.startswith('b"', i)):
            j = i + (2 if c == "b" else 1)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append('""' + "".join("\n" for ch in src[i:j] if ch == "\n"))
            i = j
            continue
        if c == "'":
            # A char literal ('a', '\n', '\u{1F600}'), not a lifetime ('a).
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", src[i:i + 12])
            if m:
                out.append("' '")
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def item_end(code, start):
    """The index just past the item starting at `start`: its `;` or its matched braces."""
    depth, j, n = 0, start, len(code)
    while j < n:
        ch = code[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j + 1
        elif ch == ";" and depth == 0:
            return j + 1
        j += 1
    return n


CFG_TEST = re.compile(r"#\[cfg\((?:test|all\(test\b[^\]]*)\)\]")


def strip_test_items(code):
    """Blanks out items under `#[cfg(test)]`; returns (code, names of test-only `mod x;`)."""
    test_mods = set()
    while True:
        m = CFG_TEST.search(code)
        if not m:
            return code, test_mods
        j = m.end()
        # Further attributes of the same item.
        while True:
            k = re.match(r"\s*#\[[^\]]*\]", code[j:])
            if not k:
                break
            j += k.end()
        end = item_end(code, j)
        k = re.match(r"\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", code[j:end])
        if k:
            test_mods.add(k.group(1))
        blank = "".join("\n" if ch == "\n" else " " for ch in code[m.start():end])
        code = code[:m.start()] + blank + code[end:]


MOD_DECL = re.compile(r"(?:^|[;{}\]\s])(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;")


class Crate:
    def __init__(self, src):
        self.src = src
        root = os.path.join(src, "lib.rs")
        if not os.path.exists(root):
            root = os.path.join(src, "main.rs")
        self.root = root
        self.files = {}  # path -> (module path list, code)
        self._load(root, [], src)
        self.top = sorted({p[0] for p, _ in self.files.values() if p})
        self.reexports = self._root_reexports()

    def _load(self, path, modpath, child_dir):
        with open(path, encoding="utf-8") as f:
            code = strip_comments_and_strings(f.read())
        code, test_mods = strip_test_items(code)
        self.files[path] = (modpath, code)
        for m in MOD_DECL.finditer(code):
            name = m.group(1)
            if name in test_mods:
                continue
            for cand, sub_dir in (
                (os.path.join(child_dir, name + ".rs"), os.path.join(child_dir, name)),
                (os.path.join(child_dir, name, "mod.rs"), os.path.join(child_dir, name)),
            ):
                if os.path.exists(cand):
                    self._load(cand, modpath + [name], sub_dir)
                    break
            else:
                print(f"warning: {path}: no file for `mod {name};`", file=sys.stderr)

    def _root_reexports(self):
        """Name -> top-level module, from `pub use module::…` in the crate root."""
        names = {}
        _, code = self.files[self.root]
        for m in re.finditer(r"\bpub\s+use\s+(?:crate::|self::)?(" + IDENT + r")::([^;]*);", code):
            module, rest = m.group(1), m.group(2)
            if module not in self.top:
                continue
            for ident in re.findall(IDENT, rest):
                if ident not in ("self", "super", "crate", "as"):
                    names.setdefault(ident, module)
        return names

    def resolve_root_name(self, name):
        """The top-level module a name at the crate root stands for, if any."""
        if name in self.top:
            return name
        return self.reexports.get(name)

    def edges(self):
        """(from, to) -> [(file, line, text)]."""
        deps = defaultdict(list)
        for path, (modpath, code) in self.files.items():
            if not modpath:
                continue  # the crate root re-exports everything; it is no module
            me = modpath[0]
            lines = code.split("\n")

            def add(target, pos):
                if target and target != me:
                    ln = code.count("\n", 0, pos)
                    evidence = (path, ln + 1, lines[ln].strip())
                    if evidence not in deps[(me, target)]:
                        deps[(me, target)].append(evidence)

            def add_root_path(m, first):
                """`first` follows a path that stands at the crate root: a name or `{..}`."""
                if first == "{":
                    # `{a::X, b, c::{..}}`: the first name of each item of the group.
                    end = item_end(code, m.end() - 1)
                    group = code[m.end():end - 1]
                    while re.search(r"\{[^{}]*\}", group):
                        group = re.sub(r"\{[^{}]*\}", "", group)
                    for t in group.split(","):
                        k = re.match(r"\s*(" + IDENT + ")", t)
                        if k:
                            add(self.resolve_root_name(k.group(1)), m.start())
                elif first:
                    add(self.resolve_root_name(first), m.start())

            for m in re.finditer(r"(?<![A-Za-z0-9_])\$?crate::(" + IDENT + r"|\{)", code):
                add_root_path(m, m.group(1))
            # `super::…`: resolve the climb; only a climb to the crate root leaves the module.
            for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:super::)+)(" + IDENT + r"|\{)?", code):
                ups = m.group(1).count("super::")
                # A file `a/b.rs` is module a::b; `super` of a::b is a.
                if ups == len(modpath):
                    add_root_path(m, m.group(2))
        return deps


def find_cycles(nodes, deps):
    graph = defaultdict(set)
    for a, b in deps:
        graph[a].add(b)
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    cycles = []
    for scc in sccs:
        # The shortest cycle through each member (BFS back to it), each cycle once.
        members, seen, paths = set(scc), set(), []
        for start in scc:
            prev, queue, found = {start: None}, [start], None
            while queue and found is None:
                v = queue.pop(0)
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        queue.append(w)
            back, v = [], found
            while v is not None and v != start:
                back.append(v)
                v = prev[v]
            path = [start] + list(reversed(back))
            k = path.index(min(path))
            key = tuple(path[k:] + path[:k])
            if key not in seen:
                seen.add(key)
                paths.append(list(key) + [key[0]])
        cycles.append((scc, paths))
    return cycles


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    verbose = "-v" in sys.argv[1:]
    if len(args) != 1 or not os.path.isdir(args[0]):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    crate = Crate(args[0])
    deps = crate.edges()
    if verbose:
        for mod in crate.top:
            outs = sorted(b for (a, b) in deps if a == mod)
            print(f"{mod} -> {', '.join(outs) if outs else '(nothing)'}")
    cycles = find_cycles(crate.top, deps)
    if not cycles:
        print(f"{args[0]}: no import cycles among {len(crate.top)} top-level modules")
        return 0
    for scc, paths in cycles:
        print(f"{args[0]}: import cycle among {', '.join(scc)}:")
        for path in paths:
            print(f"  {' -> '.join(path)}")
        for a, b in sorted({e for path in paths for e in zip(path, path[1:])}):
            for file, line, text in deps[(a, b)][:2]:
                print(f"    {a} -> {b}: {os.path.relpath(file)}:{line}: {text}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
