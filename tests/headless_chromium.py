"""What a person would see of an HTML file: Chromium (the Debian package ``chromium``,
deploy/install-system-deps.sh) loads it headless and hands back the DOM it built, or a
screenshot; :class:`Dom` reads that DOM, :func:`png_pixels` the screenshot.

A missing Chromium fails the test that needs it, saying so: it is never skipped.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

#: a page of a few hundred KB loads in well under a second; a loaded machine is slower
TIMEOUT_S = 120
#: elements whose content a person does not see as text
_UNSEEN = frozenset({"head", "style", "script", "title"})
#: elements that have no end tag in serialised HTML
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: this test renders the page in headless Chromium "
            "(Debian package `chromium`; deploy/install-system-deps.sh installs it as root)",
            pytrace=False,
        )
    return path


def _run(page: Path, *flags: str) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        ran = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={profile}",
                *flags,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    if ran.returncode != 0:
        raise AssertionError(f"chromium exited with {ran.returncode}: {ran.stderr[-2000:]}")
    return ran.stdout


def dump_dom(page: Path) -> Dom:
    """The DOM Chromium built from ``page``."""
    out = _run(page, "--dump-dom")
    assert out.strip(), "chromium printed no DOM"
    return Dom.parse(out)


def screenshot(page: Path, png: Path, *, width: int = 900, height: int = 700) -> None:
    """A ``width`` x ``height`` screenshot of the top of ``page``, as PNG."""
    _run(page, f"--screenshot={png}", f"--window-size={width},{height}", "--hide-scrollbars")
    assert png.is_file(), "chromium wrote no screenshot"


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str, css_class: str | None = None) -> list[Element]:
        return [
            e
            for e in self.iter()
            if e.tag == tag and (css_class is None or css_class in e.classes())
        ]

    def find(self, tag: str, css_class: str | None = None) -> Element:
        found = self.find_all(tag, css_class)
        assert found, f"no <{tag} class={css_class!r}>"
        return found[0]

    def text(self) -> str:
        """The text a person sees in this element (not styles, scripts or tooltips)."""
        if self.tag in _UNSEEN:
            return ""
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class Dom(Element):
    """The document, as a tree of :class:`Element`."""

    @classmethod
    def parse(cls, markup: str) -> Dom:
        builder = _Builder()
        builder.feed(markup)
        builder.close()
        return builder.root


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Dom("#document", {})
        self.open: list[Element] = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.open[-1].children.append(element)
        if tag not in _VOID:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.open) - 1, 0, -1):
            if self.open[depth].tag == tag:
                del self.open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.open[-1].children.append(data)


def png_pixels(png: Path) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and the pixels (RGB or RGBA) of an 8-bit, non-interlaced PNG: what
    Chromium writes."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, idat = 8, b""
    width = height = channels = 0
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        at += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, "unexpected PNG format"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    pixels: list[tuple[int, ...]] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(raw[start], line, previous, channels)
        pixels += [tuple(line[x : x + channels]) for x in range(0, stride, channels)]
        previous = line
    return width, height, pixels


def _unfilter(kind: int, line: bytearray, above: bytearray, bpp: int) -> None:
    """Undo a scanline's PNG filter (PNG spec, section 9) in place."""
    assert kind in range(5), f"unknown PNG filter {kind}"
    if kind == 0:
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = above[i]
        if kind == 1:
            add = left
        elif kind == 2:
            add = up
        elif kind == 3:
            add = (left + up) // 2
        else:
            corner = above[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            add = left if pa <= pb and pa <= pc else up if pb <= pc else corner
        line[i] = (line[i] + add) & 0xFF
