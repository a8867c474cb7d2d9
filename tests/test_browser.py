"""The explorer widget in a real browser: JupyterLab with a live kernel, driven by headless Chromium.

Opens a notebook that displays the explorer, runs it, moves the block slider with the keyboard and
checks that the displayed map changes. Screenshots land in `test-artifacts/`. Needs Debian's
`chromium` and the `playwright` package (`.ci/run` installs both); skipped with the reason where
either is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

NOTEBOOK_CELLS = [
    "import mmdit_probe\n"
    "from mmdit_probe.viz import explorer\n"
    "probe = mmdit_probe.load('toy')\n"
    "probe.pipeline.set_progress_bar_config(disable=True)\n"
    "out = probe.generate('on the left a large red circle and on the right a small blue square "
    "on a white background', seed=0, steps=4, record=True)",
    "explorer(out.maps)",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server (no token, no browser) serving a notebook that shows the explorer."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    root, config = tmp_path / "notebooks", tmp_path / "config"
    root.mkdir()
    nbformat.write(notebook, root / "explorer.ipynb")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={root}", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_CONFIG_DIR": str(config)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_block_slider_changes_the_displayed_map(lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/explorer.ipynb")
            page.locator(".jp-Notebook").wait_for(timeout=60_000)
            page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for(timeout=60_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()

            image = page.locator(".jupyter-widgets img").first
            image.wait_for(timeout=60_000)
            caption = page.locator(".widget-html-content", has_text="block").first
            sync_api.expect(caption).to_contain_text("block 0", timeout=30_000)
            before_src, before_png = image.get_attribute("src"), image.screenshot()
            page.screenshot(path=ARTIFACTS / "explorer_block0.png")

            slider = page.locator(".widget-slider", has_text="block").first
            slider.locator(".noUi-handle").focus()
            page.keyboard.press("ArrowRight")
            sync_api.expect(caption).to_contain_text("block 1", timeout=30_000)
            sync_api.expect(image).not_to_have_attribute("src", before_src, timeout=30_000)
            after_png = image.screenshot()
            page.screenshot(path=ARTIFACTS / "explorer_block1.png")
        except Exception:
            page.screenshot(path=ARTIFACTS / "explorer_failure.png")
            raise
        finally:
            browser.close()
    assert after_png != before_png, "the block slider moved but the displayed map stayed the same"
