#!/usr/bin/env python3
"""Drift checks of cluster/docker/*.Dockerfile against the repository (static: the images
are built and run by scripts/test-images.sh, its own command).

  check_docker.py ROOT RENDERED.yaml...

* the binaries and features each `cargo build` names exist in Cargo.toml, and the
  coordinator is built without default features (no libtorch);
* the worker's Python packages are scripts/setup.sh's PY_REQS with its TORCH_VERSION,
  and it sets LIBTORCH, LIBTORCH_CXX11_ABI and OTTER_TORCH_SITE inside its venv;
* the runtime user is the uid the manifests run as, the runtime stage runs the binary
  the manifests' command names, and EXPOSEd ports are the containers' ports.
"""

import os
import re
import shlex
import sys

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None


def dockerfile(path):
    """Instructions (KEYWORD, text) with continuation lines joined; stage boundaries kept."""
    out, buf = [], ""
    with open(path) as f:
        for line in f:
            s = line.rstrip("\n")
            if not buf and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if s.lstrip().startswith("#"):
                continue
            if s.endswith("\\"):
                buf += s[:-1] + " "
                continue
            buf += s
            kw, _, rest = buf.strip().partition(" ")
            out.append((kw.upper(), rest.strip()))
            buf = ""
    return out


def cargo_toml(root):
    """[[bin]] names and features of the workspace's packages (the root and crates/*)."""
    bins, feats = set(), set()
    paths = [os.path.join(root, "Cargo.toml")]
    crates = os.path.join(root, "crates")
    if os.path.isdir(crates):
        paths += [os.path.join(crates, c, "Cargo.toml") for c in sorted(os.listdir(crates))]
    for path in paths:
        text = open(path).read()
        if tomllib:
            t = tomllib.loads(text)
            bins |= {b["name"] for b in t.get("bin", [])}
            feats |= set(t.get("features", {}))
            continue
        bins |= set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', text))
        if "[features]" in text:
            feats |= set(re.findall(r"^([A-Za-z0-9_-]+)\s*=\s*\[", text.split("[features]", 1)[1].split("\n[", 1)[0], re.M))
    return bins, feats


def setup_sh(root):
    text = open(os.path.join(root, "scripts", "setup.sh")).read()
    version = re.search(r'^TORCH_VERSION="([^"]+)"', text, re.M).group(1)
    reqs = re.search(r"^PY_REQS=\((.*)\)", text, re.M).group(1)
    return [r.replace("${TORCH_VERSION}", version) for r in shlex.split(reqs)]


def main(argv):
    root, rendered = argv[0], argv[1:]
    errors = []
    bins, feats = cargo_toml(root)
    pods = []
    for path in rendered:
        for d in yaml.safe_load_all(open(path)):
            if d and d.get("kind") in ("Deployment", "StatefulSet"):
                spec = d["spec"]["template"]["spec"]
                pods += [(spec, c) for c in spec["containers"]]
    for name, binary in (("coordinator", "otter-coord"), ("worker", "otter-worker")):
        path = os.path.join(root, "cluster", "docker", f"{name}.Dockerfile")
        where = os.path.relpath(path, root)
        ins = dockerfile(path)
        stages = [i for i, (kw, _) in enumerate(ins) if kw == "FROM"]
        runtime = ins[stages[-1]:]
        args = {}
        for kw, rest in ins:
            if kw == "ARG" and "=" in rest:
                k, v = rest.split("=", 1)
                args[k] = v
        builds = [rest for kw, rest in ins if kw == "RUN" and "cargo build" in rest]
        if not builds:
            errors.append(f"{where}: no cargo build")
        for b in builds:
            words = shlex.split(b.split("cargo build", 1)[1].split("&&")[0])
            for i, w in enumerate(words):
                if w == "--bin" and words[i + 1] not in bins:
                    errors.append(f"{where}: --bin {words[i + 1]} is not a [[bin]] of Cargo.toml")
                if w == "--features":
                    for f in words[i + 1].split(","):
                        if f not in feats:
                            errors.append(f"{where}: feature {f} is not in Cargo.toml")
            if "--locked" not in words or "--release" not in words:
                errors.append(f"{where}: cargo build without --release --locked")
            if name == "coordinator" and " ".join(words).find("-p otter-core") < 0:
                errors.append(f"{where}: the coordinator must be built from the otter-core package (-p otter-core: no libtorch)")
            if f"--bin {binary}" not in " ".join(words):
                errors.append(f"{where}: does not build {binary}")
        if name == "worker":
            pip = " ".join(rest for kw, rest in ins if kw == "RUN" and "pip install" in rest)
            pip = pip.replace("${TORCH_VERSION}", args.get("TORCH_VERSION", "?"))
            for req in setup_sh(root):
                if req not in shlex.split(pip):
                    errors.append(f"{where}: does not pip install {req!r} (scripts/setup.sh's PY_REQS)")
            env = " ".join(rest for kw, rest in ins if kw == "ENV")
            for var in ("LIBTORCH=/opt/venv/", "LIBTORCH_CXX11_ABI=1", "OTTER_TORCH_SITE=/opt/venv/", "LD_LIBRARY_PATH=/opt/venv/"):
                if var not in env:
                    errors.append(f"{where}: no ENV {var}...")
        users = [rest for kw, rest in runtime if kw == "USER"]
        uids = {c.get("securityContext", {}).get("runAsUser", s.get("securityContext", {}).get("runAsUser")) for s, c in pods if binary in str(c.get("command"))}
        if not users or any(f"{u}:" not in users[-1] + ":" for u in uids) or not uids:
            errors.append(f"{where}: runtime USER {users[-1] if users else None} is not the manifests' runAsUser {uids}")
        copies = " ".join(rest for kw, rest in runtime if kw == "COPY")
        commands = {str(c.get("command", [""])[0]) for s, c in pods if binary in str(c.get("command"))}
        for cmd in commands:
            if os.path.dirname(cmd) != "/usr/local/bin" or binary not in copies:
                errors.append(f"{where}: the manifests run {cmd}, which the runtime stage does not install")
        exposed = {int(p) for kw, rest in runtime if kw == "EXPOSE" for p in rest.split()}
        ports = {p["containerPort"] for s, c in pods if binary in str(c.get("command")) for p in c.get("ports") or []}
        if exposed != ports:
            errors.append(f"{where}: EXPOSE {sorted(exposed)} but the manifests' container ports are {sorted(ports)}")
    for e in errors:
        print(f"ERROR {e}")
    print(f"check_docker: 2 Dockerfiles, {len(errors)} errors (static checks; scripts/test-images.sh builds and runs them)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
