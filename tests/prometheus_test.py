#!/usr/bin/python3
"""The dashboard and the alerts against Debian's real Prometheus, scraping a real Pare.

1. pare-server starts with a local worker; its /metrics is read once before any job: every
   series the dashboard reads is already there as 0.
2. Real jobs run through the CLI: two that succeed (downloaded too), one that fails
   (quantize.fp16 on a CPU worker), and a refused submission.
3. `prometheus` scrapes it every second; once it has samples, every panel query in
   deploy/grafana/pare-dashboard.json runs through Prometheus's HTTP API and must return data,
   and every alert expression in deploy/prometheus/pare-rules.yml must be accepted (the rules
   are also loaded by Prometheus itself, each evaluated without error, and checked by promtool).
4. `promtool test rules deploy/prometheus/pare-rules.test.yml`: synthetic series on which every
   alert must fire (after its `for:`) and must stay quiet; the same tests must fail when any
   alert's expression is replaced by one that never fires or always fires.

Usage: prometheus_test.py  (PARE_BIN_DIR and PARE_FIXTURES from ctest; needs `prometheus`)
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ["PARE_BIN_DIR"]
FIXTURES = os.environ["PARE_FIXTURES"]
PARE = os.path.join(BIN, "client", "pare")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "pare-dashboard.json")
RULES = os.path.join(ROOT, "deploy", "prometheus", "pare-rules.yml")


RULE_TESTS = os.path.join(ROOT, "deploy", "prometheus", "pare-rules.test.yml")


def promtool_rule_tests():
    """`promtool test rules` on synthetic series: every alert must fire in one case and stay
    quiet in another, and the tests must catch an alert that never fires and one that always
    does. Returns the failures."""
    failures = []
    r = subprocess.run(["promtool", "test", "rules", RULE_TESTS], capture_output=True, text=True,
                       cwd=os.path.dirname(RULE_TESTS))
    if r.returncode != 0:
        return ["promtool test rules: " + r.stdout + r.stderr]
    print("ok   promtool test rules " + os.path.basename(RULE_TESTS))
    rules = yaml.safe_load(open(RULES))
    alerts = [rule["alert"] for g in rules["groups"] for rule in g["rules"] if "alert" in rule]
    tests = yaml.safe_load(open(RULE_TESTS))
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    for name in alerts:
        fires = any(c["alertname"] == name and c.get("exp_alerts") for c in cases)
        quiet = any(c["alertname"] == name and not c.get("exp_alerts") for c in cases)
        if not (fires and quiet):
            failures.append(f"{os.path.basename(RULE_TESTS)} lacks a case where {name} "
                            f"{'fires' if not fires else 'stays quiet'}")
    # Each alert broken both ways, one at a time: the unit tests must fail.
    with tempfile.TemporaryDirectory() as work:
        shutil.copy(RULE_TESTS, work)
        for name in alerts:
            for broken in ("vector(1) < 0", "vector(1)"):
                mutated = yaml.safe_load(open(RULES))
                for g in mutated["groups"]:
                    for rule in g["rules"]:
                        if rule.get("alert") == name:
                            rule["expr"] = broken
                with open(os.path.join(work, "pare-rules.yml"), "w") as f:
                    yaml.safe_dump(mutated, f)
                r = subprocess.run(["promtool", "test", "rules", os.path.basename(RULE_TESTS)], cwd=work,
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    failures.append(f"the rule tests pass with {name}'s expression replaced by `{broken}`")
    if not failures:
        print(f"ok   the rule tests fail when any of {len(alerts)} alerts never fires or always fires")
    return failures


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def query(prom, expr):
    body = json.loads(get(f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    if body.get("status") != "success":
        raise AssertionError(f"{expr}: {body}")
    return body["data"]["result"]


def pare(server, *args, check=True):
    r = subprocess.run([PARE, "--server", server, *args], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"pare {' '.join(args)}: {r.returncode} {r.stderr}")
    return r


def main():
    if not shutil.which("prometheus") or not shutil.which("promtool"):
        print("FAIL: Debian's prometheus package is not installed (scripts/install-deps.sh installs it)")
        return 1
    rule_failures = promtool_rule_tests()
    work = tempfile.mkdtemp(prefix="pare-prom-")
    procs = []
    try:
        server = subprocess.Popen([os.path.join(BIN, "server", "pare-server"), "--listen", "127.0.0.1:0",
                                   "--metrics-listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data"),
                                   "--local-workers", "1", "--worker-threads", "1"],
                                  stdout=subprocess.PIPE, stderr=open(os.path.join(work, "server.log"), "w"), text=True)
        procs.append(server)
        line = server.stdout.readline()
        m = re.search(r"listening on (\S+).*metrics on http://(\S+)/metrics", line)
        assert m, f"pare-server printed: {line!r}"
        address, metrics = m.group(1), m.group(2)

        # Every series a panel reads exists before anything happened.
        page = get(f"http://{metrics}/metrics")
        for series in ['pare_jobs{state="queued"} 0', 'pare_jobs_failed_total{reason="internal"} 0',
                       'pare_jobs_succeeded_total 0', 'pare_lease_expiries_total 0', 'pare_workers_busy{device="cuda"} 0',
                       'pare_step_duration_seconds_count{device="cpu",step="prune.channel"} 0',
                       'pare_grpc_requests_total{code="INVALID_ARGUMENT",method="/pare.v1.Compression/SubmitJob"} 0',
                       'pare_build_info{libtorch="']:
            assert series in page, f"/metrics lacks {series} at start-up"

        # Real work.
        model = pare(address, "upload-model", os.path.join(FIXTURES, "small_cnn.pt"), "--input-shape",
                     "1,1,28,28").stdout.strip()
        recipes = {
            "ok1": {"steps": [{"prune": {"magnitude": {"amount": 0.5}}}, {"quantize": {"dynamic": {}}}]},
            "ok2": {"steps": [{"prune": {"channel": {"amount": 0.5, "roundTo": 1}}}]},
            "gpu": {"steps": [{"quantize": {"fp16": {}}}]},
        }
        jobs = {}
        for name, recipe in recipes.items():
            path = os.path.join(work, name + ".json")
            with open(path, "w") as f:
                json.dump(recipe, f)
            r = pare(address, "submit", "--model", model, "--recipe", path, "--device", "cpu", "--wait", check=False)
            jobs[name] = (r.returncode, r.stdout.split("\n")[0])
        assert jobs["ok1"][0] == 0 and jobs["ok2"][0] == 0, jobs
        assert jobs["gpu"][0] != 0, jobs
        for name in ("ok1", "ok2"):
            pare(address, "download", jobs[name][1], "-o", os.path.join(work, name + ".pt"))
        bad = os.path.join(work, "bad.json")
        with open(bad, "w") as f:
            f.write('{"steps": [{"prune": {"magnitude": {"amount": 7}}}]}')
        assert pare(address, "submit", "--model", model, "--recipe", bad, check=False).returncode != 0

        # Prometheus, scraping every second, with the alert rules loaded.
        port = free_port()
        prom = f"127.0.0.1:{port}"
        shutil.copy(RULES, os.path.join(work, "pare-rules.yml"))
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": ["pare-rules.yml"],
                "scrape_configs": [{"job_name": "pare-server", "static_configs": [{"targets": [metrics]}]}],
            }, f)
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/tsdb",
             f"--web.listen-address={prom}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w")))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if query(prom, 'count_over_time(up{job="pare-server"}[1m]) >= 6'):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("prometheus did not scrape pare-server: " +
                                 open(os.path.join(work, "prometheus.log")).read()[-2000:])
        # One more job while Prometheus watches, so rates see it change.
        pare(address, "submit", "--model", model, "--recipe", os.path.join(work, "ok1.json"), "--device", "cpu",
             "--wait")
        time.sleep(4)

        failures = list(rule_failures)
        dashboard = json.load(open(DASHBOARD))
        exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
        assert len(exprs) >= 20, "the dashboard has fewer queries than expected"
        for title, expr in exprs:
            try:
                result = query(prom, expr)
                if not result:
                    failures.append(f"panel '{title}': no data for {expr}")
                else:
                    print(f"ok   panel '{title}': {expr} -> {len(result)} series")
            except Exception as e:
                failures.append(f"panel '{title}': {expr}: {e}")
        # Figures that must reflect the work above.
        assert float(query(prom, "sum(pare_jobs_succeeded_total)")[0]["value"][1]) >= 3
        assert float(query(prom, 'sum(pare_jobs_failed_total{reason="needs_gpu"})')[0]["value"][1]) >= 1
        assert float(query(prom, 'sum(pare_workers_connected{device="cpu"})')[0]["value"][1]) >= 1

        r = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append("promtool check rules: " + r.stdout + r.stderr)
        rules = yaml.safe_load(open(RULES))
        alerts = [rule for g in rules["groups"] for rule in g["rules"] if "alert" in rule]
        for name in ("PareServerDown", "PareNoWorkers", "PareQueueBackingUp", "PareJobFailureRate"):
            if name not in [a["alert"] for a in alerts]:
                failures.append(f"alert {name} is missing")
        for a in alerts:
            try:
                query(prom, a["expr"])
                print(f"ok   alert {a['alert']}: valid")
            except Exception as e:
                failures.append(f"alert {a['alert']}: {e}")
        # Every rule evaluated without error ("unknown" until its first evaluation: wait for it).
        deadline = time.time() + 30
        while True:
            loaded = json.loads(get(f"http://{prom}/api/v1/rules"))
            rules_now = {r["name"]: r for g in loaded["data"]["groups"] for r in g["rules"]}
            if all(rules_now.get(a["alert"], {}).get("health") == "ok" for a in alerts) or time.time() > deadline:
                break
            time.sleep(0.5)
        for a in alerts:
            got = rules_now.get(a["alert"], {})
            if got.get("health") != "ok":
                failures.append(f"alert {a['alert']} has health {got.get('health')} in Prometheus: "
                                f"{got.get('lastError', '')}")
        # A healthy service with a connected worker: neither pending nor firing.
        for name in ("PareServerDown", "PareNoWorkers", "PareLocalWorkersRestarting"):
            if rules_now.get(name, {}).get("state") != "inactive":
                failures.append(f"{name} is {rules_now.get(name, {}).get('state')} on a healthy service")
        for f in failures:
            print("FAIL", f)
        return 1 if failures else 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
