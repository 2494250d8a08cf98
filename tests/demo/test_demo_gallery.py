"""`make demo`'s flow on the tiny models, and its gallery opened in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# A page that loads the gallery in a frame and writes, into its own DOM, how many images the
# gallery has and how many of them failed to load; Chromium's --dump-dom prints that DOM.
HARNESS = """<!doctype html><html><body><iframe id="g" src="index.html"></iframe><script>
document.getElementById("g").onload = function () {
  const images = Array.from(this.contentDocument.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
  const sections = this.contentDocument.querySelectorAll("section h2");
  document.body.setAttribute("data-result", JSON.stringify({
    images: images.length, broken: broken,
    titles: Array.from(sections).map(h => h.textContent)}));
};
</script></body></html>"""


def test_demo_runs_end_to_end_and_every_gallery_image_loads(tiny_cache, tmp_path, monkeypatch):
    from scripts import demo

    monkeypatch.setenv("MODEL_CACHE_DIR", str(tiny_cache))
    monkeypatch.setenv("IMAGEN_DEVICE", "cpu")
    # A shell that ran `eval "$(terraform output -raw client_env)"` (docs/deploy.md), and more a
    # deployment's environment holds: the stack runs on its own (its output bucket, which the
    # emulator does not have, stopped it; its folders left the demo's uploads unseen).
    for name, value in {"IMAGEN_OUTPUT_BUCKET": "my-prod-out", "IMAGEN_INPUT_PREFIX": "uploads/",
                        "IMAGEN_OUTPUT_PREFIX": "results/", "IMAGEN_FAILED_PREFIX": "errors/",
                        "IMAGEN_RESULTS_TOPIC": "projects/prod/topics/results",
                        "IMAGEN_PUSH_AUDIENCE": "https://imagen.example.run.app",
                        "IMAGEN_PUSH_SERVICE_ACCOUNTS": "push@prod.iam.gserviceaccount.com"}.items():
        monkeypatch.setenv(name, value)
    output_dir = tmp_path / "demo-output"
    assert demo.main(output_dir=output_dir, work_dir=tmp_path / "work") == 0
    page = (output_dir / "index.html").read_text()
    assert "Tiny random-weight models" in page
    for operation in ("upscale", "enhance", "comic", "remove-background", "remove-background,upscale"):
        assert f"/processed/{operation}/" in page
    assert "ImageDecodeError" in page  # the broken file's failure report is shown too

    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    harness = output_dir / "check.html"
    harness.write_text(HARNESS)
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", harness.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    import html
    import json

    found = re.search(r'data-result="([^"]*)"', dom)
    assert found, dom[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["broken"] == [] and result["images"] >= 10, result
    assert len(result["titles"]) == 6
