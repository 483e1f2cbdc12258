#!/usr/bin/env python3
"""Schema validation of rendered manifests with kubernetes-validate (its bundled,
offline JSON schemas), strict: unknown fields are errors.

  validate.py --k8s 1.30 [--k8s 1.37] RENDERED.yaml...

Kinds without a built-in schema fail, except the CRD kinds of check_refs.CRD_KINDS
(ServiceMonitor), which are skipped here, by name, and checked by check_refs.py instead
(apiVersion, selector, endpoints).
"""

import argparse
import functools
import os
import sys

import yaml
import kubernetes_validate.utils as kv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_refs import CRD_KINDS, ref  # noqa: E402

# kubernetes-validate reads and parses the schema files (the definitions file is several
# MB) again for every object: parse each once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k8s", action="append", required=True, help="Kubernetes version(s) to validate against")
    ap.add_argument("rendered", nargs="+")
    a = ap.parse_args(argv)
    failed = False
    for path in a.rendered:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        valid = skipped = 0
        for d in docs:
            if CRD_KINDS.get(d.get("kind")) == d.get("apiVersion"):
                skipped += 1
                print(f"SKIP  {path}: {ref(d)}: {d['apiVersion']} is a CRD, no built-in schema (checked by check_refs.py)")
                continue
            ok = True
            for version in a.k8s:
                try:
                    kv.validate(d, version, strict=True)
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {path}: {ref(d)} (Kubernetes {version}): {where}: {e.message}")
                    ok = False
                except kv.SchemaNotFoundError as e:
                    print(f"ERROR {path}: {ref(d)}: {e.message}")
                    ok = False
                except kv.VersionNotSupportedError as e:
                    print(f"ERROR kubernetes-validate {kv.__version__} does not know Kubernetes {e.version}")
                    return 2
            valid += ok
            failed |= not ok
        print(f"validate: {path}: {len(docs)} objects, {valid} valid against Kubernetes {', '.join(a.k8s)} (strict), {skipped} CRD skipped, {len(docs) - valid - skipped} invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
