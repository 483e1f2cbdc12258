#!/usr/bin/env python3
"""The cross-reference checker must fail: each test breaks one thing in a rendered overlay
and asserts that check_refs reports it (and that the unbroken renders pass).

Reads the renders of scripts/test-cluster.sh from $OTTER_RENDERED_DIR (cpu-demo.yaml,
gpu.yaml, ha.yaml) and the reference job from configs/local-job.yaml.

  OTTER_RENDERED_DIR=DIR python3 -m unittest tests/cluster/test_check_refs.py
"""

import copy
import os
import sys
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import check_refs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
RENDERED = os.environ.get("OTTER_RENDERED_DIR", "")


def load(overlay):
    path = os.path.join(RENDERED, f"{overlay}.yaml")
    if not os.path.exists(path):
        raise unittest.SkipTest(f"{path} missing: run scripts/test-cluster.sh (it renders the overlays)")
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


with open(os.path.join(ROOT, "configs", "local-job.yaml")) as f:
    REFERENCE = yaml.safe_load(f)


def find(docs, kind, name_prefix):
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(hits) == 1, f"{kind}/{name_prefix}*: {len(hits)} objects"
    return hits[0]


def container(docs, kind, name):
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def job_cm(docs):
    return find(docs, "ConfigMap", "otter-job")


def edit_job(docs, fn):
    cm = job_cm(docs)
    job = yaml.safe_load(cm["data"]["job.yaml"])
    fn(job)
    cm["data"]["job.yaml"] = yaml.safe_dump(job)


class CheckRefs(unittest.TestCase):
    overlay = "gpu"

    def docs(self, overlay=None):
        return copy.deepcopy(load(overlay or self.overlay))

    def assertReports(self, docs, *fragments):
        errors = check_refs.check(docs, REFERENCE)
        text = "\n".join(errors)
        for frag in fragments:
            self.assertIn(frag, text, f"expected an error containing {frag!r}, got:\n{text or '(no errors)'}")
        return errors

    # --- the renders as shipped -------------------------------------------------------
    def test_shipped_overlays_pass(self):
        for overlay in ("cpu-demo", "gpu", "ha"):
            with self.subTest(overlay=overlay):
                self.assertEqual(check_refs.check(load(overlay), REFERENCE), [])

    # --- selectors --------------------------------------------------------------------
    def test_service_selector_that_selects_nothing(self):
        d = self.docs()
        find(d, "Service", "otter-coord")["spec"]["selector"]["app.kubernetes.io/component"] = "coordinater"
        self.assertReports(d, "Service/otter-coord: selector", "matches no pod template")

    def test_service_target_port_missing(self):
        d = self.docs()
        find(d, "Service", "otter-workers")["spec"]["ports"][0]["targetPort"] = "metric"
        self.assertReports(d, "Service/otter-workers: port metrics: targetPort metric")

    def test_servicemonitor_selector_and_port(self):
        d = self.docs()
        find(d, "ServiceMonitor", "otter-workers")["spec"]["endpoints"][0]["port"] = "http"
        self.assertReports(d, "ServiceMonitor/otter-workers: endpoint port http is not a port name of Service/otter-workers")
        d = self.docs()
        find(d, "ServiceMonitor", "otter-coord")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "coord"
        self.assertReports(d, "ServiceMonitor/otter-coord: selector", "matches no Service")

    def test_pdb_selector(self):
        d = self.docs()
        find(d, "PodDisruptionBudget", "otter-worker")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "workers"
        self.assertReports(d, "PodDisruptionBudget/otter-worker: selector")

    def test_statefulset_service_not_headless(self):
        d = self.docs()
        del find(d, "Service", "otter-workers")["spec"]["clusterIP"]
        self.assertReports(d, "Service/otter-workers: is a StatefulSet's serviceName but not headless")

    # --- references -------------------------------------------------------------------
    def test_missing_configmap_secret_pvc(self):
        d = self.docs()
        vols = find(d, "Deployment", "otter-coord")["spec"]["template"]["spec"]["volumes"]
        next(v for v in vols if v["name"] == "job")["configMap"]["name"] = "otter-job"  # without the hash suffix
        self.assertReports(d, "volume job: ConfigMap otter-job not found")
        d = self.docs()
        d.remove(find(d, "Secret", "otter-join-token"))
        self.assertReports(d, "Deployment/otter-coord: volume join-token: Secret", "StatefulSet/otter-worker: volume join-token: Secret")
        d = self.docs()
        d.remove(find(d, "PersistentVolumeClaim", "otter-checkpoints"))
        self.assertReports(d, "PersistentVolumeClaim otter-checkpoints not found")

    def test_secret_key_missing(self):
        d = self.docs()
        s = find(d, "Secret", "otter-join-token")
        s["data"] = {"tokn": s["data"]["token"]}
        self.assertReports(d, "has no key token")

    def test_mount_without_volume_and_unused_objects(self):
        d = self.docs()
        c = container(d, "StatefulSet", "otter-worker")
        next(m for m in c["volumeMounts"] if m["name"] == "dshm")["name"] = "shm"
        self.assertReports(d, "mounts volume shm, which is neither a volume nor a volumeClaimTemplate", "volume dshm is mounted by no container")
        d = self.docs("ha")
        d.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "otter-coord-state"}, "spec": {}})
        self.assertReports(d, "PersistentVolumeClaim/otter-coord-state: is used by no pod")

    def test_env_refs(self):
        d = self.docs()
        c = container(d, "StatefulSet", "otter-worker")
        c["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}})
        c["args"] = [a.replace("$(POD_IP)", "$(POD_ADDR)") for a in c["args"]]
        self.assertReports(d, "env X: Secret nope not found", "uses $(POD_ADDR), which is not in env")

    def test_probe_and_annotation_ports(self):
        d = self.docs()
        container(d, "Deployment", "otter-coord")["readinessProbe"]["grpc"]["port"] = 50052
        find(d, "StatefulSet", "otter-worker")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9402"
        self.assertReports(d, "readinessProbe.grpc port 50052 is not a declared container port", "prometheus.io/port 9402")

    # --- command lines ----------------------------------------------------------------
    def test_args_agree_with_objects(self):
        d = self.docs()
        c = container(d, "StatefulSet", "otter-worker")
        c["args"][c["args"].index("otter-coord:50051")] = "otter-coordinator:50051"
        c["args"][c["args"].index("--gpus") + 1] = "4"
        self.assertReports(d, "--coord otter-coordinator:50051: no Service", "--gpus 4 but the nvidia.com/gpu limit is 8")
        d = self.docs()
        c = container(d, "Deployment", "otter-coord")
        c["args"][c["args"].index("--token-file") + 1] = "/etc/otter/token"
        self.assertReports(d, "--token-file /etc/otter/token is on volume job (configMap), expected secret")

    def test_etcd_members(self):
        d = self.docs("ha")
        c = container(d, "Deployment", "otter-coord")
        i = c["args"].index("--etcd") + 1
        c["args"][i] = c["args"][i].replace("otter-etcd-2", "otter-etcd-3")
        self.assertReports(d, "--etcd http://otter-etcd-3.otter-etcd:2379: otter-etcd-3 is not a pod")
        d = self.docs("ha")
        find(d, "StatefulSet", "otter-etcd")["spec"]["replicas"] = 5
        self.assertReports(d, "--initial-cluster lists")

    # --- network policies ---------------------------------------------------------------
    def test_network_policy_blocks_the_job(self):
        d = self.docs()
        np = find(d, "NetworkPolicy", "otter-worker")
        np["spec"]["ingress"][0]["ports"] = [{"protocol": "TCP", "port": 29500}]
        self.assertReports(d, "rank to rank between StatefulSet/otter-worker pods (any TCP port)", "is blocked")
        d = self.docs()
        find(d, "NetworkPolicy", "otter-coord")["spec"]["ingress"][1]["ports"][0]["port"] = 9401
        self.assertReports(d, "Prometheus scraping Deployment/otter-coord (TCP 9400) is blocked", "ingress port 9401 is not a container port")
        d = self.docs("ha")
        d.remove(find(d, "NetworkPolicy", "otter-coord-etcd"))
        self.assertReports(d, "Deployment/otter-coord -> etcd StatefulSet/otter-etcd (TCP 2379) is blocked")
        d = self.docs()
        d.remove(find(d, "NetworkPolicy", "otter-dns"))
        self.assertReports(d, "DNS from StatefulSet/otter-worker (UDP 53) is blocked")

    def test_network_policy_selects_nothing(self):
        d = self.docs()
        find(d, "NetworkPolicy", "otter-worker")["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "oter"
        self.assertReports(d, "NetworkPolicy/otter-worker: podSelector")

    # --- the job YAML -------------------------------------------------------------------
    def test_job_paths_on_volumes(self):
        d = self.docs()
        edit_job(d, lambda j: j["train"].__setitem__("out_dir", "/scratch/run"))
        self.assertReports(d, "train.out_dir /scratch/run is on no volume of Deployment/otter-coord", "of StatefulSet/otter-worker")
        d = self.docs()
        edit_job(d, lambda j: j["train"].__setitem__("out_dir", "/data/run"))
        self.assertReports(d, "train.out_dir /data/run is on a read-only mount")
        d = self.docs()
        edit_job(d, lambda j: j["model"].__setitem__("dir", "models/otter"))
        self.assertReports(d, "model.dir 'models/otter' must be an absolute path")

    def test_job_keys_and_yaml(self):
        d = self.docs()
        edit_job(d, lambda j: j["train"].__setitem__("learning_rate", 1e-5))
        self.assertReports(d, "keys differ from the reference job", "train.learning_rate")
        d = self.docs()
        job_cm(d)["data"]["job.yaml"] = "model: [unclosed"
        self.assertReports(d, "job.yaml is not YAML")

    def test_job_fits_the_workers(self):
        d = self.docs()
        find(d, "StatefulSet", "otter-worker")["spec"]["replicas"] = 5
        self.assertReports(d, "has 5 replicas, outside coord.min_nodes..max_nodes = 2..4")
        d = self.docs("cpu-demo")
        edit_job(d, lambda j: j["train"].__setitem__("device", "cuda"))
        self.assertReports(d, "train.device cuda but StatefulSet/otter-worker runs CPU ranks")

    # --- security -----------------------------------------------------------------------
    def test_security_context(self):
        d = self.docs()
        c = container(d, "StatefulSet", "otter-worker")
        c["securityContext"]["readOnlyRootFilesystem"] = False
        c["securityContext"]["capabilities"] = {"add": ["IPC_LOCK"]}
        c["securityContext"]["runAsUser"] = 0
        self.assertReports(d, "readOnlyRootFilesystem is not true", "does not drop ALL capabilities", "adds capabilities", "runAsUser 0")
        d = self.docs("ha")
        spec = find(d, "StatefulSet", "otter-etcd")["spec"]["template"]["spec"]
        del spec["securityContext"]["seccompProfile"]
        del spec["automountServiceAccountToken"]
        find(d, "ServiceAccount", "otter")["automountServiceAccountToken"] = True
        self.assertReports(d, "StatefulSet/otter-etcd container etcd: seccompProfile is not RuntimeDefault", "StatefulSet/otter-etcd: mounts a service account token")


if __name__ == "__main__":
    unittest.main()
