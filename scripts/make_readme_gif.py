"""Record the README's GIF: the Explorer (served by `acdc-viz app`) part-way through a run.

Starts ``acdc-viz app`` on a free port, opens the page in headless chromium, and takes screenshots
of the widget: the full graph, a few single steps (the edge under test in green), then the run in
short Run/Pause bursts, and the kept circuit at the end. Pillow assembles them into a looping GIF
with an adaptive palette, small enough for a README.

    pip install pillow      # only this script needs it
    python scripts/make_readme_gif.py [--task induction] [--positions] [--tau 0.1]
        [--out docs/screenshots/explorer-run.gif] [--width 960] [--frames-dir DIR]

Needs voila, playwright and /usr/bin/chromium (`make browser`).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
STATUS = re.compile(r"step (\d+) / (\d+)")
KEEP_COLOURS = ("#009E73", "#D55E00", "#0072B2", "#E69F00", "#56B4E9", "#CC79A7", "#1976D2")
"""Colours every GIF frame keeps exactly: the figure's palette (Okabe-Ito) and the Run button."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(task: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        IPYTHONDIR=str(tmp / "ipython"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "acdc_viz",
            "app",
            "--task",
            task,
            "--port",
            str(port),
            "--no-browser",
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    url = process.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"acdc-viz app did not start (exit status {process.poll()})"
                ) from None
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def record(url: str, frames: list[tuple[bytes, int]], bursts: int, burst_ms: int,
           viewport: dict[str, int]) -> None:
    """Append (PNG bytes, milliseconds to show it) for each moment of the run."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport=viewport, device_scale_factor=1)
        page.goto(url, timeout=180_000)
        page.wait_for_selector(".acdc-explorer .acdc-status", timeout=180_000)
        page.wait_for_timeout(1500)
        # the header line and the widget, down to the bottom and across to the side of the seq-graph
        top = page.locator(".acdc-app-header").bounding_box()
        figure = page.locator(".acdc-figure").bounding_box()
        y0 = max(0, top["y"] - 6)
        clip = {
            "x": 0,
            "y": y0,
            "width": min(viewport["width"], figure["x"] + figure["width"] + 12),
            "height": figure["y"] + figure["height"] - y0 + 6,
        }

        def status() -> tuple[int, int]:
            match = STATUS.search(page.locator(".acdc-status").inner_text().replace("\xa0", " "))
            return (int(match.group(1)), int(match.group(2))) if match else (0, 0)

        def button(name: str):
            return page.locator(".acdc-explorer button", has_text=re.compile(f"^{name}$"))

        def shot(ms: int) -> None:
            page.mouse.move(viewport["width"] - 10, viewport["height"] - 10)
            page.wait_for_timeout(250)
            frames.append((page.screenshot(clip=clip), ms))

        def settle() -> None:
            deadline = time.monotonic() + 60
            while not button("Step").is_enabled() and time.monotonic() < deadline:
                if "complete" in page.locator(".acdc-status").inner_text():
                    break
                page.wait_for_timeout(100)
            page.wait_for_timeout(300)

        shot(1500)
        for _ in range(3):
            button("Step").click()
            settle()
            shot(900)
        target = None    # edges per burst, so that the bursts spread over the whole run
        for _ in range(bursts):
            if "complete" in page.locator(".acdc-status").inner_text():
                break
            before, n_edges = status()
            target = target or max(1, (n_edges - before) // bursts)
            button("Run").click()
            page.wait_for_timeout(burst_ms)
            try:   # the burst may have run to the end already: then Pause is disabled
                button("Pause").click(timeout=1000)
            except PlaywrightTimeout:
                pass
            settle()
            shot(450)
            done = status()[0] - before
            # the machine's speed varies: aim the next burst at the target
            burst_ms = int(min(1000, max(20, burst_ms * target / max(1, done))))
        if "complete" not in page.locator(".acdc-status").inner_text():
            button("Run").click()
            page.wait_for_function(
                "() => document.querySelector('.acdc-status').innerText.includes('complete')",
                timeout=300_000)
            page.wait_for_timeout(500)
        shot(3000)
        print(f"recorded {len(frames)} frames; final status: {status()}", file=sys.stderr)
        browser.close()


def assemble(
    frames: list[tuple[bytes, int]], out: Path, width: int, frames_dir: Path | None
) -> None:
    from PIL import Image

    images = []
    for i, (png, _ms) in enumerate(frames):
        image = Image.open(io.BytesIO(png)).convert("RGB")
        if frames_dir is not None:
            image.save(frames_dir / f"frame-{i:02d}.png")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        images.append(image)
    # one palette for every frame keeps the colours steady and the file small; it is computed from
    # several frames at once, so that colours seen only mid-run (the edge under test) are in it
    picks = [images[0], images[1], images[len(images) // 2], images[-1]]
    sheet = Image.new("RGB", (picks[0].width, sum(im.height for im in picks)), "white")
    for k, im in enumerate(picks):
        sheet.paste(im, (0, sum(p.height for p in picks[:k])))
    # and the figure's Okabe-Ito colours are added exactly (thin lines are too few pixels to win)
    quantized = sheet.quantize(colors=96 - len(KEEP_COLOURS), method=Image.Quantize.MEDIANCUT)
    colours = quantized.getpalette()[: 3 * (96 - len(KEEP_COLOURS))]
    for hex_colour in KEEP_COLOURS:
        colours += [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours)
    gif = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    out.parent.mkdir(parents=True, exist_ok=True)
    gif[0].save(out, save_all=True, append_images=gif[1:], duration=[ms for _png, ms in frames],
                loop=0, optimize=True, disposal=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="induction")
    parser.add_argument("--positions", action="store_true", help="split edges by token position")
    parser.add_argument("--tau", type=float, help="default: the task's")
    parser.add_argument("--bursts", type=int, default=12, help="Run/Pause bursts to record")
    parser.add_argument("--burst-ms", type=int, default=60, help="how long the first burst runs")
    parser.add_argument("--width", type=int, default=1280, help="GIF width in pixels")
    parser.add_argument("--viewport", default="1700x1000",
                        help="browser window WIDTHxHEIGHT (wide enough for the whole seq-graph)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "screenshots" / "explorer-run.gif"
    )
    parser.add_argument("--frames-dir", type=Path, help="also keep each frame as a PNG here")
    args = parser.parse_args()
    if args.frames_dir:
        args.frames_dir.mkdir(parents=True, exist_ok=True)

    query = {"positions": "1"} if args.positions else {}
    if args.tau is not None:
        query["tau"] = f"{args.tau:g}"
    frames: list[tuple[bytes, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_app(args.task, Path(tmp))
        try:
            width, height = (int(v) for v in args.viewport.split("x"))
            record(
                url + ("?" + urlencode(query) if query else ""),
                frames,
                args.bursts,
                args.burst_ms,
                {"width": width, "height": height},
            )
        finally:
            stop(process)
    assemble(frames, args.out, args.width, args.frames_dir)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(frames)} frames)")


if __name__ == "__main__":
    main()
