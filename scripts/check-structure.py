#!/usr/bin/env python3
"""The source tree's structure rules (issue 45), checked on every test run.

1. No import cycle between files. A file's edges are the modules its paths name:
   `use crate::a::b::X`, `super::X`, `self::c::Y`, `child::Z` in a `mod.rs`, and the same
   paths written inline in code; a path resolves to the deepest module file it names,
   following `pub use` re-exports, so `super::X` where the parent only re-exports a
   sibling's `X` is an edge to the sibling. Cycles are the strongly connected components
   of that graph with more than one file.
2. No source file over MAX_LINES lines, except table tests (`tests.rs`) and generated code.

What exists today and is on its way out is listed in scripts/structure-baseline.txt: the
check fails on a cycle or a long file that is not there (a new one, or a known cycle that
grew), and says when a listed one is gone so that the list shrinks with it.

    scripts/check-structure.py            # check against the baseline
    scripts/check-structure.py --edges    # print every edge (file -> file)
    scripts/check-structure.py --write-baseline
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = {"src": "otter", "crates/otter-core/src": "otter_core"}
MAX_LINES = 900
BASELINE = os.path.join(ROOT, "scripts", "structure-baseline.txt")
EXTERNAL = ("<another crate>",)
EXEMPT = re.compile(r"(^|/)tests\.rs$")


def strip(code):
    """Code without comments, strings and char literals (paths in them are not edges)."""
    code = re.sub(r"r(#*)\"(.|\n)*?\"\1", '""', code)
    code = re.sub(r"//[^\n]*", "", code)
    code = re.sub(r"/\*(.|\n)*?\*/", "", code)
    code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
    code = re.sub(r"'(\\.|[^'\\])'", "' '", code)
    return code


def modules(src_dir):
    """module path (tuple) -> file, for one crate."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, src_dir)):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, src_dir))
            parts = rel[:-3].split(os.sep)
            if parts[0] == "bin":
                continue  # binaries are crates of their own
            if parts[-1] in ("lib", "mod", "main"):
                parts = parts[:-1]
            out[tuple(parts)] = os.path.join(src_dir, rel)
    return out


def expand_use(tree):
    """`a::{b, c::{d as e}}` -> ['a::b', 'a::c::d'] (paths only: a rename is dropped)."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if p:
            out.extend(prefix + q for q in expand_use(p))
    return out


def analyse():
    files = {}  # file -> (crate, module path, stripped code)
    by_crate = {}
    for src_dir, crate in CRATES.items():
        mods = modules(src_dir)
        by_crate[crate] = mods
        for path, f in mods.items():
            with open(os.path.join(ROOT, f)) as fh:
                files[f] = (crate, path, strip(fh.read()))
    # Re-exports: module file -> {name: absolute path it re-exports}.
    reexports = {}
    for f, (crate, mod, code) in files.items():
        names = {}
        for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
            for p in expand_use(m.group(1)):
                absolute = absolutize(p, mod, by_crate[crate], f)
                name = p.split("::")[-1]
                # Another crate's item (`pub use otter_core::data`): no edge inside this one.
                names[name] = absolute if absolute is not None else EXTERNAL
        # `pub use other_crate::module::*`: a name this file does not define itself came
        # from another crate.
        if re.search(r"\bpub\s+use\s+(?!crate|super|self)\w+(::\w+)*::\*\s*;", code):
            names["*"] = EXTERNAL
        reexports[f] = names
    defined = {f: set(re.findall(r"\b(?:struct|enum|trait|fn|type|const|static|mod|union|macro_rules!)\s+(\w+)", code)) for f, (_, _, code) in files.items()}
    edges = {f: set() for f in files}
    why = {}
    for f, (crate, mod, code) in files.items():
        spans = inline_modules(code)
        paths = []
        for m in re.finditer(r"\buse\s+([^;]+);", code):
            paths.extend((m.start(), q) for q in expand_use(m.group(1)))
        paths.extend((m.start(), m.group(0)) for m in re.finditer(r"\b(?:crate|super|self)(?:::\w+)+", code))
        for at, p in paths:
            # Inside `mod tests { .. }`, `super` is the file's own module.
            here = tuple(mod) + tuple(name for (a, b, name) in spans if a <= at < b)
            absolute = absolutize(p, here, by_crate[crate], f)
            if absolute is None:
                continue
            g = resolve(absolute, by_crate[crate], reexports, set(), defined)
            if g and g != f:
                edges[f].add(g)
                why.setdefault((f, g), []).append(p)
    return files, edges, why


def inline_modules(code):
    """(start, end, name) of every inline `mod name { .. }` in the code, outermost first."""
    out = []
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", code):
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += code[i] == "{"
            depth -= code[i] == "}"
            i += 1
        out.append((m.end(), i, m.group(1)))
    return out


def absolutize(p, mod, mods, f):
    """A path as written in module `mod` -> absolute module path segments, or None."""
    segs = [s for s in p.split("::") if s]
    if not segs:
        return None
    is_dir_module = f.endswith(("mod.rs", "lib.rs", "main.rs"))
    if segs[0] == "crate":
        return tuple(segs[1:])
    if segs[0] in ("self", "super"):
        base = list(mod)
        while segs and segs[0] in ("self", "super"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
        return tuple(base + segs)
    # A bare path: a child module of this one (2018 paths), else an external crate.
    if tuple(list(mod) + [segs[0]]) in mods:
        return tuple(list(mod) + segs)
    return None


def resolve(absolute, mods, reexports, seen, defined):
    """The file of the deepest module `absolute` names, following re-exports."""
    for n in range(len(absolute), -1, -1):
        f = mods.get(tuple(absolute[:n]))
        if f is None:
            continue
        if n < len(absolute):
            target = reexports.get(f, {}).get(absolute[n])
            if target is None and absolute[n] not in defined[f] and reexports.get(f, {}).get("*") == EXTERNAL:
                return None
            if target == EXTERNAL:
                return None
            if target is not None and target != tuple(absolute[: n + 1]) and (f, absolute[n]) not in seen:
                seen.add((f, absolute[n]))
                g = resolve(target + tuple(absolute[n + 1 :]), mods, reexports, seen, defined)
                if g:
                    return g
        return f
    return None


def cycles(edges):
    """Strongly connected components with more than one file (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return sorted(out)


def long_files(files):
    out = []
    for f in sorted(files):
        if EXEMPT.search(f):
            continue
        with open(os.path.join(ROOT, f)) as fh:
            n = sum(1 for _ in fh)
        if n > MAX_LINES:
            out.append((f, n))
    return out


def main():
    files, edges, why = analyse()
    if "--edges" in sys.argv:
        for f in sorted(edges):
            for g in sorted(edges[f]):
                print(f"{f} -> {g}   ({', '.join(sorted(set(why[(f, g)]))[:4])})")
        return 0
    found_cycles = cycles(edges)
    found_long = long_files(files)
    lines = [f"cycle: {' '.join(c)}" for c in found_cycles] + [f"long: {f}" for f, _ in found_long]
    if "--write-baseline" in sys.argv:
        with open(BASELINE, "w") as fh:
            fh.write("# Known structure debts (scripts/check-structure.py): import cycles between files and\n")
            fh.write(f"# files over {MAX_LINES} lines. Only ever shrinks: remove a line when its debt is paid.\n")
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} entries to {os.path.relpath(BASELINE, ROOT)}")
        return 0
    known = set()
    if os.path.exists(BASELINE):
        with open(BASELINE) as fh:
            known = {l.strip() for l in fh if l.strip() and not l.startswith("#")}
    known_cycles = [set(l[len("cycle: "):].split()) for l in known if l.startswith("cycle: ")]
    bad = []
    for c in found_cycles:
        # A cycle is known if a listed one contains all of its files.
        if not any(set(c) <= k for k in known_cycles):
            bad.append(f"new import cycle: {' -> '.join(c)} (scripts/check-structure.py --edges shows the uses)")
    for f, n in found_long:
        if f"long: {f}" not in known:
            bad.append(f"{f} has {n} lines (at most {MAX_LINES}; split it by responsibility)")
    gone = sorted(known - set(lines))
    for g in gone:
        print(f"paid: '{g}' is no longer true; remove it from scripts/structure-baseline.txt")
    print(f"structure: {len(files)} files, {sum(len(e) for e in edges.values())} edges, "
          f"{len(found_cycles)} import cycle(s) and {len(found_long)} long file(s), all known" if not bad else "structure: FAILED")
    for b in bad:
        print("  " + b)
    return 1 if bad or gone else 0


if __name__ == "__main__":
    sys.exit(main())
