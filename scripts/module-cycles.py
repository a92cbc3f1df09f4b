#!/usr/bin/env python3
"""Fail when the controller's top-level modules depend on each other in a cycle.

A module's dependencies are the `crate::NAME` paths in its files (test modules left out);
`lib.rs` (the crate root) is not a module here. Usage: module-cycles.py [SRC_DIR]
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "controller/src"
deps = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        top = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".rs")
        src = open(path, encoding="utf-8").read()
        cut = src.find("#[cfg(test)]")
        if cut >= 0:
            src = src[:cut]
        names = set(re.findall(r"crate::([a-z_]+)", src))
        for group in re.findall(r"crate::\{([^}]*)\}", src):
            names.update(re.findall(r"\b([a-z_]+)\b", group))
        deps.setdefault(top, set()).update(names)
modules = set(deps) - {"lib", "main"}
graph = {m: {d for d in deps[m] if d in modules and d != m} for m in modules}

# Tarjan's strongly connected components.
index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
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
            cycles.append(sorted(comp))


for m in sorted(graph):
    if m not in index:
        visit(m)
for comp in cycles:
    print(f"module cycle in {root}: " + ", ".join(comp), file=sys.stderr)
    for m in comp:
        print(f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}", file=sys.stderr)
if cycles:
    sys.exit(1)
print(f"no cycles between the {len(modules)} top-level modules of {root}")
