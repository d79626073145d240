"""The fixture's report.html as a browser shows it: headless Chromium renders it to a screenshot.

Skipped, with the reason, where no Chromium is installed (`apt-get install chromium` provides it).
"""

from __future__ import annotations

import re
import subprocess

from PIL import Image

from tests.local_processes import CHROMIUM_FLAGS, require_chromium

BROWSER_FLAGS = [*CHROMIUM_FLAGS, "--hide-scrollbars", "--window-size=1280,4000"]


def test_every_image_is_embedded_as_a_data_uri(built_report):
    page = (built_report / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r"<img\b[^>]*\bsrc=['\"]([^'\"]*)['\"]", page)
    assert sources, "the report has no <img> tags"
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert len(re.findall(r"<img\b", page)) == len(sources)  # no <img> without a src either


def test_report_renders_in_headless_chromium(built_report, tmp_path):
    chromium = require_chromium()
    screenshot = tmp_path / "report.png"
    command = [chromium, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
               (built_report / "report.html").resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert screenshot.is_file(), f"Chromium wrote no screenshot (exit {completed.returncode}): {completed.stderr[-2000:]}"
    with Image.open(screenshot) as image:
        assert image.size == (1280, 4000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    # a blank page has one colour and plain text a few dozen; embedded plots bring hundreds
    assert colours is not None and len(colours) > 200, f"only {len(colours or [])} distinct colours: a blank page?"
    # the page's figures are drawn: viridis heatmap cells and coloured markers are far from grey
    saturated = sum(count for count, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 80)
    assert saturated > 2000
