"""The HTML report renders in a real browser (headless Chromium) and shows what the JSON holds.

1. `pare compress --report-html` of a small trained CNN (channel pruning, then static INT8, an
   eval set): the page is self-contained (nothing fetched from elsewhere), Chromium renders it
   (a screenshot with more than one colour), its steps table has one row per step and its plot
   one point per step, with the step names and the accuracy axis.
   The same for the `analyze` step: its per-layer table renders as bars, one row per layer.
2. `pare report FILE --html` of a report holding a search's trials and a sensitivity table: one
   point per trial, the Pareto front marked on the right ones, one bar row per layer.
3. `pare compress --report-html` of a real `auto` search: one point per trial it built, its
   table of trials and the recipe that rebuilds the result.
4. A file that is not a report is refused with a message that says so.
SKIPPED (exit 77) where no Chromium is installed (scripts/install-deps.sh installs it).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pare_cli import BIN, compress  # noqa: E402

FIXTURES = os.environ.get("PARE_FIXTURES", "")


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser(exe, html, work, *args):
    """Runs headless Chromium on a local file; returns its stdout."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={os.path.join(work, 'profile')}", *args, "file://" + html]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"chromium failed ({r.returncode}): {r.stderr[-800:]}"
    return r.stdout


def check_self_contained(text):
    for pattern in (r"\ssrc\s*=", r"\shref\s*=", r"@import", r"url\(", r"<script", r"<link"):
        assert not re.search(pattern, text, re.I), f"the page refers to something outside it: {pattern}"


def rendered_dom(exe, html, work):
    dom = browser(exe, html, work, "--dump-dom")
    assert "<html" in dom, dom[:300]
    return dom


def screenshot_has_content(exe, html, work):
    png = os.path.join(work, "shot.png")
    browser(exe, html, work, f"--screenshot={png}", "--window-size=1000,1400")
    assert os.path.getsize(png) > 5000, "the screenshot is (nearly) empty"
    try:
        import torchvision.io as tio
        img = tio.read_image(png)
        colours = img.reshape(img.shape[0], -1).unique(dim=1).shape[1]
        assert colours > 8, f"the page rendered as {colours} colour(s)"
    except ImportError:
        pass


def main():
    exe = chromium()
    if not exe:
        print("SKIPPED: no chromium on this machine (scripts/install-deps.sh installs it)")
        return 77
    work = tempfile.mkdtemp(prefix="pare-html-")
    try:
        # 1. A real job's report.
        html = os.path.join(work, "job.html")
        _, report = compress(os.path.join(FIXTURES, "small_cnn_trained.pt"),
                             [{"prune": {"channel": {"amount": 0.3}}},
                              {"quantize": {"static": {"observer": "MINMAX", "calibrationBatches": 4}}}],
                             [(1, 1, 28, 28)], work,
                             extra=["--eval", os.path.join(FIXTURES, "quadrants_eval.pt"),
                                    "--calibration", os.path.join(FIXTURES, "quadrants_train.pt"),
                                    "--report-html", html])
        text = open(html).read()
        check_self_contained(text)
        dom = rendered_dom(exe, html, work)
        steps = [s["step"] for s in report["steps"]]
        rows = re.findall(r'<tr class="step">', dom)
        assert len(rows) == len(steps) == 3, (steps, len(rows))
        points = re.findall(r'<circle class="point', dom)
        assert len(points) == len(steps), f"{len(points)} points for {len(steps)} steps"
        for name in steps:
            assert f">{name}<" in dom, f"the page does not name step {name}"
        assert "top-1 accuracy" in dom, "an eval set was given: the plot's axis is accuracy"
        assert "Pareto front" in dom
        screenshot_has_content(exe, html, work)

        # 1b. The analyze step's table, from a real job: one bar row per layer.
        html_a = os.path.join(work, "analyze.html")
        _, analysed = compress(os.path.join(FIXTURES, "small_cnn_trained.pt"),
                               [{"analyze": {"pruneAmounts": [0.5]}}], [(1, 1, 28, 28)], work,
                               extra=["--eval", os.path.join(FIXTURES, "quadrants_eval.pt"),
                                      "--calibration", os.path.join(FIXTURES, "quadrants_train.pt"),
                                      "--report-html", html_a])
        layers = [row["layer"] for row in analysed["sensitivity"]]
        assert layers == ["conv1", "conv2", "fc1", "fc2"], layers
        dom = rendered_dom(exe, html_a, work)
        assert len(re.findall(r'<tr class="layer">', dom)) == 4, "one sensitivity row per layer"
        for name in layers:
            assert f">{name}<" in dom
        assert "latency_share" in dom and "pruned 0.50" in dom and ">int8<" in dom

        # 2. A search's trials and a sensitivity table (the JSON as the auto and analyze steps
        #    write it), rendered from a file.
        synthetic = dict(report)
        synthetic["trials"] = [
            {"name": f"trial {i}", "stats": {"latency": [{"batch": 1, "p50_ms": ms}], "top1_accuracy": acc}}
            for i, (ms, acc) in enumerate([(10, 0.90), (6, 0.89), (4, 0.80), (7, 0.85), (12, 0.91)], 1)]
        # A failed trial has no figures (reports before 2026-12-03 wrote "stats": null for it).
        synthetic["trials"].append({"name": "trial 6", "error": "accuracy control kept every layer float",
                                    "stats": None})
        synthetic["sensitivity"] = [{"layer": "conv1", "latency_share": 0.4, "int8_drop": 0.01},
                                    {"layer": "conv2", "latency_share": 0.5, "int8_drop": 0.03},
                                    {"layer": "fc1", "latency_share": 0.1}]
        src = os.path.join(work, "synthetic.json")
        with open(src, "w") as f:
            json.dump(synthetic, f)
        html2 = os.path.join(work, "search.html")
        r = subprocess.run([BIN, "report", src, "--html", html2], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        dom = rendered_dom(exe, html2, work)
        assert len(re.findall(r'<circle class="point', dom)) == 5, "one point per trial"
        front = re.findall(r'<circle class="point front"[^>]*><title>([^<:]*):', dom)
        # Trial 3 (4 ms), 2 (6 ms), 1 (10 ms, 0.90) and 5 (12 ms, 0.91) are not dominated; 4 is.
        assert sorted(front) == ["trial 1", "trial 2", "trial 3", "trial 5"], front
        assert len(re.findall(r'<tr class="layer">', dom)) == 3
        assert len(re.findall(r'<rect class="bar"', dom)) == 5, "one bar per numeric cell"

        # 3. A real auto search (pare compress --report-html): one point per built trial, the
        #    search's table with a row per trial, and the recipe that rebuilds the result.
        html3 = os.path.join(work, "auto.html")
        _, searched = compress(os.path.join(FIXTURES, "small_cnn_trained.pt"),
                               [{"auto": {"maxAccuracyDrop": 2, "timeBudgetSeconds": 120,
                                          "methods": ["quantize.static", "optimize", "prune.channel"]}}],
                               [(1, 1, 28, 28)], work,
                               extra=["--eval", os.path.join(FIXTURES, "quadrants_eval.pt"),
                                      "--report-html", html3])
        built = [t for t in searched["trials"] if "error" not in t]
        assert len(built) >= 4, searched["trials"]
        dom = rendered_dom(exe, html3, work)
        assert len(re.findall(r'<circle class="point', dom)) == len(built), "one point per trial"
        assert "The recipe that rebuilds the result" in dom
        assert dom.count("</tr>") >= len(searched["trials"]) + 1, "a row per trial"

        # 4. Not a report: JSON without steps, steps of the wrong types, a file that does not exist.
        for i, text in enumerate(['{"steps":"x"}', '{"steps":[null]}',
                                  '{"steps":[{"step":"s","stats":{"size_bytes":"big"}}]}']):
            path = os.path.join(work, f"types{i}.json")
            with open(path, "w") as f:
                f.write(text)
            r = subprocess.run([BIN, "report", path, "--html", os.path.join(work, "t.html")],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode not in (0, -6, 134) and "report" in r.stderr, (text, r.returncode, r.stderr)
        r = subprocess.run([BIN, "report", os.path.join(work, "missing.json"), "--html", os.path.join(work, "m.html")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "no such file" in r.stderr, (r.returncode, r.stderr)
        bad = os.path.join(work, "bad.json")
        with open(bad, "w") as f:
            f.write('{"hello": 1}')
        r = subprocess.run([BIN, "report", bad, "--html", os.path.join(work, "x.html")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "not a Pare report" in r.stderr, r.stderr
        print("report_html_test: passed")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
