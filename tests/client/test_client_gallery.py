"""`cbam-client classify DIR --attention OUT` writes OUT/index.html, a gallery of every image, against a
real cbam-serve: as HTML (every referenced file exists beside it, nothing from the network), and opened
from disk in a real headless Chromium (Debian's package, driven by Playwright): rows, every image
loaded, sorting by confidence and filtering by predicted label."""

import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from real_server import SAMPLES, sample_labels

from client.cli import main

pytest.importorskip("matplotlib", reason="figures are drawn with matplotlib (the load extra)")

CHROMIUM = Path("/usr/bin/chromium")
# No network, no first-run or background traffic, and no sandbox (the tests run as root in a container).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Two samples of three digits, one clearly and one less surely recognised among them, and a broken file.
IMAGES = ["digit3_0705", "digit3_0744", "digit8_0500", "digit8_0905", "digit9_0254", "digit9_1772"]
BLOCKS = ["layer1.0", "layer2.0", "layer3.0"]


class Page(HTMLParser):
    """The gallery's rows (their data- attributes) and every file it references."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.references: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and "data-index" in attributes:
            self.rows.append(attributes)
        for name in ("src", "href"):
            if attributes.get(name):
                self.references.append(attributes[name])


@pytest.fixture(scope="module")
def gallery(live, tmp_path_factory) -> Path:
    """OUT/index.html of one classify --attention over the images above and a broken file."""
    images = tmp_path_factory.mktemp("images")
    for name in IMAGES:
        shutil.copy(SAMPLES / f"{name}.png", images / f"{name}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path_factory.mktemp("gallery")
    argv = ["classify", str(images), "--attention", str(out), "--top-k", "3", "--target", live.address]
    assert main(argv) == 1  # the broken file failed; the others are in the gallery
    return out / "index.html"


def test_the_gallery_has_a_row_per_image_and_references_only_files_beside_it(gallery):
    text = gallery.read_text(encoding="utf-8")
    page = Page(text)
    assert len(page.rows) == len(IMAGES) + 1
    labels = sample_labels()
    inputs = sorted([*IMAGES, "broken"])  # the order classify finds them in
    truth = {str(i): labels.get(SAMPLES / f"{name}.png") for i, name in enumerate(inputs)}
    failed = [row["data-index"] for row in page.rows if row["data-failed"] == "1"]
    assert failed == [str(inputs.index("broken"))] and "INVALID_ARGUMENT" in text
    for row in page.rows:
        if row["data-failed"] == "0":
            assert row["data-label"] == truth[row["data-index"]]
            assert 0 < float(row["data-confidence"]) <= 1
    for name in IMAGES:
        pictures = [f"{name}/input.png", f"{name}/figure.png"] + [f"{name}/overlay_{b}.png" for b in BLOCKS]
        assert set(pictures) <= set(map(unquote, page.references))
    for reference in page.references:
        parts = urlsplit(reference)
        assert not parts.scheme and not parts.netloc and not reference.startswith("/"), reference
        assert (gallery.parent / unquote(parts.path)).is_file(), reference
    assert "http:" not in text and "https:" not in text and "<link" not in text and "<script src" not in text


@pytest.mark.slow  # starts a browser
def test_the_gallery_opens_from_disk_in_a_real_browser(gallery):
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM} (scripts/setup.sh --test installs Debian's chromium): "
                    "the gallery was checked as HTML only")  # fmt: skip
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (dev extra)")
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as playwright:
        # Upper bounds for a slow, busy machine (Playwright's own default is 30 s).
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=300_000
        )
        browser.set_default_timeout(300_000)
        try:
            check_in_browser(browser, gallery)
        finally:
            browser.close()


def check_in_browser(browser, gallery: Path) -> None:
    outside, errors = [], []
    browser.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else (
        outside.append(route.request.url), route.abort()))  # fmt: skip
    page = browser.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(gallery.as_uri(), wait_until="load")

    images = page.evaluate("Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth])")
    assert len(images) == len(IMAGES) * (1 + len(BLOCKS))  # a thumbnail and an overlay per block
    assert [src for src, width in images if width == 0] == []  # every image loaded
    rows = "#gallery tbody tr"
    assert page.locator(rows).count() == len(IMAGES) + 1
    assert page.inner_text("#shown") == f"{len(IMAGES) + 1} of {len(IMAGES) + 1} images shown"

    def shown(attribute: str) -> list[str]:
        return page.eval_on_selector_all(
            rows, f"rows => rows.filter(r => !r.hidden).map(r => r.dataset.{attribute})"
        )

    confidences = [float(c) for c in shown("confidence")]
    assert confidences[:-1] == sorted(confidences[:-1], reverse=True) and confidences[-1] == -1  # failed last
    page.select_option("#sort", "confidence-asc")
    confidences = [float(c) for c in shown("confidence")]
    assert confidences[:-1] == sorted(confidences[:-1]) and confidences[-1] == -1
    assert len(set(confidences)) > 2  # the order was a real choice
    page.select_option("#sort", "input")
    assert shown("index") == [str(i) for i in range(len(IMAGES) + 1)]

    for label in ("3", "8", "9"):
        page.select_option("#label", label)
        assert shown("label") == [label, label]
        assert page.inner_text("#shown") == f"2 of {len(IMAGES) + 1} images shown"
    page.select_option("#label", label="failed")
    assert shown("failed") == ["1"]
    page.select_option("#label", label="all")
    assert len(shown("index")) == len(IMAGES) + 1

    figure = page.locator("a", has_text="figure").first.get_attribute("href")
    assert page.goto(gallery.parent.joinpath(unquote(figure)).as_uri()).ok  # the link leads to the figure
    assert outside == [] and errors == []
