"""`weakloc report`: drawing checked pixel by pixel, the page checked against the run, and in a real headless browser.

The browser test starts Debian's chromium with its offline flags and reads back what the page's own script
found after `load` (pictures rendered, load errors); it skips with a reason where chromium is not installed.
"""
from __future__ import annotations

import collections
import html.parser
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weakloc.models import visualize as viz
from weakloc.pipeline import cli, results

# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------


def test_draw_boxes_puts_edges_on_the_covered_pixels():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    # (10, 5, 30, 20) covers columns 10..29 and rows 5..19 (max edge exclusive)
    out = np.asarray(viz.draw_boxes(img, [{"xmin": 10, "ymin": 5, "xmax": 30, "ymax": 20, "color": (255, 0, 0)}],
                                    width=1))
    red = (out == [255, 0, 0]).all(axis=-1)
    assert red[5, 10] and red[19, 29] and red[5, 29] and red[19, 10]
    assert not red[4, 10] and not red[5, 30] and not red[20, 29] and not red[12, 20]
    assert red.sum() == 2 * 20 + 2 * 13  # two 20-pixel rows, two 15-pixel columns sharing the corners
    # at half scale the same box covers columns 5..14, rows 2..9 (floor of 2.5, ceil of 10 minus one)
    half = np.asarray(viz.draw_boxes(Image.new("RGB", (50, 25)), [{"xmin": 10, "ymin": 5, "xmax": 30, "ymax": 20,
                                                                  "color": (255, 0, 0)}], scale=0.5, width=1))
    red = (half == [255, 0, 0]).all(axis=-1)
    assert red[2, 5] and red[9, 14] and not red[10, 14] and not red[2, 15]


def test_cam_overlay_puts_the_heat_where_the_map_peaks():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 5.0  # peak in the top-left cell
    out = np.asarray(viz.cam_overlay(grey, cam, alpha=0.5)).astype(int)
    top_left, bottom_right = out[2, 2], out[60, 60]
    # jet runs from dark blue (0, 0, 0.5) at 0 to dark red (0.5, 0, 0) at 1; blended half and half with grey 128.
    # Pixel (2, 2) lies before the centre of the first cell (pixel 8), so bilinear resizing holds the peak there.
    np.testing.assert_allclose(top_left, [128, 64, 64], atol=2)
    np.testing.assert_allclose(bottom_right, [64, 64, 128], atol=2)
    # a constant map (no location) leaves the picture as it was
    assert np.array_equal(np.asarray(viz.cam_overlay(grey, np.ones((4, 4)))), np.asarray(grey))


def test_contact_sheet_grid_size():
    tiles = [(Image.new("RGB", (300, 200), (i * 40, 0, 0)), f"t{i}") for i in range(7)]
    sheet = viz.contact_sheet(tiles, columns=3, tile=100)
    assert sheet.size == (3 * 104 + 4, 3 * (100 + 14 + 4) + 4)  # 7 tiles -> 3 rows of 3 columns


# --------------------------------------------------------------------------------------------------------------
# The page, against the run it shows
# --------------------------------------------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts_src, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        if tag in ("a", "link") and a.get("href"):
            self.links.append(a["href"])
        if tag == "script" and a.get("src"):
            self.scripts_src.append(a["src"])

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.body = " ".join(page.text)
    return page


RANKED = ("images/worst-iou-", "images/misclassified-", "images/lowest-score-")


def sampled_thumbnails(page) -> list[str]:
    """The per-class sample's pictures (the sorted sections above it show more)."""
    return [s for s in page.imgs if s.startswith("images/") and not s.startswith(RANKED)]


@pytest.fixture(scope="module")
def report_dir(labelled_run, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("report") / "report"
    assert cli.main(["report", "--annotations", labelled_run["out"], "--output", str(out), "--per_class", "10"]) == 0
    return out


def test_report_files_are_local_and_present(report_dir):
    page = parse_page(report_dir / "index.html")
    assert page.imgs and not page.scripts_src
    for src in page.imgs + page.links:
        assert "://" not in src and not src.startswith("/"), src  # nothing from a network, nothing absolute
        target = (report_dir / src).resolve()
        assert report_dir.resolve() in target.parents and target.is_file(), src
        assert Image.open(target).size[0] > 0
    for name in ("contact_sheet.png", "score_hist.png", "cam_score_hist.png", "box_area_hist.png",
                 "class_counts.png"):
        assert name in page.imgs
    # hostile image ids (../../etc/x) became thumbnail names inside images/
    pictures = [p for ext in ("*.png", "*.jpg") for p in report_dir.rglob(ext) if p.parent != report_dir]
    assert pictures and all(p.parent == report_dir / "images" for p in pictures)


def test_report_shows_the_runs_counts_and_failures(labelled_run, report_dir):
    rows = results.read_table(labelled_run["out"]).to_pylist()
    per_class = collections.Counter(b["label"] for r in rows for b in r["boxes"])
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    for name, n in per_class.items():
        images = sum(1 for r in rows if any(b["label"] == name for b in r["boxes"]))
        assert re.search(rf"<td>{name}</td><td class=\"num\">{n}</td><td class=\"num\">{images}</td>", text), name
    # the garbage record is the run's one failure, with its stage and id
    assert "Failures (1)" in text and "garbage" in text and "<td>decode</td>" in text
    assert "CAM overlay" in text and "has no CAMs" not in text
    # an image id holding markup is shown as text, never as markup
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    # per class: min(10, images of that class) pictures, each with its caption
    page = parse_page(report_dir / "index.html")
    thumbs = sampled_thumbnails(page)
    assert len(thumbs) == sum(min(10, sum(1 for r in rows if any(b["label"] == c for b in r["boxes"])))
                              for c in per_class)


def test_report_without_cams_says_so(labelled_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    table = results.read_table(labelled_run["out"])
    pq.write_table(table.drop_columns(["cams"]), run / "annotations-00000-of-00001.parquet")
    shutil.copy(pathlib.Path(labelled_run["out"]) / "summary.json", run / "summary.json")
    for failures in pathlib.Path(labelled_run["out"]).glob("failures-*.parquet"):  # a run has both tables
        shutil.copy(failures, run / failures.name)
    out = tmp_path / "report"
    assert cli.main(["report", "--annotations", str(run), "--output", str(out)]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "has no CAMs" in text and "· CAM overlay" not in text
    # the default sample is at most 6 images per class
    rows = table.to_pylist()
    thumbs = sampled_thumbnails(parse_page(out / "index.html"))
    assert len(thumbs) == sum(min(6, sum(1 for r in rows if any(b["label"] == c for b in r["boxes"])))
                              for c in {b["label"] for r in rows for b in r["boxes"]})
    # and an existing report is not overwritten without asking
    assert cli.main(["report", "--annotations", str(run), "--output", str(out)]) == 2


# --------------------------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=10000"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser binary; session-scoped so a machine without it skips before any report is built."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "needs a chromium binary (apt-get install chromium) for the headless browser check"
    if os.environ.get("WEAKLOC_REQUIRE_CHROMIUM"):
        pytest.fail(f"{reason}; .ci/run installs it and sets WEAKLOC_REQUIRE_CHROMIUM")
    pytest.skip(reason)


def test_report_renders_in_headless_chromium(chromium, report_dir, tmp_path):
    browser = chromium
    url = (report_dir / "index.html").resolve().as_uri()
    base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(1)))
    n_imgs = len(parse_page(report_dir / "index.html").imgs)
    # the page's script ran after `load`: every picture decoded (naturalWidth > 0), no load error, no CSP refusal
    assert attrs.get("data-images-total") == str(n_imgs), attrs
    assert attrs.get("data-images-broken") == "0", attrs
    assert attrs.get("data-errors") == "0", attrs

    shot = tmp_path / "report.png"  # the test artifact: kept under pytest's tmp dir, never in the repository
    done = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # pictures and plots, not a blank page
    print(f"report screenshot: {shot}")


def test_broken_picture_is_caught_by_the_browser_check(chromium, report_dir, tmp_path):
    """The check above can fail: the same page with one picture removed reports it as broken."""
    browser = chromium
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    os.remove(copy / "score_hist.png")
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          (copy / "index.html").resolve().as_uri()], capture_output=True, text=True, timeout=120)
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom.stdout).group(1)))
    assert attrs.get("data-images-broken") == "1" and attrs.get("data-errors") == "1", attrs


def test_pictures_open_as_a_viewer_shows_them():
    """A JPEG stored 40 wide and 20 high with EXIF orientation 6 is shown 20 wide and 40 high, as `weakloc label`
    measures it, so boxes in its coordinates land on the right pixels."""
    import io

    stored = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif)
    assert viz.open_rgb(buf.getvalue()).size == (20, 40)


def _iou(a, b):
    """Intersection over union of two x0y0x1y1 boxes, by the formula (independent of weakloc's box maths)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_report_judges_the_boxes_against_the_truth(labelled_run, report_dir):
    """The run's inputs carried true boxes: the page shows the evaluation, each image's IoU, the sorted sections
    (worst IoU first) and the summary folded."""
    rows = results.read_table(labelled_run["out"]).to_pylist()
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    assert "How good are the boxes" in text and "GT-known Loc (weakloc)" in text and "full-image box" in text
    assert "<details><summary>summary.json of the run" in text
    # worst IoU section: its captions' IoUs, in page order, ascending and equal to the formula's
    section = text[text.index('id="worst-iou"'):text.index('id="misclassified"')]
    shown = [float(v) for v in re.findall(r"IoU \w+ ([0-9.]+)", section)]

    def row_iou(r):
        by_class = {}
        for g in r["gt_boxes"]:
            mine = [b for b in r["boxes"] if b["class_id"] == g["class_id"]]
            best = max((_iou([m[k] for k in ("xmin", "ymin", "xmax", "ymax")],
                             [g[k] for k in ("xmin", "ymin", "xmax", "ymax")]) for m in mine), default=0.0)
            by_class[g["class_id"]] = max(by_class.get(g["class_id"], 0.0), best)
        return min(by_class.values())

    expected = sorted(round(row_iou(r), 2) for r in rows if r["gt_boxes"])
    assert shown == pytest.approx(expected[: len(shown)], abs=0.006) and len(shown) == min(10, len(expected))
    # every picture opens larger on click
    page = parse_page(report_dir / "index.html")
    zooms = [h for h in page.links if h.endswith("-zoom.jpg")]
    assert len(zooms) == len([s for s in page.imgs if s.startswith("images/")])


def test_report_captions_do_not_overlap():
    """Two boxes with the same top edge: their captions land on different rows."""
    from weakloc.models import visualize

    placed = [visualize.caption_place((10, 20, 60), [], 100)]
    second = visualize.caption_place((30, 20, 90), placed, 100)
    assert second[1] >= placed[0][3] + 1  # below the first one, not on it
    assert visualize.caption_place((70, 20, 90), placed, 100)[1] == 20  # no overlap: its own row


def test_new_sections_render_in_headless_chromium(chromium, report_dir, tmp_path):
    """A screenshot of the sorted sections, cut where the page's own script says they are: pictures with the
    classes' box colours, not a blank or broken band."""
    url = (report_dir / "index.html").resolve().as_uri()
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    tops = dict(item.split(":") for item in re.search(r'data-section-tops="([^"]*)"', body).group(1).split(","))
    start, end = int(tops["evaluation"]), int(tops["lowest-score"])
    assert start < int(tops["worst-iou"]) < int(tops["misclassified"]) < end
    shot = tmp_path / "sections.png"
    done = subprocess.run([*base[:-1], f"--window-size=1280,{end + 400}", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    band = np.asarray(Image.open(shot).convert("RGB"))[start:end].reshape(-1, 3)
    assert len(np.unique(band, axis=0)) > 100  # pictures and tables, not an empty band
    palette = [viz.color(i) for i in range(3)]  # the classes' box colours, drawn on the pictures
    assert any((np.abs(band.astype(int) - c).sum(axis=1) < 30).sum() > 20 for c in palette)
    print(f"sections screenshot: {shot}")
