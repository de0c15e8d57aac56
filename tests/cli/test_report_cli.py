"""`nnopt report` and the demo's report.html, opened in headless Chromium to check what a reader sees."""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import pytest

from nnopt.cli import main

CHROMIUM = "/usr/bin/chromium"
VARIANTS = (
    "baseline", "pruned", "quantized", "pruned+quantized", "gradual", "gradual+quantized",
    "int8-static", "qat-int8", "int4-weight-g32", "structured-50", "cluster-4bit", "int8-dynamic-measured",
)
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                    reason=f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")

# Appended to a copy of the page: once it has loaded and been laid out, write into the DOM what
# rendered (figures drawn with a non-zero size, tables, and the variant names in the first table).
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var drawn = Array.prototype.filter.call(document.querySelectorAll("figure > svg, figure > img"), function (el) {
    var box = el.getBoundingClientRect();
    return box.width > 100 && box.height > 50 && el.querySelectorAll("path, use").length > 10;
  });
  var names = Array.prototype.map.call(document.querySelector("#variants table").querySelectorAll("tbody th .name"),
                                       function (el) { return el.textContent; });
  var out = document.createElement("pre");
  out.id = "nnopt-check";
  out.textContent = JSON.stringify({figures: document.querySelectorAll("figure").length, drawn: drawn.length,
                                    tables: document.querySelectorAll("table").length, names: names});
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A real demo run, as short as its config allows (the report, not the accuracy, is under test)."""
    from nnopt.pipeline.classic import ClassicConfig, run_classic

    out = tmp_path_factory.mktemp("report") / "demo"
    config = ClassicConfig(epochs=1, gradual_epochs=1, latency_seconds=0.0, latency_batches=(1, 8))
    run_classic(config, out, progress=False)
    return out


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=2000", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def test_demo_writes_report_html_and_report_rebuilds_it(demo_dir, capsys):
    page = (demo_dir / "report.html").read_text()
    markdown = (demo_dir / "report.md").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Smaller but not faster on this device" in page
    capsys.readouterr()
    assert main(["report", str(demo_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {demo_dir / 'report.html'}",
                                                    f"wrote {demo_dir / 'report.md'}"]
    # the same document gives the same files, so the demo's and `nnopt report`'s pages are one page
    assert (demo_dir / "report.html").read_text() == page
    assert (demo_dir / "report.md").read_text() == markdown
    assert not [p.name for p in demo_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_demo_output_with_report_html_is_still_replaceable(demo_dir):
    # a later `nnopt demo --out` replaces the directory (the names of an earlier report include report.html)
    from nnopt.io.atomic import check_replaceable
    from nnopt.pipeline.classic import _report_names

    assert "report.html" in _report_names()
    check_replaceable(demo_dir, _report_names())  # raises OutputError for a file it does not know


@needs_chromium
def test_report_html_renders_in_chromium(demo_dir, tmp_path):
    checked = tmp_path / "checked.html"
    checked.write_text((demo_dir / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = chromium(checked, tmp_path / "profile", "--dump-dom").stdout
    found = re.search(r'<pre id="nnopt-check">(.*?)</pre>', dom, flags=re.S)
    assert found, "the check script did not run"
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["drawn"] == seen["figures"] >= 3  # accuracy/size, latency, energy: each drawn, none empty
    assert seen["tables"] >= 3
    assert tuple(seen["names"]) == VARIANTS

    shot = tmp_path / "page.png"
    chromium(demo_dir / "report.html", tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,3000",
             "--hide-scrollbars")
    assert shot.stat().st_size > 50_000
    from PIL import Image

    pixels = Image.open(shot).convert("RGB").resize((320, 750))
    colours = pixels.getcolors(maxcolors=320 * 750)
    background = max(colours)[0]
    assert len(colours) > 500  # text, plots and colour swatches, not a blank or one-colour page
    assert background < 0.85 * 320 * 750  # more than 15% of the page differs from its background


def test_report_refuses_a_directory_without_report_json(tmp_path, expect_error):
    expect_error(["report", str(tmp_path)], "has no report.json: not an nnopt run directory")
    expect_error(["report", str(tmp_path / "missing")], "is not a directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "report.json is not valid JSON"),
    ("[1, 2]", "a report must be a JSON object at the top level, got list"),
    ('{"kind": "auto"}', "the report has neither 'variants' nor 'front'"),
])
def test_report_refuses_a_report_json_it_cannot_read(tmp_path, expect_error, text, message):
    (tmp_path / "report.json").write_text(text)
    expect_error(["report", str(tmp_path)], message)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_older_demo_report_keeps_its_analytic_energy_labelled_as_such(demo_dir):
    from nnopt.report.markdown import render_classic_markdown

    report = json.loads((demo_dir / "report.json").read_text())
    current = render_classic_markdown(report)
    assert "active power" in current and "total µJ" in current
    for variant in report["variants"]:  # as an earlier nnopt wrote it: the analytic table's own nJ
        variant["energy_nj"] = {"total_nj": 98.1, "compute_nj": 29.7, "memory_nj": 68.4, "low_nj": 49.0,
                                "high_nj": 196.2, "method": "estimated: analytic table horowitz-45nm (...)"}
    older = render_classic_markdown(report)
    assert "analytic table alone" in older and "total nJ" in older and "| 98.1 |" in older
    assert "active power" not in older.split("## Energy")[1].split("## How")[0]
