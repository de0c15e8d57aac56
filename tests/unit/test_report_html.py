"""The HTML report and its Markdown twin, rendered from report.json documents of both kinds."""

from __future__ import annotations

import copy
import re

import pytest

from nnopt.errors import ModelFormatError
from nnopt.report import energy_label, read_report, render_html, render_markdown, smaller_not_faster, write_reports

ANALYTIC = "estimated: analytic table horowitz-45nm (Horowitz, ISSCC 2014; 45 nm, 0.9 V)"
EVIL = "<script>alert('x')</script>"

# What `nnopt auto` writes (report.json of kind "auto"), small: a baseline, three plans on the front.
AUTO = {
    "kind": "auto",
    "nnopt_version": "0.1.0",
    "model": "runs/simplenet",
    "objective": "bytes",
    "max_drop": "1%",
    "batch": 1,
    "environment": {"device": "cpu", "cpu": "Test CPU 9000", "threads": 2, "torch": "2.13.0+cpu", "nnopt": "0.1.0"},
    "methods": {"accuracy": "measured: top-1 on held-out rows", "latency_ms": "measured: time.perf_counter per call"},
    "baseline": {"accuracy": 0.975, "bytes": 26816, "latency_ms": {"median": 0.035, "p10": 0.034, "p90": 0.05},
                 "energy_nj": 98.1, "energy_method": ANALYTIC},
    "front": [
        {"name": "int8", "accuracy": 0.974, "objective_value": 7936, "bytes": 7936,
         "latency_ms": {"median": 0.096, "p10": 0.09, "p90": 0.14}, "energy_nj": 79.4, "energy_method": ANALYTIC,
         "recipe": [{"kind": "quantize-weights", "version": 1, "bits": 8}]},
        {"name": "prune90+int4", "accuracy": 0.968, "objective_value": 2009, "bytes": 2009,
         "latency_ms": {"median": 0.030, "p10": 0.028, "p90": 0.04}, "energy_nj": 50.2, "energy_method": ANALYTIC,
         "recipe": [{"kind": "prune-magnitude", "sparsity": 0.9}, {"kind": "quantize-weights", "bits": 4}]},
        {"name": EVIL, "accuracy": 0.90, "objective_value": 1500, "bytes": 1500,
         "latency_ms": {"median": 0.031, "p10": 0.029, "p90": 0.05, "samples": [0.03, 0.031, 0.05]},
         "recipe": [{"kind": "prune-magnitude", "sparsity": 0.99}]},
    ],
    "chosen": "prune90+int4",
    "layers": [
        {"name": "features.0", "sparsity": 0.9, "bits": 4, "structured_ratio": 0.0,
         "energy_nj": {"compute_nj": 20.0, "memory_nj": 10.0, "method": ANALYTIC}},
        {"name": "classifier", "sparsity": 0.5, "bits": 8, "structured_ratio": 0.25},
    ],
}


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(AUTO, date="2026-01-02 03:04 UTC")


def test_auto_report_has_every_section_and_figure(page):
    ids = re.findall(r'<section id="([\w-]+)"', page)
    assert ids == ["summary", "variants", "front", "latency", "energy", "layers", "methods"]
    figures = re.findall(r'<figure id="([\w-]+)">\s*<svg', page)
    assert figures == ["fig-objective", "fig-latency", "fig-energy", "fig-layer-energy", "fig-layers"]
    assert "Chosen plan: prune90+int4." in page and 'class="chosen"' in page
    assert "budget: accuracy ≥ 0.965" in page  # 0.975 − 1%
    for header in ("device", "CPU", "threads", "torch", "date"):
        assert f"<dt>{header}</dt>" in page
    assert "Test CPU 9000" in page and "2026-01-02 03:04 UTC" in page
    # the front's recipes are shown as steps, in their own table
    assert "prune-magnitude(sparsity=0.9) → quantize-weights(bits=4)" in page


def test_every_caption_says_how_its_figure_was_obtained(page):
    captions = {fig: text for fig, text in re.findall(
        r'<figcaption id="(fig-[\w-]+)-cap"><span class="badge \w+">\w+</span> ([^<]*)', page)}
    assert set(captions) == {"fig-objective", "fig-latency", "fig-energy", "fig-layer-energy", "fig-layers"}
    assert captions["fig-latency"].startswith("Measured on cpu (Test CPU 9000), 2 threads, batch 1")
    assert "Estimated (analytic, horowitz-45nm) for cpu (Test CPU 9000), 2 threads" in captions["fig-energy"]
    assert "Not measured" in captions["fig-energy"]
    assert "Counted, not measured" in captions["fig-layers"]
    badges = dict(re.findall(r'<figcaption id="(fig-[\w-]+)-cap"><span class="badge (\w+)"', page))
    assert badges == {"fig-objective": "measured", "fig-latency": "measured", "fig-energy": "estimated",
                      "fig-layer-energy": "estimated", "fig-layers": "counted"}


def test_names_are_escaped_and_nothing_is_fetched(page):
    assert "<script" not in page.lower()  # neither the variant's name nor any script of ours
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page  # table and notes, escaped by html
    assert "&lt;script&gt;" in page.split('<figure id="fig-objective">')[1]  # the plot legend, escaped by the SVG
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'\s(src|href)="(?!#)', page)  # only in-page references (SVG markers, clip paths)
    assert not re.search(r"url\((?!#)", page)


def test_smaller_but_not_faster_is_said_plainly(page):
    callout = re.search(r"Smaller but not faster on this device</strong>([^<]*)", page).group(1)
    assert "int8" in callout and "prune90+int4" not in callout  # prune90+int4 is both smaller and faster
    assert re.search(r"<strong>int8</strong>: accuracy -0.1 points; file 3.38× smaller .*smaller but not faster "
                     r"here: speed against the baseline 0.36× at batch 1 \(measured\)", page)


def test_markdown_twin_has_the_same_tables():
    text = render_markdown(AUTO)
    assert "| variant | accuracy | objective (file bytes) | bytes | ms @1 median (p10–p90) | nJ/inference |" in text
    assert "| prune90+int4 (chosen) | 0.968 | 2,009 | 2,009 | 0.030 (0.028–0.040) | 50.2 |" in text
    assert "| baseline | 0.975 | 26,816 | 26,816 |" in text
    assert "\\<script\\>" in text and not re.search(r"(?<!\\)<", text)  # every < escaped
    assert "## Per-layer sparsity and bits (counted)" in text and "| features.0 | 90.0% | 4 | 0.0% |" in text
    assert "**Smaller but not faster on this device** (cpu, 2 threads): int8." in text


def test_optional_keys_may_be_missing():
    bare = render_html({"variants": [{"name": "only"}]})
    assert "<svg" not in bare and "only" in bare and '<section id="variants">' in bare
    assert "date" not in re.findall(r"<dt>(\w+)</dt>", bare)
    front_only = copy.deepcopy(AUTO)
    for key in ("baseline", "layers", "environment", "methods", "max_drop", "chosen", "batch"):
        del front_only[key]
    for row in front_only["front"]:
        row.pop("energy_nj", None)
        row.pop("energy_method", None)
    text = render_html(front_only)
    assert "No plan met the budget." in text and "batch not recorded" in text
    assert re.findall(r'<figure id="([\w-]+)">', text) == ["fig-objective", "fig-latency"]
    assert "Objective: bytes; budget: not recorded; chosen plan: none" in render_markdown(front_only)


@pytest.mark.parametrize(("doc", "message"), [
    ([1, 2], "must be a JSON object at the top level, got list"),
    ({"kind": "auto"}, "neither 'variants' nor 'front'"),
    ({"variants": {"a": 1}}, "'variants' must be a list of objects, got dict"),
    ({"front": [{"name": "a"}, 3]}, "'front' entry 2 must be an object, got int"),
    ({"front": [], "baseline": [1]}, "'baseline' must be an object"),
    ({"variants": [], "layers": "x"}, "'layers' must be a list of objects"),
])
def test_documents_that_are_not_reports_are_refused(doc, message):
    with pytest.raises(ModelFormatError, match=re.escape(message)):
        render_html(doc)


def test_raw_samples_give_the_percentiles():
    doc = {"variants": [{"name": "a", "latency_ms": {"8": {"samples": [5.0, 1.0, 3.0, 2.0, 4.0]}}}]}
    point = read_report(doc).rows[0].latency[0]
    assert (point.batch, point.p10, point.median, point.p90, point.calls) == ("8", 1.0, 3.0, 5.0, 5)
    assert '3.000<span class="range">1.000–5.000</span>' in render_html(doc)  # median, range under it
    assert "| a | 3.000 (1.000–5.000) |" in render_markdown(doc)  # "a" is not taken for a baseline


def test_energy_labels_say_measured_or_estimated():
    assert energy_label(ANALYTIC) == "estimated (analytic, horowitz-45nm)"
    assert energy_label("measured: RAPL intel-rapl:0 (package-0), 5 runs") == "measured (RAPL)"
    time_aware = "active power × measured time per inference at batch 1 (10–20 W; ...); compute/memory shares " \
                 "from the analytic table horowitz-45nm"
    assert energy_label("estimated: " + time_aware) == "estimated (power × measured time)"
    assert energy_label("measured power: " + time_aware) == "measured (power × measured time)"
    assert energy_label("measured: NVML GPU 0 total energy") == "measured (NVML)"
    assert energy_label(None) == "method not recorded"
    measured = {k: v for k, v in copy.deepcopy(AUTO).items() if k not in ("layers", "front")}
    measured["front"] = [{k: v for k, v in row.items() if k != "latency_ms"} for row in AUTO["front"]]
    for row in [measured["baseline"], *measured["front"]]:
        row["energy_method"] = "measured: RAPL intel-rapl:0, 5 runs, idle power subtracted"
    page = render_html(measured)
    assert re.search(r'id="fig-energy-cap"><span class="badge measured">measured</span> Measured \(RAPL\)', page)


def test_write_reports_writes_both_files_and_nothing_else(tmp_path):
    doc = {"variants": [{"name": "baseline", "accuracy": 0.97}, {"name": "small", "accuracy": 0.96}]}
    (tmp_path / "report.json").write_text("{}")
    write_reports(tmp_path, doc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]
    html_text = (tmp_path / "report.html").read_text()
    assert html_text.startswith("<!DOCTYPE html>") and "(report.json written)" in html_text
    assert (tmp_path / "report.md").read_text() == render_markdown(doc)
    assert "| small | 0.96 |" in render_markdown(doc)
    write_reports(tmp_path, doc)  # a second run replaces both, byte for byte the same
    assert (tmp_path / "report.html").read_text() == html_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]


def test_the_baseline_is_the_row_the_report_names():
    rows = [{"name": "small", "file_bytes": 10, "latency_ms": {"1": {"median": 2.0}}},
            {"name": "ref", "file_bytes": 40, "latency_ms": {"1": {"median": 1.0}}}]
    view = read_report({"baseline": "ref", "variants": rows})
    assert view.baseline.name == "ref" and smaller_not_faster(view) == ["small"]
    assert read_report({"variants": rows}).baseline is None  # no reference is guessed
    assert "Smaller but not faster" not in render_html({"variants": rows})


def test_auto_report_with_variants_beside_its_front():
    # nnopt auto also lists baseline, plans and final model as `variants`, with recipes as YAML text
    doc = {**copy.deepcopy(AUTO), "metric": "accuracy", "message": "Chosen: prune90+int4 (2 of 2 plans evaluated).",
           "input": {"architecture": "simplenet", "applied": []}}
    del doc["model"]
    doc["front"] = [{**row, "split": "validation"} for row in doc["front"][:2]]
    doc["front"][1]["recipe"] = "name: p\nsteps:\n- kind: prune-magnitude\n  sparsity: 0.9\n  layers:\n  - fc\n"
    doc["variants"] = [{"name": "baseline", "accuracy": 0.975, "bytes": 26816, "meets_budget": None},
                       {"name": "int8", "accuracy": 0.974, "bytes": 7936, "meets_budget": True},
                       {"name": "prune90+int4", "accuracy": 0.968, "bytes": 2009, "meets_budget": True}]
    page = render_html(doc)
    assert "<p class=\"message\">Chosen: prune90+int4 (2 of 2 plans evaluated).</p>" in page
    assert "Searched optimization plans for simplenet for the smallest weights file" in page
    assert "<h3>Plans on the front</h3>" in page and "prune-magnitude(sparsity=0.9, layers=[fc])" in page
    assert "Accuracy measured on the validation split" in page  # not the test split: the plans were scored there
    plans = page.split("<h3>Plans on the front</h3>")[1].split("</section>")[0]
    assert plans.count('<span class="tag chosen">chosen</span>') == 2  # its figures and its recipe, marked


def test_partial_reports_render_without_a_traceback():
    from nnopt.report import render_html, render_markdown

    demo_without_environment = {"kind": "classic-demo", "variants": [{"name": "baseline", "accuracy": 0.9}]}
    energy_without_method = {"variants": [{"name": "baseline", "accuracy": 0.9, "energy_nj": 5.0},
                                          {"name": "small", "accuracy": 0.8, "energy_nj": 4.0}]}
    for doc in (demo_without_environment, energy_without_method):
        assert "baseline" in render_markdown(doc)
        assert "baseline" in render_html(doc)
    assert "method not recorded" in render_markdown(energy_without_method)


def test_markdown_escapes_every_recorded_string():
    from nnopt.report import render_markdown

    hostile = "<script>alert(1)</script>"
    doc = {"environment": {"device": hostile, "cpu": hostile}, "device": hostile, "methods": {hostile: hostile},
           "variants": [{"name": "baseline", "accuracy": 0.9, "energy_nj": 5.0, "energy_method": hostile},
                        {"name": hostile, "accuracy": 0.8}]}
    assert "<script>" not in render_markdown(doc)
