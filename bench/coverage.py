#!/usr/bin/python3
"""Which compression recipes `pare compress` gets through on every torchvision model.

For each classification and segmentation model of the installed torchvision (Debian's
python3-torchvision 0.14; run with /usr/bin/python3, which has torch), this script:

  1. builds the model with random weights (no download; classifiers get num_classes=10),
  2. picks the smallest input size the model accepts, trying 64, 96, 112, 128 and 224
     (299 last for inception_v3) with one eager forward; ViTs are built for that size
     (image_size=S: only the position embedding changes) and maxvit_t for input_size=(S, S),
  3. settles the batch norms' running statistics on random inputs (train mode, cumulative
     averages over 4 batches of 4), so that a deep random net does not output a constant
     in eval mode (layers initialised to all-zero weights, like ViT's head, get their layer's
     default initialisation first), then scripts the model with torch.jit.script and saves it,
  4. runs each selected recipe through the offline CLI:
       pare compress MODEL.pt --recipe R.json -o OUT.pt --report REPORT.json
                     --device cpu --input-shape 1,3,S,S --latency-budget 0.2
  5. reads the report (MACs, batch-1 p50 latency before and after, the step's notes), or on
     failure the exit code and the CLI's last error line.

Recipes: channel  = {"steps":[{"prune":{"channel":{"amount":0.3}}}]}
         static   = {"steps":[{"quantize":{"static":{"calibrationBatches":2,"observer":"MINMAX"}}}]}

Prints a Markdown table (one row per model) and success totals on stdout, progress on
stderr; with --json FILE also appends one JSON line per model as it finishes, so that a
partial run survives. Quantized, detection, video and optical-flow models are out of scope.

Usage:
  bench/coverage.py [--quick] [--models REGEX] [--recipes channel,static] [--skip-large]
                    [--timeout 900] [--jobs 1] [--threads 0] [--json FILE] [--pare PATH]

  --quick       only a handful of small models (--models may narrow them further)
  --models      a regular expression searched in the model names
  --skip-large  skip models with more than 100M parameters (they are built to count them)
  --jobs N      run up to N recipes of one model at once (N > 1 skews the latencies)
  --pare        the CLI (default $PARE_BIN_DIR/client/pare, PARE_BIN_DIR defaulting to
                the repository's build/). The script waits until that file has stopped
                changing, then runs a private copy of it, so that a rebuild during a long
                run neither breaks it nor mixes two binaries' results.

The CLI times latency at batch 1 only (its default on a CPU); batch 1 is
reported here.
"""
import argparse
import collections
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision
import torchvision.models as tvm
import torchvision.models.segmentation as tvseg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPES = {
    "channel": {"steps": [{"prune": {"channel": {"amount": 0.3}}}]},
    "static": {"steps": [{"quantize": {"static": {"calibrationBatches": 2, "observer": "MINMAX"}}}]},
}

QUICK = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "lraspp_mobilenet_v3_large"]

SIZES = [64, 96, 112, 128, 224]
LARGE_PARAMS = 100_000_000
SETTLE_BATCHES, SETTLE_BATCH_SIZE = 4, 4

# Used only where torchvision has no list_models (it came in 0.14).
FALLBACK_CLASSIFIERS = (
    ["alexnet", "googlenet", "inception_v3", "maxvit_t", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
    + [f"convnext_{s}" for s in ("tiny", "small", "base", "large")]
    + [f"densenet{n}" for n in (121, 161, 169, 201)]
    + [f"efficientnet_b{i}" for i in range(8)] + [f"efficientnet_v2_{s}" for s in "sml"]
    + [f"mnasnet{s}" for s in ("0_5", "0_75", "1_0", "1_3")]
    + [f"regnet_{k}_{s}" for k in "xy" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")]
    + ["regnet_y_128gf"]
    + [f"resnet{n}" for n in (18, 34, 50, 101, 152)]
    + ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
    + [f"shufflenet_v2_x{s}" for s in ("0_5", "1_0", "1_5", "2_0")] + ["squeezenet1_0", "squeezenet1_1"]
    + [f"swin_{s}" for s in "tsb"] + [f"swin_v2_{s}" for s in "tsb"]
    + [f"vgg{n}{bn}" for n in (11, 13, 16, 19) for bn in ("", "_bn")]
    + ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]
)
FALLBACK_SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101",
                         "fcn_resnet50", "fcn_resnet101", "lraspp_mobilenet_v3_large"]


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the machine


def cpu_info():
    """(model name, set of flags) of the first CPU in /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name, flags = fields.get("model name", name), set(fields.get("flags", "").split())
    except OSError:
        pass
    return name, flags


def machine_header(pare):
    """Markdown lines naming the CPU, its vector/matrix flags, cores and versions."""
    name, flags = cpu_info()
    feats = [f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_vnni")]
    amx = sorted(f for f in flags if f.startswith("amx"))
    feats.append(f"amx {'yes (' + ', '.join(amx) + ')' if amx else 'no'}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"# Pare recipe coverage on torchvision {torchvision.__version__} models",
        "",
        f"- CPU: {name}; {', '.join(feats)}; {cores} cores",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}",
        f"- CLI: {pare}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]


# ---------------------------------------------------------------- the models


def all_models():
    """(name, kind) for every classifier and segmentation model; kind is 'cls' or 'seg'."""
    if hasattr(tvm, "list_models"):
        cls = tvm.list_models(module=tvm)
        seg = tvm.list_models(module=tvseg)
    else:
        cls = [n for n in FALLBACK_CLASSIFIERS if hasattr(tvm, n)]
        seg = [n for n in FALLBACK_SEGMENTATION if hasattr(tvseg, n)]
    return [(n, "cls") for n in sorted(cls)] + [(n, "seg") for n in sorted(seg)]


def candidate_sizes(name):
    """Input sizes to try, smallest first."""
    sizes = list(SIZES)
    if name == "inception_v3":
        sizes[-1] = 299
    m = re.fullmatch(r"vit_\w_(\d+)", name)
    if m:  # a ViT's image size must be a multiple of its patch size
        sizes = [s for s in sizes if s % int(m.group(1)) == 0] or [224]
    return sizes


def size_kwargs(name, size):
    """Constructor arguments that fix the input size, for the models that have one."""
    if name.startswith("vit_"):
        return {"image_size": size}
    if name == "maxvit_t":
        return {"input_size": (size, size)}
    return {}


def build(name, kind, size):
    """The model with random weights (eval mode), built for `size` where that matters."""
    if kind == "seg":
        return getattr(tvseg, name)(weights=None, weights_backbone=None).eval()
    kwargs = {"weights": None, "num_classes": 10, **size_kwargs(name, size)}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return getattr(tvm, name)(**kwargs).eval()


def runs_at(model, size):
    """Whether one eager forward of a 1x3xSxS input works."""
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not at this size"
        return False


def build_for_smallest_size(name, kind):
    """(model, size): the first candidate size that runs. Raises when none does."""
    model, built_for, sizes = None, None, candidate_sizes(name)
    for size in sizes:
        if model is None or size_kwargs(name, size) != size_kwargs(name, built_for):
            model, built_for = None, size
            gc.collect()
            try:
                model = build(name, kind, size)
            except ValueError:  # a constructor that checks its size (maxvit_t); the last try raises
                if size == sizes[-1] or not size_kwargs(name, size):
                    raise
                continue
        if runs_at(model, size):
            return model, size
    raise RuntimeError(f"no forward at any of {sizes}")


def settle_batch_norms(model, size):
    """Running statistics from random inputs: cumulative averages over a few train-mode batches."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(SETTLE_BATCHES):
            model(torch.randn(SETTLE_BATCH_SIZE, 3, size, size))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()
    return len(bns)


def revive_zero_layers(model):
    """Re-initialises layers whose weight is all zeros (ViT zero-initialises its head, so a
    random ViT outputs a constant). Returns their names."""
    names = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and w is not None and not w.any():
            m.reset_parameters()
            names.append(name)
    return names


def output_varies(model, size):
    """Whether two random inputs give different outputs (a random deep net can collapse)."""
    with torch.no_grad():
        outs = [model(torch.randn(1, 3, size, size)) for _ in range(2)]
    outs = [o["out"] if isinstance(o, dict) else o for o in outs]
    return not torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-6)


def prepare(name, kind, path, skip_large):
    """Builds, sizes, settles and scripts one model to `path`. Returns the row's model fields."""
    t0 = time.perf_counter()
    model, size = build_for_smallest_size(name, kind)
    params = sum(p.numel() for p in model.parameters())
    info = {"input": [1, 3, size, size], "params": params, "build_s": None}
    if skip_large and params > LARGE_PARAMS:
        info["skipped"] = f"{params / 1e6:.0f}M params > {LARGE_PARAMS / 1e6:.0f}M"
    else:
        revived = revive_zero_layers(model)
        if revived:
            info["reinitialised"] = revived
        settle_batch_norms(model, size)
        if not output_varies(model, size):
            info["warning"] = "the settled model's output does not depend on its input"
        torch.jit.script(model).save(path)
    del model
    gc.collect()
    info["build_s"] = round(time.perf_counter() - t0, 1)
    return info


# ---------------------------------------------------------------- the CLI


def last_error_line(stderr, limit=300):
    """The CLI's error ("pare: ..." and any lines that continue it), else the last non-empty
    line of stderr; on one line, at most `limit` characters."""
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("pare:")]
    text = " ".join(lines[starts[-1]:]) if starts else (lines or [""])[-1]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def run_recipe(pare, model_path, recipe_name, size, work, timeout, threads):
    """Runs one recipe; returns {"ok", "seconds", "report" or "rc"/"error"}."""
    recipe = os.path.join(work, f"{recipe_name}.json")
    with open(recipe, "w") as f:
        json.dump(RECIPES[recipe_name], f)
    out, report = os.path.join(work, f"{recipe_name}.out.pt"), os.path.join(work, f"{recipe_name}.report.json")
    cmd = [pare, "compress", model_path, "--recipe", recipe, "-o", out, "--report", report, "--device", "cpu",
           "--input-shape", f"1,3,{size},{size}", "--latency-budget", "0.2"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "rc": "timeout", "error": f"timed out after {timeout:g} s",
                "seconds": round(time.perf_counter() - t0, 1)}
    result = {"seconds": round(time.perf_counter() - t0, 1)}
    if p.returncode != 0:
        return {**result, "ok": False, "rc": p.returncode, "error": last_error_line(p.stderr)}
    try:
        with open(report) as f:
            result["report"] = json.load(f)
        result["ok"] = True
    except (OSError, ValueError) as e:
        result.update(ok=False, rc=0, error=f"exit 0 but no readable report: {e}")
    for path in (out, report):
        if os.path.exists(path):
            os.remove(path)
    return result


def snapshot_cli(pare, work, settle_s=5, wait_s=600):
    """A private copy of the CLI, taken once it has stopped changing (it may be relinked while
    this runs: every model then meets the same binary). Returns (path, mtime text)."""
    deadline = time.time() + wait_s
    while True:
        try:
            st = os.stat(pare)
            time.sleep(settle_s)
            if os.stat(pare).st_mtime == st.st_mtime and os.access(pare, os.X_OK):
                copy = os.path.join(work, "pare")
                shutil.copy2(pare, copy)
                if subprocess.run([copy, "compress", "--help"], capture_output=True).returncode == 0:
                    return copy, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit(f"{pare} did not become a runnable CLI within {wait_s} s")
        log(f"waiting for {pare} (being built?)")
        time.sleep(30)


# ---------------------------------------------------------------- the reports


def batch1_p50(stats):
    return next((lat["p50_ms"] for lat in stats.get("latency", []) if lat.get("batch") == 1), None)


def normalise_reason(reason):
    """A reason without the layer names it quotes, so that equal reasons count together."""
    # "a grouped convolution (conv1, groups=32)", "aten::chunk ... (`torch.chunk`, line 186 of code/...)"
    reason = re.sub(r"\s*\([^()]*(?:groups=\d+|line \d+ of )[^()]*\)", "", reason)
    return reason.strip()


def intact_reasons(notes):
    """(count of intact groups, {reason: count}) from a 'left intact (n): a, b and 2 more (why); c (why)'
    note (groups left intact for one reason are named together)."""
    for note in notes:
        m = re.match(r"left intact \((\d+)\): (.*)$", note)
        if not m:
            continue
        reasons = collections.Counter()
        for item in m.group(2).split("; "):
            names, sep, why = item.partition(" (")
            if sep and why.endswith(")"):
                more = re.search(r" and (\d+) more$", names)
                count = len(names[:more.start()].split(", ")) + int(more.group(1)) if more else len(names.split(", "))
                reasons[normalise_reason(why[:-1])] += count
        return int(m.group(1)), dict(reasons)
    return 0, {}


def summarise_channel(report):
    before, after = report["steps"][0], report["steps"][-1]
    notes = after.get("notes", [])
    groups = next((re.match(r"channel groups: (\d+), pruned (\d+); channels (\d+) -> (\d+)", n) for n in notes
                   if n.startswith("channel groups:")), None)
    n_intact, reasons = intact_reasons(notes)
    return {
        "groups": int(groups.group(1)) if groups else None,
        "pruned": int(groups.group(2)) if groups else None,
        "channels": [int(groups.group(3)), int(groups.group(4))] if groups else None,
        "macs": [before["stats"].get("macs"), after["stats"].get("macs")],
        "p50_ms": [batch1_p50(before["stats"]), batch1_p50(after["stats"])],
        "intact": n_intact,
        "intact_reasons": reasons,
        "notes": notes,
    }


FLOAT_NOTE = re.compile(r"float|not quantized|no conv or linear|unchanged|kept", re.IGNORECASE)


def summarise_static(report):
    before, after = report["steps"][0], report["steps"][-1]
    notes = after.get("notes", [])
    return {
        "macs": [before["stats"].get("macs"), after["stats"].get("macs")],
        "p50_ms": [batch1_p50(before["stats"]), batch1_p50(after["stats"])],
        "float_notes": [n for n in notes if FLOAT_NOTE.search(n) and "synthetic" not in n],
        "slower": [n for n in notes if n.startswith("WARNING: slower at batch 1 ")],
        "notes": notes,
    }


SUMMARISE = {"channel": summarise_channel, "static": summarise_static}


def summarise(recipe_name, run):
    """A run's JSON-line record: ok, seconds, and either the failure or the report's figures."""
    rec = {k: v for k, v in run.items() if k != "report"}
    if run["ok"]:
        try:
            rec.update(SUMMARISE[recipe_name](run["report"]))
        except (KeyError, IndexError, TypeError) as e:
            rec.update(ok=False, rc=0, error=f"unexpected report layout: {e!r}")
    return rec


# ---------------------------------------------------------------- the table


def count(n):
    if n is None:
        return "?"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def ms(x):
    return "?" if x is None else f"{x:.3g}"


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def failure(rec):
    if rec.get("rc") == "timeout":
        return rec.get("error", "timed out")
    return f"exit {rec.get('rc')}: {rec.get('error', '')}"


def channel_cells(rec):
    if rec is None:
        return ["–"] * 5
    if not rec["ok"]:
        return ["FAIL", "", "", "", cell(failure(rec))]
    reasons = "; ".join(f"{why} ×{n}" for why, n in sorted(rec["intact_reasons"].items(), key=lambda kv: -kv[1]))
    listed = sum(rec["intact_reasons"].values())
    if rec["intact"] > listed:
        reasons += f" (first {listed} of {rec['intact']} listed)"
    groups = f"{rec['pruned']}/{rec['groups']}" if rec["groups"] is not None else "?"
    return ["ok", groups, f"{count(rec['macs'][0])}→{count(rec['macs'][1])}",
            f"{ms(rec['p50_ms'][0])}→{ms(rec['p50_ms'][1])}", cell(reasons)]


def static_cells(rec):
    if rec is None:
        return ["–"] * 3
    if not rec["ok"]:
        return ["FAIL", "", cell(failure(rec))]
    notes = list(rec["float_notes"])
    notes += [re.sub(r"WARNING: slower at batch (\d+).*\(([\d.]+)x\)", r"slower ×\2 at batch \1", n)
              for n in rec["slower"]]
    return ["ok", f"{ms(rec['p50_ms'][0])}→{ms(rec['p50_ms'][1])}", cell("; ".join(notes))]


HEADER = ["model", "input", "params", "s", "channel", "groups pruned/total", "MACs before→after",
          "p50 ms before→after", "intact groups: reasons / failure", "static", "p50 ms fp32→int8",
          "static notes / failure"]


def table_row(row):
    shape = "x".join(map(str, row["input"])) if row.get("input") else "?"
    params = f"{row['params'] / 1e6:.1f}M" if row.get("params") else "?"
    head = [row["model"], shape, params, f"{row.get('seconds', 0):.0f}"]
    if row.get("error"):
        return head + ["FAIL", "", "", "", cell(row["error"]), "FAIL", "", cell(row["error"])]
    if row.get("skipped"):
        return head + ["skipped", "", "", "", cell(row["skipped"]), "skipped", "", ""]
    recs = row["recipes"]
    return head + channel_cells(recs.get("channel")) + static_cells(recs.get("static"))


def totals(rows, recipes):
    lines = []
    attempted = [r for r in rows if not r.get("skipped")]
    names = {"channel": "channel pruning", "static": "static INT8"}
    for name in recipes:
        ok = sum(1 for r in attempted if r.get("recipes", {}).get(name, {}).get("ok"))
        lines.append(f"- {names[name]}: {ok}/{len(attempted)} succeed")
    skipped = len(rows) - len(attempted)
    if skipped:
        lines.append(f"- skipped (>{LARGE_PARAMS / 1e6:.0f}M params): {skipped}")
    broken = sum(1 for r in attempted if r.get("error"))
    if broken:
        lines.append(f"- could not be built or scripted: {broken}")
    return lines


def markdown(rows, recipes, header_lines):
    out = header_lines + ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    out += ["", "Totals:"] + totals(rows, recipes)
    out += ["", "`s`: seconds for the model (build, settle, script, and every recipe). Latencies are batch-1 p50",
            "medians from the CLI's reports (`--latency-budget 0.2`)."]
    return "\n".join(out)


# ---------------------------------------------------------------- the run


def cover_model(name, kind, args, work):
    """One model's row: build it, then run every selected recipe on it."""
    t0 = time.perf_counter()
    row = {"model": name, "kind": kind}
    path = os.path.join(work, f"{name}.pt")
    try:
        row.update(prepare(name, kind, path, args.skip_large))
    except Exception as e:  # noqa: BLE001 - a model that cannot be built or scripted is a result too
        row["error"] = f"build/script: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    log(f"  {name}: input {row.get('input')}, {row.get('params', 0) / 1e6:.1f}M params, "
        f"built in {row.get('build_s', round(time.perf_counter() - t0, 1))} s"
        + (f"; {row['error']}" if row.get("error") else "")
        + (f"; skipped: {row['skipped']}" if row.get("skipped") else "")
        + (f"; re-initialised all-zero {', '.join(row['reinitialised'])}" if row.get("reinitialised") else "")
        + (f"; WARNING: {row['warning']}" if row.get("warning") else ""))
    if not row.get("error") and not row.get("skipped"):
        size = row["input"][-1]

        def one(recipe_name):
            try:
                run = run_recipe(args.cli, path, recipe_name, size, work, args.timeout, args.threads)
            except Exception as e:  # noqa: BLE001 - say what went wrong in the row, keep going
                run = {"ok": False, "rc": "error", "error": f"{type(e).__name__}: {e}", "seconds": 0}
            rec = summarise(recipe_name, run)
            log(f"  {name}: {recipe_name} {'ok' if rec['ok'] else 'FAIL (' + failure(rec) + ')'} "
                f"in {rec['seconds']} s")
            return recipe_name, rec

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            row["recipes"] = dict(pool.map(one, args.recipes))
    if os.path.exists(path):
        os.remove(path)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def selected_models(args):
    models = all_models()
    if args.quick:
        models = [(n, k) for n, k in models if n in QUICK]
    if args.models:
        models = [(n, k) for n, k in models if re.search(args.models, n)]
    return models


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_pare = os.path.join(os.environ.get("PARE_BIN_DIR") or os.path.join(REPO, "build"), "client", "pare")
    ap.add_argument("--pare", default=default_pare, help="the pare CLI (default: %(default)s)")
    ap.add_argument("--recipes", default="channel,static", help="comma-separated: " + ",".join(RECIPES))
    ap.add_argument("--models", help="regular expression searched in model names")
    ap.add_argument("--quick", action="store_true", help="only a handful of small models: " + ", ".join(QUICK))
    ap.add_argument("--skip-large", action="store_true", help="skip models with more than 100M parameters")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per CLI run (default %(default)g)")
    ap.add_argument("--jobs", type=int, default=1, help="recipes of one model run at once (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="the CLI's --threads (0: LibTorch's default)")
    ap.add_argument("--json", help="append one JSON line per model to this file")
    ap.add_argument("--from-json", nargs="+",
                    help="print the table of earlier (possibly partial) --json files, run nothing; a model's "
                         "row in a later file replaces its row in an earlier one")
    args = ap.parse_args()
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.from_json:
        return args
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown or not args.recipes:
        ap.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if not os.path.exists(args.pare):
        ap.error(f"no CLI at {args.pare} (build it, or set PARE_BIN_DIR or --pare)")
    return args


def main():
    args = parse_args()
    if args.from_json:
        by_model = {}
        for path in args.from_json:
            with open(path) as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        by_model[row["model"]] = row
        order = [name for name, _ in all_models()]
        rows = sorted(by_model.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
        listed = {name for name, _ in all_models()}
        missing = sorted(listed - {r["model"] for r in rows})
        header = machine_header("the runs recorded in " + ", ".join(args.from_json))[:-1]
        if missing:
            header.append(f"- not run ({len(missing)}): {', '.join(missing)}")
        print(markdown(rows, args.recipes, header))
        return
    models = selected_models(args)
    if not models:
        sys.exit("no model matches")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pare-coverage-") as work:
        args.cli, built = snapshot_cli(args.pare, work)
        header = machine_header(f"{args.pare} (built {built}; a copy taken at the start is run)")
        log(f"{len(models)} models, recipes {', '.join(args.recipes)}, timeout {args.timeout:g} s per run")
        for i, (name, kind) in enumerate(models, 1):
            log(f"[{i}/{len(models)}] {name}")
            row = cover_model(name, kind, args, work)
            rows.append(row)
            log(f"[{i}/{len(models)}] {name} done in {row['seconds']} s")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(markdown(rows, args.recipes, header))


if __name__ == "__main__":
    main()
