"""End to end in a real JupyterLab in headless Chromium, against a real local server.

A notebook loads the extension, watches a training client, trains a few steps, inspects a
datum, compares the run with its base model and opens the step panel; the test asserts that
the loss plot, the token inspector, the comparison and the step panel render inside
`.jp-OutputArea-output`, clicks "step" and sees the step counter
advance, and saves a screenshot (to $WB_ARTIFACTS if set, else the test's tmp dir).

Needs Debian's chromium (/usr/bin/chromium, `apt-get install -y chromium`) and Playwright
for Python (`pip install playwright jupyterlab`); never `playwright install` (it downloads
a browser). Skipped, saying which is missing, only when one of them is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

CHROMIUM = os.environ.get("WB_CHROMIUM", "/usr/bin/chromium")

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="Playwright for Python is not installed"),
    pytest.mark.skipif(shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None,
                       reason="JupyterLab is not installed in this environment"),
]

CELLS = [
    "%load_ext kernel_ext\nservice = %tinker connect",
    "from workbench import types\n"
    "tc = service.create_lora_training_client('tiny-qwen3', rank=4, seed=0)\n"
    "ids = tc.get_tokenizer().encode('the sky is blue and the grass is green', add_special_tokens=False)\n"
    "data = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),\n"
    "                    loss_fn_inputs={'target_tokens': ids[1:], 'weights': [0.0] * 3 + [1.0] * (len(ids) - 4)})]\n"
    "batches = [data]",
    "%tinker watch tc",
    "for _ in range(3):\n"
    "    tc.forward_backward(data, 'cross_entropy')\n"
    "    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()",
    "%tinker inspect data --client tc",
    "%tinker compare tc base --prompts \"['the sky is']\" --max-tokens 6 --temperature 0",
    "%tinker step tc --batches batches --lr 0.01",
]



def _write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, str(path))


@pytest.fixture
def lab(server, tmp_path):
    root, config = tmp_path / "root", tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    root.mkdir()
    # The announcements plugin would try to fetch news; the machine may be offline.
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    _write_notebook(root / "e2e.ipynb")
    port = free_port()
    env = {**os.environ, "WORKBENCH_URL": server.url, "WORKBENCH_API_KEY": server.api_key,
           "JUPYTER_CONFIG_DIR": str(config), "IPYTHONDIR": str(tmp_path / "ipython")}
    cmd = [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", "--allow-root",
           f"--port={port}", "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=",
           "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", f"--ServerApp.root_dir={root}",
           f"--LabApp.workspaces_dir={tmp_path / 'ws'}"]
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start; log:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.25)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _accept_kernel_dialog(page) -> None:
    """JupyterLab sometimes asks which kernel to start even when the notebook names one."""
    try:
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=3_000)
    except Exception:
        return
    page.locator(".jp-Dialog .jp-mod-accept").first.click()
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)


def test_notebook_widgets_render_and_step_advances(lab, tmp_path):
    artifacts = Path(os.environ.get("WB_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"{lab}/lab/tree/e2e.ipynb")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            _accept_kernel_dialog(page)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            out = ".jp-OutputArea-output"
            page.wait_for_selector(f"{out} .wb-step-panel", timeout=120_000)
            # The loss plot (plotly renders an SVG per trace group), the token inspector, the panel.
            page.wait_for_selector(f"{out} .js-plotly-plot .scatterlayer .trace", timeout=60_000)
            page.wait_for_selector(f"{out} .wb-token-inspector .wb-token", timeout=60_000)
            # The side-by-side view: static HTML, each token's hover naming both models' logprobs.
            page.wait_for_selector(f"{out} .wb-compare .wb-compare-pair .wb-token", timeout=60_000)
            title = page.locator(f"{out} .wb-compare .wb-token").first.get_attribute("title")
            assert "logprob A" in title and "logprob B" in title
            count = page.locator(f"{out} .wb-step-count")
            page.wait_for_function(
                "() => { const e = document.querySelector('.jp-OutputArea-output .wb-step-count');"
                " return e && e.textContent.trim() === '3'; }", timeout=60_000)
            assert page.locator(f"{out} .wb-token-inspector .wb-token").count() > 5
            page.locator(f"{out} button.wb-step").click()
            page.wait_for_function(
                "() => document.querySelector('.jp-OutputArea-output .wb-step-count')"
                ".textContent.trim() === '4'", timeout=60_000)
            assert count.first.text_content().strip() == "4"
            shot = artifacts / "kernel_ext_e2e.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        except Exception:
            page.screenshot(path=str(artifacts / "kernel_ext_e2e_failed.png"), full_page=True)
            outputs = page.eval_on_selector_all(".jp-OutputArea-output", "els => els.map(e => e.innerHTML)")
            (artifacts / "kernel_ext_e2e_failed.html").write_text("\n<hr>\n".join(outputs))
            raise
        finally:
            browser.close()
