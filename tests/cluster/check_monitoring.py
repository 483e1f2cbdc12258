#!/usr/bin/env python3
"""Checks of the monitoring files that no schema covers.

  check_monitoring.py --dashboard cluster/grafana/otter-training.json \
      --scrape cluster/prometheus/scrape.yaml [--metrics-doc docs/metrics.md]

Dashboard: the JSON parses; schemaVersion, uid; a DS_PROMETHEUS datasource variable that
every panel and query uses; unique panel ids; panels inside the 24-column grid and not
overlapping; every query's metric names (histogram _bucket/_sum/_count folded into the
histogram's name) documented in docs/metrics.md, when that file exists.
Scrape config: parses; each job discovers pods and keeps only those annotated
prometheus.io/scrape "true", takes port and path from the annotations.
"""

import argparse
import json
import os
import re
import sys

import yaml

METRIC = re.compile(r"\botter_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_metrics(dash):
    """Metric names used by panel queries and template variables."""
    exprs = []
    for p in dash.get("panels") or []:
        for sub in [p] + list(p.get("panels") or []):
            exprs += [t.get("expr", "") for t in sub.get("targets") or []]
    for v in (dash.get("templating") or {}).get("list") or []:
        q = v.get("query")
        exprs.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    names = set()
    for e in exprs:
        names |= set(METRIC.findall(e))
    return names


def base_name(metric):
    for s in HISTOGRAM_SUFFIXES:
        if metric.endswith(s):
            return metric[: -len(s)]
    return metric


def check_dashboard(path, metrics_doc):
    errors = []
    with open(path) as f:
        dash = json.load(f)
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        errors.append(f"schemaVersion {dash.get('schemaVersion')} (want >= 36)")
    if not dash.get("uid") or not dash.get("title"):
        errors.append("no uid or title")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = variables.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append("no DS_PROMETHEUS datasource variable of type prometheus")
    for name in ("job", "node"):
        if name not in variables:
            errors.append(f"no template variable {name}")
    ids, boxes = set(), []
    panels = [q for p in dash.get("panels") or [] for q in [p] + list(p.get("panels") or [])]
    for p in panels:
        what = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            errors.append(f"{what}: id repeats")
        ids.add(p.get("id"))
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] < 0 or g["x"] + g["w"] > 24:
            errors.append(f"{what}: gridPos {g} outside the 24-column grid")
            continue
        for other, og in boxes:
            if g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]:
                errors.append(f"{what}: overlaps {other}")
        boxes.append((what, g))
        if p.get("type") == "row":
            continue
        if not p.get("targets"):
            errors.append(f"{what}: no queries")
        for src in [p] + list(p.get("targets") or []):
            if (src.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                errors.append(f"{what}: datasource {src.get('datasource')} is not ${{DS_PROMETHEUS}}")
        for t in p.get("targets") or []:
            if not t.get("expr") or not t.get("refId"):
                errors.append(f"{what}: a query without expr or refId")
            if t.get("expr", "").count("(") != t.get("expr", "").count(")"):
                errors.append(f"{what}: unbalanced parentheses in {t['expr']}")
    names = dashboard_metrics(dash)
    if metrics_doc and os.path.exists(metrics_doc):
        with open(metrics_doc) as f:
            documented = set(METRIC.findall(f.read()))
        documented |= {base_name(m) for m in documented}
        missing = sorted(m for m in names if m not in documented and base_name(m) not in documented)
        for m in missing:
            errors.append(f"metric {m} is not in {metrics_doc}")
        note = f"all {len(names)} metric names documented in {metrics_doc}" if not missing else f"{len(missing)} of {len(names)} metric names not in {metrics_doc}"
    else:
        note = f"{len(names)} metric names; {metrics_doc or 'docs/metrics.md'} missing: metric names NOT checked against the docs"
    return errors, f"{len(panels)} panels, {note}"


def check_scrape(path):
    errors = []
    with open(path) as f:
        cfg = yaml.safe_load(f)
    jobs = (cfg or {}).get("scrape_configs") or []
    if not jobs:
        errors.append("no scrape_configs")
    for j in jobs:
        name = j.get("job_name")
        roles = [sd.get("role") for sd in j.get("kubernetes_sd_configs") or []]
        if roles != ["pod"]:
            errors.append(f"job {name}: kubernetes_sd_configs roles {roles}, want [pod]")
        relabels = j.get("relabel_configs") or []
        text = json.dumps(relabels)
        keep = [r for r in relabels if r.get("action") == "keep" and "__meta_kubernetes_pod_annotation_prometheus_io_scrape" in (r.get("source_labels") or [])]
        if not keep or keep[0].get("regex") != "true":
            errors.append(f"job {name}: does not keep only pods annotated prometheus.io/scrape: \"true\"")
        for ann, target in (("port", "__address__"), ("path", "__metrics_path__")):
            if not any(f"__meta_kubernetes_pod_annotation_prometheus_io_{ann}" in (r.get("source_labels") or []) and r.get("target_label") == target for r in relabels):
                errors.append(f"job {name}: {target} not taken from prometheus.io/{ann}")
        for r in relabels:
            if "regex" in r:
                try:
                    re.compile(r["regex"])
                except re.error as e:
                    errors.append(f"job {name}: regex {r['regex']!r}: {e}")
        if "namespace" not in text:
            errors.append(f"job {name}: no namespace label (the dashboard filters on it)")
    return errors, f"{len(jobs)} scrape job(s)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--scrape", required=True)
    ap.add_argument("--metrics-doc")
    a = ap.parse_args(argv)
    failed = False
    for path, (errors, summary) in ((a.dashboard, check_dashboard(a.dashboard, a.metrics_doc)), (a.scrape, check_scrape(a.scrape))):
        for e in errors:
            print(f"ERROR {path}: {e}")
        print(f"check_monitoring: {path}: {summary}, {len(errors)} errors")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
