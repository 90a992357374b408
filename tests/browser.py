"""Render an HTML report in headless Chromium: do its images load, does anything overflow?

Used by the report tests of both packages. Chromium runs with a fresh profile in the test's tmp
folder; a script injected into a copy of the report writes its measurements into the DOM on
``load``, and ``--dump-dom`` brings them back. Tests skip (with the reason) where no Chromium is
installed (Debian: ``apt-get install chromium``; ``.ci/run`` installs it as root).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var wide = Array.prototype.slice.call(document.body.querySelectorAll('*')).filter(function (e) {
    return e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest('.tw');
  });
  var r = {
    images: imgs.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.alt.slice(0, 60); }),
    uncaptioned: imgs.filter(function (i) {
      var f = i.closest('figure'); return !(f && f.querySelector('figcaption'));
    }).length,
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
    height: document.documentElement.scrollHeight,
    overflowing: wide.slice(0, 5).map(function (e) { return e.tagName + '.' + e.className; })
  };
  var pre = document.createElement('pre');
  pre.id = 'browser-check';
  pre.style.display = 'none';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> str:
    """The Chromium executable, or skip the test saying how to install it."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed (apt-get install chromium): browser check skipped")


def _run(browser: str, args: list[str], profile: Path) -> str:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def check_report(html: Path, shots: Path, widths=(1280, 900)) -> dict[int, dict]:
    """Open ``html`` at each width; assert images load and nothing overflows; save screenshots.

    Args:
        html: The report (self-contained: images embedded).
        shots: Folder for ``<stem>_<width>.png`` full-page screenshots.
        widths: Window widths in CSS pixels.

    Returns:
        Width -> the measurements (images, broken, uncaptioned, scrollWidth, height, ...).
    """
    browser = find_browser()
    shots.mkdir(parents=True, exist_ok=True)
    probe = shots / f"{html.stem}_checked.html"
    text = html.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    out = {}
    for width in widths:
        dom = _run(
            browser,
            [
                f"--window-size={width},900",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            shots / "profile",
        )
        found = re.search(r'<pre id="browser-check"[^>]*>(.*?)</pre>', dom, re.S)
        assert found, "the check script did not run (no result in the DOM)"
        r = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        assert r["images"] > 0 and not r["broken"], f"images that did not load: {r['broken']}"
        assert r["scrollWidth"] <= r["innerWidth"], f"page overflows at {width}px: {r}"
        assert not r["overflowing"], f"elements past the right edge at {width}px: {r}"
        shot = shots / f"{html.stem}_{width}.png"
        _run(
            browser,
            [
                f"--window-size={width},{min(r['height'] + 20, 16000)}",
                f"--screenshot={shot}",
                html.as_uri(),
            ],
            shots / "profile",
        )
        assert shot.is_file() and shot.stat().st_size > 10_000
        out[width] = r
    return out
