#!/usr/bin/env python3
"""Cross-reference checks of rendered Otter manifests (one `kustomize build` output per
file): what schema validation cannot see.

  check_refs.py [--reference-job configs/local-job.yaml] RENDERED.yaml...

* every Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor selector selects
  something; Service target ports and ServiceMonitor ports exist by name or number;
* every ConfigMap, Secret and PVC a pod uses exists (volumes, items, env, envFrom), every
  volume mount names a volume or a volumeClaimTemplate, and nothing rendered is unused;
* probes and Prometheus annotations name ports the container declares;
* the command lines agree with the objects: files given to --config/--token-file/
  --state-dir lie on the right kind of mount, --coord names a Service port, --etcd names
  members of the etcd StatefulSet, --initial-cluster lists exactly its replicas,
  --gpus matches the nvidia.com/gpu limit, $(VARS) are defined;
* the network policies allow the job's own traffic (worker->coordinator, worker<->worker
  on any port, coordinator->etcd, etcd peers, Prometheus->metrics, DNS);
* the job YAML in the ConfigMap parses, has the reference job's keys, its paths are
  absolute and lie on volumes every Otter container mounts (out_dir read-write), and the
  worker count fits coord.min_nodes..max_nodes;
* every container runs as non-root with a read-only root filesystem, no privilege
  escalation, all capabilities dropped, the RuntimeDefault seccomp profile, and no
  service account token.

Prints one line per error and exits 1 if there is any. `check(docs)` is the library entry
point (tests/cluster/test_check_refs.py).
"""

import argparse
import posixpath
import re
import sys

import yaml

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
# Kinds of our own objects that have no built-in schema: checked here, skipped by the
# schema validation (tests/cluster/validate.py).
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1"}
# Where Prometheus runs: any namespace, pods labelled like the Prometheus Operator's.
PROMETHEUS = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
KUBE_DNS = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
EPHEMERAL_PORT = 41234  # a rank's ring/NCCL listener: any TCP port must be allowed
OTTER_BINARIES = ("otter-coord", "otter-worker")


def ref(obj):
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def selector_matches(selector, labels):
    """A LabelSelector (matchLabels/matchExpressions) or a plain map (Service selector)."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        ml, exprs = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    else:
        ml, exprs = selector, []
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for e in exprs:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Pod:
    """A pod template of a workload (or a bare Pod)."""

    def __init__(self, owner, template):
        self.owner = owner
        self.labels = (template.get("metadata") or {}).get("labels") or {}
        self.annotations = (template.get("metadata") or {}).get("annotations") or {}
        self.spec = template.get("spec") or {}
        self.name = ref(owner)

    def containers(self, init=True):
        cs = list(self.spec.get("containers") or [])
        if init:
            cs += list(self.spec.get("initContainers") or [])
        return cs

    def ports(self):
        return [p for c in self.containers(init=False) for p in c.get("ports") or []]

    def has_port(self, port, protocol="TCP"):
        for p in self.ports():
            if p.get("protocol", "TCP") != protocol:
                continue
            if port == p.get("name") or port == p.get("containerPort"):
                return True
        return False

    def claim_templates(self):
        if self.owner.get("kind") != "StatefulSet":
            return []
        return [(t.get("metadata") or {}).get("name") for t in self.owner["spec"].get("volumeClaimTemplates") or []]

    def replicas(self):
        return (self.owner.get("spec") or {}).get("replicas", 1) if self.owner.get("kind") != "Pod" else 1


def pod_of(obj):
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return Pod(obj, obj)
    if kind == "CronJob":
        return Pod(obj, ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {})
    if kind in WORKLOADS:
        return Pod(obj, spec.get("template") or {})
    return None


def flag_values(args, flag):
    """Values of `--flag V` and `--flag=V` in an argument list."""
    out = []
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            out.append(str(args[i + 1]))
        elif isinstance(a, str) and a.startswith(flag + "="):
            out.append(a[len(flag) + 1:])
    return out


def binary(container):
    cmd = (container.get("command") or []) + (container.get("args") or [])
    return posixpath.basename(str(cmd[0])) if cmd else ""


def mount_for(container, path):
    """The volume mount holding `path` (longest mountPath prefix), or None."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def key_paths(node, prefix=""):
    """The set of key paths of a YAML tree (list items merged): structure, not values."""
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out.add(p)
            out |= key_paths(v, p)
    elif isinstance(node, list):
        for v in node:
            out |= key_paths(v, prefix + "[]")
    return out


class Checker:
    def __init__(self, docs, reference_job=None):
        self.docs = [d for d in docs if d]
        self.reference_job = reference_job
        self.errors = []
        self.checks = 0
        self.by_kind = {}
        for d in self.docs:
            self.by_kind.setdefault(d.get("kind"), {})
            name = (d.get("metadata") or {}).get("name")
            if name in self.by_kind[d["kind"]]:
                self.err(d, "defined twice")
            self.by_kind[d["kind"]][name] = d
        self.pods = [p for p in (pod_of(d) for d in self.docs) if p is not None]
        self.used = set()  # (kind, name) referenced by a pod

    def err(self, obj, msg):
        self.errors.append(f"{obj if isinstance(obj, str) else ref(obj)}: {msg}")

    def ok(self, cond, obj, msg):
        self.checks += 1
        if not cond:
            self.err(obj, msg)
        return cond

    def get(self, kind, name):
        return self.by_kind.get(kind, {}).get(name)

    def services(self):
        return list(self.by_kind.get("Service", {}).values())

    def pods_selected(self, selector):
        return [p for p in self.pods if selector_matches(selector, p.labels)]

    # ---------------------------------------------------------------------------------
    def run(self):
        for p in self.pods:
            self.check_pod(p)
        for s in self.services():
            self.check_service(s)
        for sm in self.by_kind.get("ServiceMonitor", {}).values():
            self.check_servicemonitor(sm)
        for pdb in self.by_kind.get("PodDisruptionBudget", {}).values():
            sel = pdb["spec"].get("selector")
            self.ok(bool(self.pods_selected(sel)), pdb, f"selector {sel} matches no pod template")
            self.ok(("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), pdb, "give exactly one of minAvailable, maxUnavailable")
        for np in self.by_kind.get("NetworkPolicy", {}).values():
            self.check_netpol(np)
        self.check_flows()
        self.check_job()
        for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount"):
            for name, obj in self.by_kind.get(kind, {}).items():
                self.ok((kind, name) in self.used, obj, "is used by no pod")
        return self.errors

    # --- pods -------------------------------------------------------------------------
    def check_pod(self, p):
        o, spec = p.owner, p.spec
        if o.get("kind") != "Pod":
            sel = (o.get("spec") or {}).get("selector")
            if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
                self.ok(selector_matches(sel, p.labels), o, f"selector {sel} does not match its own pod template labels {p.labels}")
        sa = spec.get("serviceAccountName", "default")
        sa_obj = self.get("ServiceAccount", sa)
        if self.ok(sa == "default" or sa_obj is not None, o, f"serviceAccountName {sa} not found"):
            self.used.add(("ServiceAccount", sa))
        no_token = spec.get("automountServiceAccountToken")
        if no_token is None and sa_obj is not None:
            no_token = sa_obj.get("automountServiceAccountToken")
        self.ok(no_token is False, o, "mounts a service account token (set automountServiceAccountToken: false)")
        if o.get("kind") == "StatefulSet":
            svc = self.get("Service", o["spec"].get("serviceName"))
            if self.ok(svc is not None, o, f"serviceName {o['spec'].get('serviceName')} is not a Service"):
                self.ok(svc["spec"].get("clusterIP") == "None", svc, "is a StatefulSet's serviceName but not headless (clusterIP: None)")
                self.ok(selector_matches(svc["spec"].get("selector"), p.labels), svc, f"is {ref(o)}'s serviceName but does not select its pods")

        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        claim_templates = p.claim_templates()
        for v in volumes.values():
            self.check_volume(o, v)
        mounted = set()
        for c in p.containers():
            cname = f"{ref(o)} container {c['name']}"
            self.ok(bool(c.get("image")), cname, "has no image")
            paths = set()
            for m in c.get("volumeMounts") or []:
                mounted.add(m["name"])
                self.ok(m["name"] in volumes or m["name"] in claim_templates, cname, f"mounts volume {m['name']}, which is neither a volume nor a volumeClaimTemplate")
                self.ok(m["mountPath"] not in paths, cname, f"mounts two volumes at {m['mountPath']}")
                paths.add(m["mountPath"])
            self.check_env(cname, c)
            self.check_ports_and_probes(cname, c)
            self.check_security(cname, spec, c)
            self.check_args(cname, p, c, volumes)
        for name in volumes:
            self.ok(name in mounted, o, f"volume {name} is mounted by no container")
        for name in claim_templates:
            self.ok(name in mounted, o, f"volumeClaimTemplate {name} is mounted by no container")
        ann = p.annotations
        if ann.get("prometheus.io/scrape") == "true":
            port = ann.get("prometheus.io/port")
            self.ok(port is not None and port.isdigit() and p.has_port(int(port)), o, f"prometheus.io/port {port} is not a declared container port")
            self.ok(ann.get("prometheus.io/path", "/metrics").startswith("/"), o, "prometheus.io/path must start with /")

    def check_volume(self, o, v):
        def configmap(name, items, where):
            cm = self.get("ConfigMap", name)
            if self.ok(cm is not None, o, f"{where}: ConfigMap {name} not found"):
                self.used.add(("ConfigMap", name))
                keys = set((cm.get("data") or {})) | set((cm.get("binaryData") or {}))
                for it in items or []:
                    self.ok(it["key"] in keys, o, f"{where}: ConfigMap {name} has no key {it['key']}")

        def secret(name, items, where):
            s = self.get("Secret", name)
            if self.ok(s is not None, o, f"{where}: Secret {name} not found"):
                self.used.add(("Secret", name))
                keys = set((s.get("data") or {})) | set((s.get("stringData") or {}))
                for it in items or []:
                    self.ok(it["key"] in keys, o, f"{where}: Secret {name} has no key {it['key']}")

        where = f"volume {v['name']}"
        if "configMap" in v:
            configmap(v["configMap"]["name"], v["configMap"].get("items"), where)
        if "secret" in v:
            secret(v["secret"]["secretName"], v["secret"].get("items"), where)
        if "persistentVolumeClaim" in v:
            name = v["persistentVolumeClaim"]["claimName"]
            if self.ok(self.get("PersistentVolumeClaim", name) is not None, o, f"{where}: PersistentVolumeClaim {name} not found"):
                self.used.add(("PersistentVolumeClaim", name))
        for src in (v.get("projected") or {}).get("sources") or []:
            if "configMap" in src:
                configmap(src["configMap"]["name"], src["configMap"].get("items"), where)
            if "secret" in src:
                secret(src["secret"]["name"], src["secret"].get("items"), where)

    def check_env(self, cname, c):
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                r = vf.get(key)
                if r:
                    obj = self.get(kind, r["name"])
                    if self.ok(obj is not None, cname, f"env {e['name']}: {kind} {r['name']} not found"):
                        self.used.add((kind, r["name"]))
                        keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
                        self.ok(r["key"] in keys, cname, f"env {e['name']}: {kind} {r['name']} has no key {r['key']}")
        for ef in c.get("envFrom") or []:
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                r = ef.get(key)
                if r and self.ok(self.get(kind, r["name"]) is not None, cname, f"envFrom: {kind} {r['name']} not found"):
                    self.used.add((kind, r["name"]))

    def check_ports_and_probes(self, cname, c):
        ports = c.get("ports") or []
        names = [p["name"] for p in ports if "name" in p]
        self.ok(len(names) == len(set(names)), cname, f"port names repeat: {names}")
        numbers = {p["containerPort"] for p in ports}
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(probe_name)
            if not probe:
                continue
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler in probe:
                    port = probe[handler]["port"]
                    self.ok(port in names or port in numbers, cname, f"{probe_name}.{handler} port {port} is not a declared container port")

    def check_security(self, cname, podspec, c):
        psc, csc = podspec.get("securityContext") or {}, c.get("securityContext") or {}

        def eff(key):
            return csc.get(key, psc.get(key))

        self.ok(eff("runAsNonRoot") is True, cname, "runAsNonRoot is not true")
        uid = eff("runAsUser")
        self.ok(isinstance(uid, int) and uid > 0, cname, f"runAsUser {uid} is not a non-root uid")
        self.ok(csc.get("readOnlyRootFilesystem") is True, cname, "readOnlyRootFilesystem is not true")
        self.ok(csc.get("allowPrivilegeEscalation") is False, cname, "allowPrivilegeEscalation is not false")
        self.ok(csc.get("privileged") in (None, False), cname, "is privileged")
        self.ok("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), cname, "does not drop ALL capabilities")
        self.ok(((csc.get("capabilities") or {}).get("add") or []) == [], cname, "adds capabilities")
        self.ok((eff("seccompProfile") or {}).get("type") == "RuntimeDefault", cname, "seccompProfile is not RuntimeDefault")

    def check_args(self, cname, p, c, volumes):
        args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        env = {e["name"] for e in c.get("env") or []}
        for a in args:
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                self.ok(var in env, cname, f"argument {a} uses $({var}), which is not in env")
        ports = {pt["containerPort"] for pt in c.get("ports") or []}

        def file_on(flag, kinds, writable=False):
            for path in flag_values(args, flag):
                m = mount_for(c, path)
                if not self.ok(m is not None, cname, f"{flag} {path} is on no volume mount (read-only root filesystem)"):
                    continue
                v = volumes.get(m["name"]) or {}
                kind = next((k for k in ("configMap", "secret", "persistentVolumeClaim", "emptyDir") if k in v), "volumeClaimTemplate")
                self.ok(kind in kinds, cname, f"{flag} {path} is on volume {m['name']} ({kind}), expected {' or '.join(kinds)}")
                if writable:
                    self.ok(not m.get("readOnly"), cname, f"{flag} {path} is on a read-only mount")
                rel = posixpath.relpath(path, m["mountPath"])
                if kind in ("configMap", "secret"):
                    src = v[kind]
                    items = src.get("items")
                    if items is not None:
                        self.ok(rel in [it["path"] for it in items], cname, f"{flag} {path}: volume {m['name']} projects no {rel}")
                    else:
                        obj = self.get("ConfigMap", src.get("name")) if kind == "configMap" else self.get("Secret", src.get("secretName"))
                        self.ok(obj is not None and rel in (obj.get("data") or {}), cname, f"{flag} {path}: no key {rel} in the {kind}")

        file_on("--config", ["configMap"])
        file_on("--token-file", ["secret"])
        file_on("--state-dir", ["persistentVolumeClaim", "volumeClaimTemplate"], writable=True)
        for flag in ("--listen", "--http-listen"):
            for addr in flag_values(args, flag):
                port = int(addr.rsplit(":", 1)[1])
                self.ok(port in ports, cname, f"{flag} {addr}: port {port} is not a declared container port")
        for port in flag_values(args, "--metrics-port"):
            self.ok(port.isdigit() and int(port) in ports, cname, f"--metrics-port {port} is not a declared container port")
        for value in flag_values(args, "--coord"):
            for addr in value.split(","):
                host, _, port = addr.rpartition(":")
                svc = self.get("Service", host)
                if self.ok(svc is not None, cname, f"--coord {addr}: no Service {host}"):
                    self.ok(any(sp["port"] == int(port) for sp in svc["spec"].get("ports") or []), cname, f"--coord {addr}: Service {host} has no port {port}")
        for value in flag_values(args, "--etcd"):
            for url in value.split(","):
                self.check_member_url(cname, url, "--etcd")
        for value in flag_values(args, "--initial-cluster"):
            members = dict(m.split("=", 1) for m in value.split(","))
            sts = p.owner
            want = [f"{(sts.get('metadata') or {}).get('name')}-{i}" for i in range(p.replicas())]
            self.ok(sorted(members) == sorted(want), cname, f"--initial-cluster lists {sorted(members)}, the StatefulSet has {want}")
            for url in members.values():
                self.check_member_url(cname, url, "--initial-cluster")
        gpus = flag_values(args, "--gpus")
        limit = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
        if gpus:
            self.ok(str(limit) == gpus[0], cname, f"--gpus {gpus[0]} but the nvidia.com/gpu limit is {limit}")
        elif binary(c) == "otter-worker":
            self.ok(limit is None, cname, f"requests nvidia.com/gpu {limit} without --gpus")

    def check_member_url(self, cname, url, flag):
        m = re.fullmatch(r"https?://([a-z0-9-]+)\.([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)", url)
        if not self.ok(m is not None, cname, f"{flag} {url}: expected http://POD.SERVICE:PORT"):
            return
        pod, svc_name, port = m.group(1), m.group(2), int(m.group(3))
        svc = self.get("Service", svc_name)
        if not self.ok(svc is not None, cname, f"{flag} {url}: no Service {svc_name}"):
            return
        self.ok(svc["spec"].get("clusterIP") == "None", cname, f"{flag} {url}: Service {svc_name} is not headless (no per-pod names)")
        self.ok(any(sp["port"] == port for sp in svc["spec"].get("ports") or []), cname, f"{flag} {url}: Service {svc_name} has no port {port}")
        pods = [
            f"{s['metadata']['name']}-{i}"
            for s in self.by_kind.get("StatefulSet", {}).values()
            if s["spec"].get("serviceName") == svc_name
            for i in range(s["spec"].get("replicas", 1))
        ]
        self.ok(pod in pods, cname, f"{flag} {url}: {pod} is not a pod of a StatefulSet of Service {svc_name} ({pods})")

    # --- services ---------------------------------------------------------------------
    def check_service(self, s):
        sel = s["spec"].get("selector")
        if not self.ok(bool(sel), s, "has no selector"):
            return
        pods = self.pods_selected(sel)
        if not self.ok(bool(pods), s, f"selector {sel} matches no pod template"):
            return
        for sp in s["spec"].get("ports") or []:
            tp = sp.get("targetPort", sp["port"])
            self.ok(any(p.has_port(tp, sp.get("protocol", "TCP")) for p in pods), s, f"port {sp.get('name')}: targetPort {tp} is not a container port of {[p.name for p in pods]}")

    def check_servicemonitor(self, sm):
        spec = sm.get("spec") or {}
        self.ok(sm.get("apiVersion") == CRD_KINDS["ServiceMonitor"], sm, f"apiVersion {sm.get('apiVersion')}")
        sel = spec.get("selector")
        svcs = [s for s in self.services() if selector_matches(sel, (s.get("metadata") or {}).get("labels") or {})]
        if not self.ok(bool(svcs), sm, f"selector {sel} matches no Service's labels"):
            return
        eps = spec.get("endpoints") or []
        self.ok(bool(eps), sm, "has no endpoints")
        for ep in eps:
            for s in svcs:
                if "port" in ep:
                    self.ok(ep["port"] in [sp.get("name") for sp in s["spec"].get("ports") or []], sm, f"endpoint port {ep['port']} is not a port name of {ref(s)}")
                elif "targetPort" in ep:
                    self.ok(any(p.has_port(ep["targetPort"]) for p in self.pods_selected(s["spec"].get("selector"))), sm, f"endpoint targetPort {ep['targetPort']} is not a container port behind {ref(s)}")
                else:
                    self.err(sm, "endpoint names no port")

    # --- network policies ---------------------------------------------------------------
    def check_netpol(self, np):
        spec = np["spec"]
        selected = self.pods_selected(spec.get("podSelector") or {})
        self.ok(bool(selected), np, f"podSelector {spec.get('podSelector')} matches no pod template")
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction) or []:
                peer_pods = []
                external = False
                for peer in rule.get(peers_key) or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        matched = self.pods_selected(peer["podSelector"])
                        self.ok(bool(matched), np, f"{direction} peer podSelector {peer['podSelector']} matches no pod template")
                        peer_pods += matched
                    else:
                        external = True
                # The pods that must listen on the rule's ports.
                listeners = selected if direction == "ingress" else ([] if external or not rule.get(peers_key) else peer_pods)
                for port in rule.get("ports") or []:
                    if "port" in port and listeners:
                        self.ok(any(p.has_port(port["port"], port.get("protocol", "TCP")) for p in listeners), np, f"{direction} port {port['port']} is not a container port of {sorted({p.name for p in listeners})}")

    def policies_for(self, labels, policy_type):
        out = []
        for np in self.by_kind.get("NetworkPolicy", {}).values():
            spec = np["spec"]
            types = spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"])
            if policy_type in types and selector_matches(spec.get("podSelector") or {}, labels):
                out.append(spec)
        return out

    @staticmethod
    def peer_matches(peer, other):
        """`other`: {'namespace': None (ours) or a name, 'labels': {...}}."""
        if "ipBlock" in peer:
            return False
        ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
        if ns_sel is None:
            if other["namespace"] is not None:
                return False
        elif not selector_matches(ns_sel, {"kubernetes.io/metadata.name": other["namespace"] or "otter"}):
            return False
        return pod_sel is None or selector_matches(pod_sel, other["labels"])

    @staticmethod
    def port_matches(rule_ports, port, protocol, dst_pod):
        if not rule_ports:
            return True
        for rp in rule_ports:
            if rp.get("protocol", "TCP") != protocol:
                continue
            want = rp.get("port")
            if want is None:
                return True
            if isinstance(want, str):
                if dst_pod is not None and any(p.get("name") == want and p.get("containerPort") == port for p in dst_pod.ports()):
                    return True
            elif want <= port <= rp.get("endPort", want):
                return True
        return False

    def allowed(self, src, dst, port, protocol="TCP"):
        """Whether the policies let `src` reach `dst`:port. src, dst: {'namespace': None
        for ours or another namespace's name, 'labels': {...}, 'pod': Pod or absent}."""

        def peers_match(peers, other):
            return not peers or any(self.peer_matches(peer, other) for peer in peers)

        if src["namespace"] is None:
            egress = self.policies_for(src["labels"], "Egress")
            if egress and not any(
                peers_match(rule.get("to"), dst) and self.port_matches(rule.get("ports"), port, protocol, dst.get("pod"))
                for spec in egress
                for rule in spec.get("egress") or []
            ):
                return False
        if dst["namespace"] is None:
            ingress = self.policies_for(dst["labels"], "Ingress")
            if ingress and not any(
                peers_match(rule.get("from"), src) and self.port_matches(rule.get("ports"), port, protocol, dst.get("pod"))
                for spec in ingress
                for rule in spec.get("ingress") or []
            ):
                return False
        return True

    def check_flows(self):
        """The traffic the job needs, derived from the manifests, must be allowed."""
        if not self.by_kind.get("NetworkPolicy"):
            return

        def ours(p):
            return {"namespace": None, "labels": p.labels, "pod": p}

        def need(src, dst, port, what, protocol="TCP"):
            self.ok(self.allowed(src, dst, port, protocol), "NetworkPolicy", f"{what} ({protocol} {port}) is blocked")

        for p in self.pods:
            need(ours(p), KUBE_DNS, 53, f"DNS from {p.name}", "UDP")
            if p.annotations.get("prometheus.io/scrape") == "true":
                port = int(p.annotations.get("prometheus.io/port", "0"))
                need(PROMETHEUS, ours(p), port, f"Prometheus scraping {p.name}")
            for c in p.containers(init=False):
                args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                for value in flag_values(args, "--coord"):
                    for addr in value.split(","):
                        host, _, port = addr.rpartition(":")
                        svc = self.get("Service", host)
                        if not svc:
                            continue
                        sp = next((x for x in svc["spec"].get("ports") or [] if x["port"] == int(port)), None)
                        for q in self.pods_selected(svc["spec"].get("selector")):
                            tp = sp.get("targetPort", sp["port"]) if sp else int(port)
                            num = next((x["containerPort"] for x in q.ports() if x.get("name") == tp), tp)
                            need(ours(p), ours(q), num, f"{p.name} -> coordinator {q.name}")
                if binary(c) == "otter-worker":
                    need(ours(p), ours(p), EPHEMERAL_PORT, f"rank to rank between {p.name} pods (any TCP port)")
                for value in flag_values(args, "--etcd"):
                    for url in value.split(","):
                        m = re.fullmatch(r"https?://([a-z0-9-]+)\.([a-z0-9-]+).*:(\d+)", url)
                        if m:
                            for q in self.pods:
                                if q.owner.get("kind") == "StatefulSet" and q.owner["spec"].get("serviceName") == m.group(2):
                                    need(ours(p), ours(q), int(m.group(3)), f"{p.name} -> etcd {q.name}")
                for value in flag_values(args, "--initial-cluster"):
                    for url in (m.split("=", 1)[1] for m in value.split(",")):
                        need(ours(p), ours(p), int(url.rsplit(":", 1)[1]), f"etcd peers {p.name}")

    # --- the job ----------------------------------------------------------------------
    def check_job(self):
        otter = [(p, c) for p in self.pods for c in p.containers(init=False) if binary(c) in OTTER_BINARIES]
        coords = [(p, c) for p, c in otter if binary(c) == "otter-coord"]
        workers = [(p, c) for p, c in otter if binary(c) == "otter-worker"]
        self.ok(bool(coords) and bool(workers), "job", f"expected coordinator and worker containers, found {len(coords)} and {len(workers)}")
        for p, c in coords:
            args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            cfg_paths = flag_values(args, "--config")
            if not self.ok(len(cfg_paths) == 1, p.name, "the coordinator needs one --config"):
                continue
            m = mount_for(c, cfg_paths[0])
            vol = next((v for v in p.spec.get("volumes") or [] if m and v["name"] == m["name"]), {})
            cm = self.get("ConfigMap", (vol.get("configMap") or {}).get("name"))
            if not self.ok(cm is not None, p.name, f"--config {cfg_paths[0]} is not on a ConfigMap volume"):
                continue
            rel = posixpath.relpath(cfg_paths[0], m["mountPath"])
            key = next((it["key"] for it in vol["configMap"].get("items") or [] if it["path"] == rel), rel)
            text = (cm.get("data") or {}).get(key)
            if not self.ok(text is not None, cm, f"has no key {key} (--config {cfg_paths[0]})"):
                continue
            try:
                job = yaml.safe_load(text)
            except yaml.YAMLError as e:
                self.err(cm, f"{key} is not YAML: {e}")
                continue
            if not self.ok(isinstance(job, dict), cm, f"{key} is not a mapping"):
                continue
            self.check_job_yaml(cm, key, job, otter, workers)

    def check_job_yaml(self, cm, key, job, otter, workers):
        where = f"{ref(cm)} {key}"
        if self.reference_job is not None:
            want, got = key_paths(self.reference_job), key_paths(job)
            self.ok(got == want, where, f"keys differ from the reference job: missing {sorted(want - got)}, extra {sorted(got - want)}")
        model, data, train = job.get("model") or {}, job.get("data") or {}, job.get("train") or {}
        reads = [("model.dir", model.get("dir")), ("data.tokenizer", data.get("tokenizer"))]
        for i, d in enumerate(data.get("datasets") or []):
            for f in ("instructions", "images", "train_config"):
                if d.get(f) is not None:
                    reads.append((f"data.datasets[{i}].{f}", d[f]))
        writes = [("train.out_dir", train.get("out_dir"))]
        for field, path in reads + writes:
            if not self.ok(isinstance(path, str) and path.startswith("/"), where, f"{field} {path!r} must be an absolute path (the job file is shipped to every worker)"):
                continue
            for p, c in otter:
                m = mount_for(c, path)
                cname = f"{p.name} container {c['name']}"
                if self.ok(m is not None and m["mountPath"] != "/", where, f"{field} {path} is on no volume of {cname}"):
                    if (field, path) in writes:
                        self.ok(not m.get("readOnly"), where, f"{field} {path} is on a read-only mount of {cname}")
                    vol = next((v for v in p.spec.get("volumes") or [] if v["name"] == m["name"]), {})
                    self.ok("persistentVolumeClaim" in vol, where, f"{field} {path} is on volume {m['name']} of {cname}, not on a PVC shared by the job")
        coord = job.get("coord") or {}
        for p, c in workers:
            n = p.replicas()
            lo, hi = coord.get("min_nodes"), coord.get("max_nodes")
            if isinstance(lo, int) and isinstance(hi, int):
                self.ok(lo <= n <= hi, where, f"{p.name} has {n} replicas, outside coord.min_nodes..max_nodes = {lo}..{hi} (extra nodes are refused, too few never start)")
            args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            device = str(train.get("device", ""))
            if flag_values(args, "--gpus"):
                self.ok(device.startswith("cuda"), where, f"train.device {device} but {p.name} runs --gpus ranks")
            else:
                self.ok(device == "cpu", where, f"train.device {device} but {p.name} runs CPU ranks")


def check(docs, reference_job=None):
    """Errors (strings) of one rendered overlay; [] when all is well."""
    c = Checker(docs, reference_job)
    c.run()
    return c.errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-job", help="a job YAML whose key structure the ConfigMap's job must have")
    ap.add_argument("rendered", nargs="+")
    a = ap.parse_args(argv)
    reference = None
    if a.reference_job:
        with open(a.reference_job) as f:
            reference = yaml.safe_load(f)
    failed = False
    for path in a.rendered:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        c = Checker(docs, reference)
        errors = c.run()
        for e in errors:
            print(f"ERROR {path}: {e}")
        print(f"check_refs: {path}: {len(docs)} objects, {c.checks} checks, {len(errors)} errors")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
