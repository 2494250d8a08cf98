"""`make demo`: the main job end to end on the local stack, with a before/after gallery.

Starts the Pub/Sub and Cloud Storage emulators, a pull worker and `imagen serve` behind a push
subscription; uploads sample pictures (drawn by the project) for every operation, one chain and
one broken file; waits for each output or failure report; downloads them to ./demo-output/ and
writes demo-output/index.html. Uses the real models when MODEL_CACHE_DIR holds them complete,
the tiny random-weight ones otherwise (and says so). Every process it starts is stopped.
"""

from __future__ import annotations

import html
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from handlers.clients import storage_client
from handlers.localstack import LocalStack, choose_models
from handlers.settings import Settings
from scripts import samples

ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = ROOT / ".demo"
OUTPUT_DIR = ROOT / "demo-output"
BUCKET = "imagen-demo"
TIMEOUT_SECONDS = 900


def jobs(tiny: bool) -> list[dict]:
    scale = 1 if tiny else 2  # real models get larger inputs (the tiny ones are for speed)
    size = lambda w, h: (w * scale, h * scale)  # noqa: E731
    few_steps = {"steps": 4} if tiny else {}
    return [
        {"name": "incoming/upscale/lighthouse.png", "image": samples.landscape(size(64, 48)),
         "params": few_steps, "title": "upscale ×4"},
        {"name": "incoming/enhance/meadow.png", "image": samples.landscape(size(128, 96)),
         "params": few_steps, "title": "enhance (SDXL refiner)"},
        {"name": "incoming/comic/street.png", "image": samples.street(size(128, 96)),
         "params": few_steps, "title": "comic (Ghibli style)"},
        {"name": "incoming/remove-background/teapot.png", "image": samples.still_life(size(96, 96)),
         "params": {}, "title": "remove-background"},
        {"name": "incoming/remove-background,upscale/badge.png", "image": samples.badge(size(48, 48)),
         "params": few_steps, "title": "chain: remove-background,upscale"},
        {"name": "incoming/upscale/not-a-picture.png", "data": b"this is a text file, not a PNG\n",
         "params": {}, "title": "a broken file"},
    ]


def output_name(job: dict) -> str:
    operation, _, rel = job["name"][len("incoming/"):].partition("/")
    return f"processed/{operation}/{rel.rsplit('.', 1)[0]}.png"


def failure_name(job: dict) -> str:
    return "failed/" + job["name"][len("incoming/"):] + ".json"


def main(output_dir: Path = OUTPUT_DIR, work_dir: Path = WORK_DIR) -> int:
    settings = Settings.from_env()
    cache_dir, tiny = choose_models(settings.model_cache_dir, work_dir / "models")
    shutil.rmtree(output_dir, ignore_errors=True)
    (output_dir / "inputs").mkdir(parents=True)
    (output_dir / "outputs").mkdir(parents=True)
    stack = LocalStack(work_dir / "run", cache_dir, bucket=BUCKET, device=settings.device)
    print("starting the local stack (emulators, worker, imagen serve)...", flush=True)
    try:
        stack.start()
        bucket = storage_client(stack.settings()).bucket(BUCKET)
        todo = jobs(tiny)
        for job in todo:
            data = job.get("data") or samples.png(job["image"])
            (output_dir / "inputs" / Path(job["name"]).name).write_bytes(data)
            blob = bucket.blob(job["name"])
            blob.metadata = {"imagen-params": json.dumps(job["params"])} if job["params"] else None
            blob.upload_from_string(data, content_type="image/png")
            print(f"uploaded gs://{BUCKET}/{job['name']}", flush=True)
        results = wait_for_results(bucket, todo, output_dir)
    finally:
        stack.stop()
    page = write_gallery(results, tiny, cache_dir, output_dir)
    failed = [r for r in results if r["status"] == "missing"]
    for result in results:
        print(f"{result['status']:>9}  {result['where']}")
    if failed:
        print(f"{len(failed)} job(s) produced nothing; logs: {stack.log_dir}", file=sys.stderr)
    print(f"gallery: {page}")
    return 1 if failed else 0


def wait_for_results(bucket, todo: list[dict], output_dir: Path) -> list[dict]:
    pending = {job["name"]: job for job in todo}
    results: dict[str, dict] = {}
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while pending and time.monotonic() < deadline:
        for name, job in list(pending.items()):
            output = bucket.get_blob(output_name(job))
            report = bucket.get_blob(failure_name(job))
            if output is not None:
                local = output_dir / "outputs" / Path(output.name).name
                local.write_bytes(output.download_as_bytes())
                results[name] = {"job": job, "status": "succeeded", "where": f"gs://{BUCKET}/{output.name}",
                                 "local": local, "metadata": output.metadata or {}}
            elif report is not None:
                results[name] = {"job": job, "status": "failed", "where": f"gs://{BUCKET}/{report.name}",
                                 "report": json.loads(report.download_as_bytes())}
            else:
                continue
            print(f"{results[name]['status']}: {results[name]['where']}", flush=True)
            del pending[name]
        time.sleep(0.5)
    for name, job in pending.items():
        results[name] = {"job": job, "status": "missing", "where": f"gs://{BUCKET}/{output_name(job)}"}
    return [results[job["name"]] for job in todo]


def write_gallery(results: list[dict], tiny: bool, cache_dir: Path, output_dir: Path) -> Path:
    if tiny:
        banner = ("<p class='warn'><b>Tiny random-weight models.</b> These outputs come from small "
                  "models with random weights, built offline by <code>imagen models pull --tiny</code>: "
                  "they show that every path works end to end (sizes, transparency, metadata, failure "
                  "reports), and look like noise by design. Run <code>imagen models pull</code> for the "
                  "real models, then <code>make demo</code> again.</p>")
    else:
        banner = f"<p class='ok'>Real models from <code>{html.escape(str(cache_dir))}</code>.</p>"
    cards = []
    for result in results:
        job = result["job"]
        source = f"inputs/{html.escape(Path(job['name']).name)}"
        facts = [("operation", job["title"]), ("source", f"gs://{BUCKET}/{job['name']}")]
        if result["status"] == "succeeded":
            meta = result["metadata"]
            facts += [("model", meta.get("imagen-model", "?")), ("parameters", meta.get("imagen-params", "{}")),
                      ("seconds", meta.get("imagen-seconds", "?")), ("output", result["where"])]
            right = f"<img src='outputs/{html.escape(result['local'].name)}' alt='output'>"
        elif result["status"] == "failed":
            error = result["report"]["error"]
            facts += [("failure report", result["where"]), ("error", f"{error['type']}: {error['message']}")]
            right = "<div class='failed'>failure report written, nothing else</div>"
        else:
            right = "<div class='failed'>no result before the time limit</div>"
        left = (f"<img src='{source}' alt='input'>" if "image" in job
                else "<div class='failed'>(not an image)</div>")
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
        cards.append(f"<section class='card {result['status']}'><h2>{html.escape(job['title'])} — "
                     f"{result['status']}</h2><div class='pair'><figure>{left}<figcaption>input</figcaption>"
                     f"</figure><figure>{right}<figcaption>output</figcaption></figure></div>"
                     f"<table>{rows}</table></section>")
    page = output_dir / "index.html"
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imagen demo</title><style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #fafafa; color: #222; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c060; padding: .8rem; }}
.ok {{ background: #e6f4ea; border: 1px solid #8c8; padding: .8rem; }}
.card {{ background: white; border: 1px solid #ddd; margin: 1rem 0; padding: 1rem; }}
.pair {{ display: flex; gap: 1rem; align-items: flex-start; }}
figure {{ margin: 0; }}
img {{ max-width: 420px; image-rendering: pixelated; min-width: 160px;
  background: repeating-conic-gradient(#ccc 0 25%, #fff 0 50%) 0 0 / 16px 16px; }}
.failed {{ color: #a00; padding: 1rem; border: 1px dashed #a00; }}
th {{ text-align: left; padding-right: 1rem; vertical-align: top; }}
td {{ font-family: monospace; word-break: break-all; }}
</style></head><body><h1>imagen demo</h1>{banner}{''.join(cards)}</body></html>
""")
    return page


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # The stack's processes run in sessions of their own, out of a terminal's or a CI runner's
    # reach: a SIGTERM or a closed terminal must go through main's `finally` and stop them.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    sys.exit(main())
