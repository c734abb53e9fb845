"""The UI as a user sees it: dagster-webserver on an on-disk Dagster instance that holds
real materializations, and the HTML eval report, opened in headless Chromium.

The browser is Debian's Chromium (scripts/chromium.sh installs it), driven by Playwright
through its executable path: Playwright never downloads a browser here. Screenshots, the
webserver's log and the measured durations go to test-artifacts/ui/ (git-ignored).

`on_disk_instance` gives a test an instance the webserver can read; `check_ui` runs the
checks at the end of a test that materialized the lineage on it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from tests.conftest import REPO

ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM_SCRIPT = REPO / "scripts" / "chromium.sh"
EXIT_APT_UNAVAILABLE = 77

# The asset whose latest materialization's metadata is opened: it has a preview grid
# (Markdown with an inline PNG) and its MLflow run link.
METADATA_ASSET = "raw_alt_text_dataset"

# The whole lineage with full names: Dagster draws only the nodes in view, and at 1080p
# the zoom that shows full names leaves the graph's corners out (at 2560 x 1600 too, since
# the text_encoder step: the expansion group falls below it).
VIEWPORT = {"width": 2560, "height": 2000}
REPORT_VIEWPORT = {"width": 1280, "height": 1000}
# Waits for a page (a busy 2-core machine renders the UI slowly); not a measurement.
PAGE_TIMEOUT_MS = 120_000
WEBSERVER_START_LIMIT_S = 600
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def on_disk_instance(home: Path) -> dg.DagsterInstance:
    """A Dagster instance with its SQLite storage in `home` (a DAGSTER_HOME, like the one
    `make` writes), so that a webserver started later sees its runs and materializations."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


def chromium_executable() -> str:
    """Debian's Chromium, installed by scripts/chromium.sh when missing; the test is skipped
    only when the script reports that apt cannot install it."""
    proc = subprocess.run(
        ["bash", str(CHROMIUM_SCRIPT)], capture_output=True, text=True, timeout=1200
    )
    if proc.returncode == EXIT_APT_UNAVAILABLE:
        pytest.skip(f"scripts/chromium.sh: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scripts/chromium.sh failed:\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(base: str, query: str) -> dict:
    req = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body
    return body["data"]


@contextlib.contextmanager
def dagster_webserver(home: Path, log_path: Path) -> Iterator[str]:
    """`dagster-webserver -m pipelines.definitions` on 127.0.0.1 (a free port) against the
    instance in `home`; yields its base URL once it answers (it serves once its code server
    is up). The server and its code server run in their own process group, ended on exit."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    exe = Path(sys.executable).with_name("dagster-webserver")
    cmd = [str(exe), "-h", "127.0.0.1", "-p", str(port)]
    cmd += ["-m", "pipelines.definitions", "-d", str(REPO)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + WEBSERVER_START_LIMIT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"dagster-webserver exited with {proc.returncode}:\n{log_path.read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"dagster-webserver did not answer within {WEBSERVER_START_LIMIT_S}s:\n"
                    + log_path.read_text()[-4000:]
                )
            time.sleep(0.5)
        yield base
    finally:
        _end_process_group(proc)


def _end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the group `proc` leads (the webserver and its code server), SIGKILL to
    what is left of it after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _code_location_loaded(base: str) -> None:
    data = _graphql(
        base,
        """{ workspaceOrError { __typename ... on Workspace { locationEntries {
             name loadStatus locationOrLoadError { __typename ... on PythonError { message } }
           } } } }""",
    )
    entries = data["workspaceOrError"]["locationEntries"]
    assert [e["name"] for e in entries] == ["pipelines.definitions"], entries
    assert entries[0]["loadStatus"] == "LOADED", entries
    assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", entries


def _images_loaded(page) -> list[dict]:
    return page.locator("img").evaluate_all(
        "imgs => imgs.map(i => ({src: i.getAttribute('src').slice(0, 80), alt: i.alt,"
        " complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"
    )


def _graph_box(page) -> dict:
    """The bounding box of the graph's groups (their titles included) and nodes once it
    stops moving (zooming and panning are animated)."""
    box, last = None, None
    for _ in range(50):
        box = page.evaluate(
            """() => {
              const boxes = Array.from(document.querySelectorAll(
                '[class*=AssetGraphExplorer_svgContainer] foreignObject'
              )).map(e => e.getBoundingClientRect());
              return {left: Math.min(...boxes.map(b => b.left)),
                      top: Math.min(...boxes.map(b => b.top)),
                      right: Math.max(...boxes.map(b => b.right)),
                      bottom: Math.max(...boxes.map(b => b.bottom))};
            }"""
        )
        if box == last:
            break
        last = box
        page.wait_for_timeout(100)
    return box


def lineage() -> dict[str, dict]:
    """The assets of the code location the webserver loads: group and partitioning."""
    from pipelines.definitions import defs

    return {
        spec.key.to_user_string(): {
            "group": spec.group_name or "default",
            "partitioned": spec.partitions_def is not None,
        }
        for spec in defs.resolve_all_asset_specs()
    }


def check_asset_graph(page, base: str, instance: dg.DagsterInstance, out: Path) -> None:
    """(a) The global asset lineage, every group expanded: each asset of the code location
    is a node with its full name and the status the instance holds: "Materialized" (a
    partitioned one: the share of its partitions filled) or "Never materialized"."""
    from playwright.sync_api import expect

    assets = lineage()
    groups = sorted({a["group"] for a in assets.values()})
    expanded = ",".join(f"global@global:{g}" for g in groups)
    page.goto(f"{base}/asset-groups?expanded={expanded}")
    names = page.locator("[class*=AssetNode_assetName]")
    names.first.wait_for()
    # More room for the graph: hide the asset list beside it, then zoom in until the nodes
    # show their status rows (zoomed out, Dagster draws names only, truncated).
    page.locator("button:has([aria-label=panel_show_right])").click()
    for _ in range(6):
        if page.locator("[class*=AssetNode_minimalName]").count() == 0:
            break
        page.locator("button:has([aria-label=zoom_in])").click()
    assert sorted(names.all_inner_texts()) == sorted(assets)
    assert page.locator("[class*=AssetNode_minimalName]").count() == 0
    for group in groups:
        assert page.get_by_text(group, exact=True).count() >= 1, group
    materialized = 0
    for asset, spec in sorted(assets.items()):
        node = page.locator("[class*=AssetNode_assetNodeContainer]").filter(
            has=page.get_by_text(asset, exact=True)
        )
        expect(node).to_have_count(1, timeout=PAGE_TIMEOUT_MS)
        if instance.get_latest_materialization_event(dg.AssetKey(asset)) is None:
            expect(node).to_contain_text("Never materialized", timeout=PAGE_TIMEOUT_MS)
            continue
        materialized += 1
        if spec["partitioned"]:
            expect(node).to_contain_text(
                re.compile(r"Partitions\s*[1-9][0-9]*% filled"),
                use_inner_text=True,
                timeout=PAGE_TIMEOUT_MS,
            )
        else:
            expect(node).to_contain_text(
                re.compile(r"^Materialized$", re.MULTILINE),
                use_inner_text=True,
                timeout=PAGE_TIMEOUT_MS,
            )
        expect(node).not_to_contain_text("Never materialized")
    assert materialized, "the instance holds no materialization to show"

    # Centre the lineage in the graph pane (the wheel pans the canvas) for the screenshot.
    pane = page.locator("[class*=AssetGraphExplorer_svgContainer]").locator("xpath=../..")
    area = pane.bounding_box()
    top_bar = 60  # the search bar floats over the top of the pane
    cx, cy = area["x"] + area["width"] / 2, area["y"] + top_bar + (area["height"] - top_bar) / 2
    page.mouse.move(cx, cy)
    for _ in range(10):
        box = _graph_box(page)
        dx, dy = (box["left"] + box["right"]) / 2 - cx, (box["top"] + box["bottom"]) / 2 - cy
        if abs(dx) < 4 and abs(dy) < 4:
            break
        page.mouse.wheel(dx, dy)
    clip = {
        "x": max(area["x"], box["left"] - 24),
        "y": max(area["y"] + top_bar, box["top"] - 24),
    }
    clip["width"] = min(area["x"] + area["width"], box["right"] + 24) - clip["x"]
    clip["height"] = min(area["y"] + area["height"], box["bottom"] + 24) - clip["y"]
    page.screenshot(path=out / "asset-graph-page.png")
    page.screenshot(path=out / "asset-graph.png", clip=clip)


def check_materialization_metadata(page, base: str, instance: dg.DagsterInstance, out: Path):
    """(b) The latest materialization of METADATA_ASSET in its Events tab: the MLflow run
    link is there with the run's URL, and its preview grid renders as the very PNG the
    metadata holds."""
    event = instance.get_latest_materialization_event(dg.AssetKey(METADATA_ASSET))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    mlflow_url = metadata["mlflow_run_url"].value
    assert re.match(r"https?://[^/]+/#/experiments/\d+/runs/[0-9a-f]{32}$", mlflow_url), mlflow_url
    images = {
        key: m.groups()
        for key, value in metadata.items()
        if isinstance(value, dg.MarkdownMetadataValue) and (m := _MD_IMAGE.search(value.value))
    }
    assert images, f"no inline image in {METADATA_ASSET}'s metadata: {sorted(metadata)}"

    page.goto(f"{base}/assets/{METADATA_ASSET}?view=events")
    link = page.locator(f'a[href="{mlflow_url}"]').first
    link.wait_for()
    assert link.is_visible() and mlflow_url in link.inner_text()
    link.scroll_into_view_if_needed()
    page.screenshot(path=out / "asset-metadata.png")

    for key, (alt, png) in sorted(images.items()):
        row = page.locator("tr").filter(has=page.get_by_text(key, exact=True)).last
        row.get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog")
        img = dialog.locator("img")
        img.wait_for()
        page.wait_for_function("i => i.complete", arg=img.element_handle())
        shown = img.evaluate("i => [i.alt, i.naturalWidth, i.naturalHeight]")
        with Image.open(io.BytesIO(base64.b64decode(png))) as grid:
            assert shown == [alt, grid.width, grid.height], (key, shown)
        assert shown[1] > 0
        # The dialog fades in: shoot once no transition runs, not through a half-faded one.
        page.wait_for_function(
            "() => document.getAnimations().every(a => a.playState !== 'running')"
        )
        page.screenshot(path=out / f"asset-metadata-{key}.png")
        dialog.get_by_role("button", name="Close").click()
        dialog.wait_for(state="detached")


def check_eval_report(page, report: Path, out: Path) -> None:
    """(c) The eval report from disk, as its path is printed: title, the summary and
    per-category tables, and every image loaded."""
    page.set_viewport_size(REPORT_VIEWPORT)  # the report's body is at most 1100 px wide
    page.goto(report.as_uri())
    assert page.title() == "recapflow eval report"
    assert page.locator("h1").inner_text() == "recapflow eval report"
    summary = page.locator("h2:text-is('Summary') + table")
    # A header, then the short, descriptive and upsampled (by the prompt expander) forms.
    assert summary.locator("tr").count() == 4
    rows = summary.locator("tr").all_inner_texts()
    assert [r.split()[0] for r in rows[1:]] == ["short", "descriptive", "upsampled"], rows
    assert "against the short form" in page.locator("h2:text-is('Summary') ~ p").first.inner_text()
    categories = page.locator("h2:text-is('Prompt following by category') + table tr")
    assert categories.count() >= 2
    assert page.locator("h2:text-is('Regression gate') + p").inner_text().strip()
    page.wait_for_load_state("load")
    images = _images_loaded(page)
    grids = [i for i in images if i["src"].startswith("grids/")]
    assert grids and len(images) >= 3, images
    broken = [i for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    page.screenshot(path=out / "eval-report.png")
    page.screenshot(path=out / "eval-report-full.png", full_page=True)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - t, 1)


def check_ui(instance: dg.DagsterInstance, project_dir: Path, out: Path = ARTIFACTS) -> dict:
    """Open the webserver on `instance` and the eval report of `project_dir` in Chromium;
    write screenshots, the webserver log and timings.json (seconds per step) to `out`."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with _timed(timings, "chromium_sh"):
        browser_path = chromium_executable()
    start = time.monotonic()
    with dagster_webserver(Path(instance.root_directory), out / "webserver.log") as base:
        timings["webserver_start"] = round(time.monotonic() - start, 1)
        _code_location_loaded(base)
        # The community sign-up dialog a first visit shows would cover every page: dismiss
        # it the way the UI does (remembered in DAGSTER_HOME/.nux).
        assert _graphql(base, "mutation { setNuxSeen }")["setNuxSeen"] is True
        with sync_playwright() as pw:
            with _timed(timings, "browser_launch"):
                browser = pw.chromium.launch(executable_path=browser_path, headless=True)
            try:
                context = browser.new_context(viewport=VIEWPORT)
                # The left navigation collapsed (its own toggle stores this): room for pages.
                context.add_init_script("localStorage.setItem('dagster-nav-collapsed', 'true')")
                context.set_default_timeout(PAGE_TIMEOUT_MS)
                page = context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                with _timed(timings, "asset_graph"):
                    check_asset_graph(page, base, instance, out)
                with _timed(timings, "metadata"):
                    check_materialization_metadata(page, base, instance, out)
                with _timed(timings, "eval_report"):
                    report = project_dir / "data" / "eval_report" / "index.html"
                    check_eval_report(page, report, out)
                assert not errors, f"uncaught errors in the pages: {errors}"
            finally:
                browser.close()
        stop = time.monotonic()
    timings["webserver_stop"] = round(time.monotonic() - stop, 1)
    timings["total"] = round(time.monotonic() - t0, 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"UI check, seconds: {timings} (screenshots in {out})")
    return timings
