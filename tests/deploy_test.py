#!/usr/bin/python3
"""Checks deploy/ and the Dockerfile without a cluster or a Docker engine, against the real binaries.

Kubernetes (deploy/k8s, kustomize base + overlays):
  * every file is valid YAML; each overlay's resources resolve (files exist, no duplicates);
  * every overlay is rendered with `kubectl kustomize` (Debian's kubernetes-client where the
    machine has no kubectl), and the checks below read the rendered objects: they must be the
    files' objects, each in namespace pare with the label app.kubernetes.io/part-of=pare;
  * every container port a probe or Service names exists; every volumeMount has a volume;
    every secret/configMap referenced exists in the base; every $(VAR) in args is a ConfigMap key;
  * the security context is restricted (non-root, read-only root, no privilege escalation,
    ALL capabilities dropped, RuntimeDefault seccomp); the grace period covers the drain;
  * the GPU overlay asks for nvidia.com/gpu and tolerates GPU nodes;
  * the container args are flags the binaries accept: pare-server is started with them (paths
    and ports mapped to a temporary folder) and must serve; pare-worker must get past flag
    parsing and keep trying to reach its server.
Docker: every shared library `ldd` finds for the three binaries comes from a package that the
runtime stage installs, or that one of those pulls in (apt's dependency closure), or Debian's
base image has.

Usage: deploy_test.py  (PARE_BIN_DIR from ctest)
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
BIN = os.environ["PARE_BIN_DIR"]
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL", what)


def load_kustomization(path):
    """All documents of a kustomization (recursively), with the file each came from."""
    k = yaml.safe_load(open(os.path.join(path, "kustomization.yaml")))
    docs = []
    for r in k.get("bases", []) + k.get("resources", []):
        full = os.path.normpath(os.path.join(path, r))
        if os.path.isdir(full):
            docs += load_kustomization(full)
        else:
            check(os.path.exists(full), f"{path}: resource {r} does not exist")
            for d in yaml.safe_load_all(open(full)):
                if d:
                    docs.append((full, d))
    # Patches that delete a resource ("$patch: delete") take it out.
    for p in k.get("patchesStrategicMerge", []):
        full = os.path.join(path, p)
        check(os.path.exists(full), f"{path}: patch {p} does not exist")
        for d in yaml.safe_load_all(open(full)) if os.path.exists(full) else []:
            if d and d.get("$patch") == "delete":
                gone = (d["kind"], d["metadata"]["name"])
                check(any((x["kind"], x["metadata"]["name"]) == gone for _, x in docs),
                      f"{path}: {p} deletes {gone}, which no base holds")
                docs = [(f, x) for f, x in docs if (x["kind"], x["metadata"]["name"]) != gone]
    return docs


def render(path):
    """The objects `kubectl kustomize` renders from a kustomization, as a cluster would get them
    (namespace, labels and patches applied), each with the kustomization it came from."""
    r = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, f"kubectl kustomize {path}: {r.stderr.strip()[-1000:]}")
    return [(path, d) for d in yaml.safe_load_all(r.stdout) if d] if r.returncode == 0 else []


def pod_specs(docs):
    for f, d in docs:
        if d.get("kind") == "Deployment":
            yield f, d, d["spec"]["template"]["spec"]


def check_k8s():
    base = load_kustomization(os.path.join(K8S, "base"))
    config = next(d for _, d in base if d["kind"] == "ConfigMap")
    secrets = {d["metadata"]["name"]: d for _, d in base if d["kind"] == "Secret"}
    pvcs = {d["metadata"]["name"] for _, d in base if d["kind"] == "PersistentVolumeClaim"}
    for overlay in ("cpu", "gpu", "ha", "ha-db-blobs"):
        files = load_kustomization(os.path.join(K8S, "overlays", overlay))
        docs = render(os.path.join(K8S, "overlays", overlay))
        secrets_here = dict(secrets, **{d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Secret"})
        names = [(d["kind"], d["metadata"]["name"]) for _, d in docs]
        check(len(names) == len(set(names)), f"overlay {overlay}: duplicate resources {names}")
        check(sorted(names) == sorted((d["kind"], d["metadata"]["name"]) for _, d in files),
              f"overlay {overlay}: kubectl kustomize renders {sorted(names)}, the files hold "
              f"{sorted((d['kind'], d['metadata']['name']) for _, d in files)}")
        for _, d in docs:
            what = f"overlay {overlay}: {d['kind']} {d['metadata']['name']}"
            check(d["metadata"].get("namespace") == "pare", f"{what} is not in namespace pare")
            check(d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "pare",
                  f"{what} lacks the label app.kubernetes.io/part-of=pare")
        kinds = {k for k, _ in names}
        for kind in ("Deployment", "Service", "ConfigMap", "Secret", "ServiceMonitor", "PodDisruptionBudget"):
            check(kind in kinds, f"overlay {overlay}: no {kind}")
        # Every overlay keeps its blobs on a volume, except the one that keeps them in PostgreSQL.
        check(("PersistentVolumeClaim" in kinds) == (overlay != "ha-db-blobs"),
              f"overlay {overlay}: {'no' if overlay != 'ha-db-blobs' else 'a'} PersistentVolumeClaim")
        ports_by_app = {}
        for f, d, spec in pod_specs(docs):
            name = d["metadata"]["name"]
            sel = d["spec"]["selector"]["matchLabels"]
            check(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items()),
                  f"{name}: selector does not match the pod labels")
            psc = spec.get("securityContext", {})
            check(psc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
            check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            grace = spec.get("terminationGracePeriodSeconds", 30)
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                check(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation")
                check(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
                check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities drop ALL")
                for m in c.get("volumeMounts", []):
                    check(m["name"] in volumes, f"{name}: volumeMount {m['name']} has no volume")
                for v in volumes.values():
                    if "secret" in v:
                        check(v["secret"]["secretName"] in secrets_here, f"{name}: secret {v['secret']['secretName']}")
                        for item in v["secret"].get("items", []):
                            check(item["key"] in secrets_here[v["secret"]["secretName"]]["stringData"],
                                  f"{name}: secret {v['secret']['secretName']} has no key {item['key']}")
                    if "persistentVolumeClaim" in v:
                        check(v["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: pvc")
                for ref in c.get("envFrom", []):
                    check(ref["configMapRef"]["name"] == config["metadata"]["name"], f"{name}: configmap ref")
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                ports_by_app[d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]] = ports
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if probe in c:
                        port = c[probe]["grpc"]["port"]
                        check(port in ports.values() or port in ports, f"{name}: {probe} port {port} is not a container port")
                args = " ".join(c.get("args", []))
                env = {e["name"]: e for e in c.get("env", [])}
                for var in re.findall(r"\$\((\w+)\)", args):
                    check(var in config["data"] or var in env, f"{name}: $({var}) is neither in the ConfigMap nor env")
                for e in env.values():
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        check(ref["key"] in secrets_here.get(ref["name"], {}).get("stringData", {}),
                              f"{name}: env {e['name']} names secret {ref['name']} key {ref['key']}, which does not exist")
                drain = [int(config["data"][v]) for v in re.findall(r"--drain-seconds=\$\((\w+)\)", args)]
                for dsec in drain:
                    check(grace >= dsec + 5, f"{name}: grace period {grace}s does not cover a {dsec}s drain")
                if "server" in c["name"]:
                    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                        check(probe in c and "grpc" in c[probe], f"{name}: no gRPC {probe}")
                    check(c["readinessProbe"]["grpc"].get("service") == "pare.readiness",
                          f"{name}: readiness must ask for pare.readiness")
                if overlay == "gpu" and "gpu" in name:
                    check(c["resources"]["limits"].get("nvidia.com/gpu") == 1, f"{name}: nvidia.com/gpu limit")
                    check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])),
                          f"{name}: no GPU toleration")
                    check("nodeSelector" in spec, f"{name}: no node selector")
        for _, d in docs:
            if d["kind"] == "Service":
                app = d["spec"]["selector"]["app.kubernetes.io/name"]
                for p in d["spec"]["ports"]:
                    check(p["targetPort"] in ports_by_app.get(app, {}),
                          f"Service {d['metadata']['name']}: targetPort {p['targetPort']} not a port of {app}")
            if d["kind"] == "ServiceMonitor":
                svc = [s for _, s in docs if s["kind"] == "Service" and
                       s["metadata"]["labels"].get("app.kubernetes.io/name") ==
                       d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]]
                check(any(p["name"] == d["spec"]["endpoints"][0]["port"] for s in svc for p in s["spec"]["ports"]),
                      "ServiceMonitor: its port is not a named Service port")
        if overlay.startswith("ha"):
            check_ha(docs, blobs_in_db=overlay == "ha-db-blobs")
        print(f"ok   overlay {overlay}: {len(docs)} resources")
    return base, config, secrets


def check_ha(docs, blobs_in_db):
    """The ha overlays: replicated servers on PostgreSQL, a shared blob volume or the blobs in the
    database (then no shared volume at all), KEDA per worker kind."""
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    server = by[("Deployment", "pare-server")]
    check(server["spec"]["replicas"] >= 2, "ha: pare-server has fewer than 2 replicas")
    check(server["spec"]["strategy"]["type"] == "RollingUpdate", "ha: pare-server is not rolled one at a time")
    c = server["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    check("--store=$(PARE_STORE_URL)" in args, f"ha: pare-server does not take its store from the secret: {args}")
    check(any(a.startswith("--store-password-file=") for a in args), "ha: no --store-password-file")
    check(not any("password" in a and "=" in a and not a.startswith("--store-password-file=") for a in args),
          "ha: a password on the command line")
    check(c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "pare-db", "ha: the store URL is not from Secret pare-db")
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    if blobs_in_db:
        check("--blob-store=postgresql" in args, f"ha-db-blobs: the blobs are not in PostgreSQL: {args}")
        check(not any(d["kind"] == "PersistentVolumeClaim" for _, d in docs), "ha-db-blobs: a volume claim is left")
        check(set(volumes["data"]) == {"emptyDir", "name"},
              f"ha-db-blobs: /data must be a replica's own emptyDir: {volumes['data']}")
    else:
        check(not any(a.startswith("--blob-store") for a in args), f"ha: --blob-store given: {args}")
        check(by[("PersistentVolumeClaim", "pare-data")]["spec"]["accessModes"] == ["ReadWriteMany"],
              "ha: the blob volume is not ReadWriteMany")
        check(volumes["data"].get("persistentVolumeClaim", {}).get("claimName") == "pare-data",
              "ha: /data is not the shared volume")
    pdb = by[("PodDisruptionBudget", "pare-server")]["spec"]
    check(pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb,
          "ha: the server PDB must let one replica go and keep the others")
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for _, d in docs if d["kind"] == "ScaledObject"}
    for worker, device, floor in (("pare-worker-cpu", "cpu", 1), ("pare-worker-gpu", "cuda", 0)):
        check(("Deployment", worker) in by, f"ha: ScaledObject target {worker} is not a Deployment")
        so = scaled.get(worker)
        check(so is not None, f"ha: no ScaledObject for {worker}")
        if so:
            check(so["spec"]["minReplicaCount"] == floor, f"ha: {worker} min replicas {so['spec']['minReplicaCount']}")
            q = so["spec"]["triggers"][0]["metadata"]["query"]
            check("pare_jobs_queued" in q and device in q and q.startswith("max("),
                  f"ha: {worker}'s trigger must follow max(pare_jobs_queued) of its device: {q}")


def run_binaries(base, config, secrets):
    work = tempfile.mkdtemp(prefix="pare-deploy-")
    secret = secrets["pare-tokens"]["stringData"]
    os.makedirs(os.path.join(work, "tokens"))
    for k, v in secret.items():
        with open(os.path.join(work, "tokens", k), "w") as f:
            f.write(v)
    mapping = {"/data": os.path.join(work, "data"), "/etc/pare/tokens": os.path.join(work, "tokens"),
               "/work": os.path.join(work, "work"), "0.0.0.0:50051": "127.0.0.1:0", "0.0.0.0:9090": "127.0.0.1:0",
               "pare-server-workers:50051": "127.0.0.1:1"}
    os.makedirs(mapping["/work"])

    def real_args(c):
        out = []
        for a in c["args"]:
            a = re.sub(r"\$\((\w+)\)", lambda m: config["data"][m.group(1)], a)
            flag, _, value = a.partition("=")
            for k in sorted(mapping, key=len, reverse=True):  # one mapping, on the value's prefix
                if value.startswith(k):
                    value = mapping[k] + value[len(k):]
                    break
            out.append(f"{flag}={value}")
        return out

    for f, d, spec in pod_specs(base):
        before = len(failures)
        c = spec["containers"][0]
        binary = os.path.join(BIN, "server" if "server" in c["command"][0] else "worker", os.path.basename(c["command"][0]))
        args = real_args(c)
        p = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if "server" in binary:
            line = p.stdout.readline()
            check("listening on" in line, f"pare-server with the manifest's args did not serve: {line} "
                                          f"{p.stderr.read() if p.poll() is not None else ''}")
            p.send_signal(signal.SIGTERM)
            check(p.wait(timeout=30) == 0, "pare-server did not drain and exit 0 on SIGTERM")
        else:
            time.sleep(2)
            rc = p.poll()
            err = "" if rc is None else p.stderr.read()
            check(rc is None, f"pare-worker with the manifest's args exited ({rc}): {err[-500:]}")
            p.kill()
            p.wait()
        if len(failures) == before:
            print(f"ok   {d['metadata']['name']}: {os.path.basename(binary)} accepts {' '.join(c['args'])}")


def package_of(path):
    for candidate in (path, path.replace("/usr/lib/", "/lib/", 1)):
        r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":")[0]
    return None


def check_docker():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    runtime = text[text.index("AS runtime"):]
    install = re.search(r"apt-get install -y --no-install-recommends(.*?)&&", runtime, re.S).group(1)
    wanted = set(install.replace("\\", " ").split())
    # Debian's base image (bookworm-slim) has the essential packages; apt adds the closure.
    closure = set(wanted)
    r = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                        "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", *sorted(wanted)],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(?:\|)?Depends: <?([^>\s]+)>?", line)
        if m:
            closure.add(m.group(1).split(":")[0])
        elif line and not line.startswith(" "):
            closure.add(line.strip().split(":")[0])
    essential = set(subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Essential}\n"], capture_output=True,
                                   text=True).stdout.split("\n"))
    essential = {l.split()[0] for l in essential if l.endswith(" yes")}
    libs = set()
    for b in ("server/pare-server", "worker/pare-worker", "client/pare"):
        out = subprocess.run(["ldd", os.path.join(BIN, b)], capture_output=True, text=True).stdout
        check("not found" not in out, f"ldd {b}: a library is not found")
        libs |= {os.path.realpath(m) for m in re.findall(r"=> (\S+) \(", out)}
    missing = {}
    for lib in sorted(libs):
        pkg = package_of(lib)
        if pkg is None:
            missing[lib] = "no Debian package owns it"
        elif pkg not in closure and pkg not in essential:
            missing[lib] = pkg
    for lib, why in missing.items():
        check(False, f"Dockerfile runtime stage lacks {why} (for {lib})")
    print(f"ok   Dockerfile: {len(libs)} libraries of the binaries, all from {len(wanted)} runtime packages "
          f"and their {len(closure)}-package closure" if not missing else "")


def main():
    if not shutil.which("kubectl"):
        print("FAIL: kubectl is not installed (scripts/install-deps.sh installs Debian's kubernetes-client)")
        return 1
    base, config, secrets = check_k8s()
    run_binaries(base, config, secrets)
    check_docker()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
