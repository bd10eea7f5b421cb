"""A real Chromium, driven by Playwright, for tests that open what fedlora writes (the
HTML audit report) the way an auditor would: from disk, offline.

Playwright's own browser downloads are never used: the tests drive the system's Chromium
(Debian's ``chromium`` package), taken from ``$FEDLORA_CHROMIUM`` or found on PATH.
Without one the browser tests fail instead of skipping, so a test run cannot pass
without ever opening the report.

Use it by importing the fixture into a test module (``from tests.browser import
browser``) and opening pages with :func:`open_file`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM_ENV = "FEDLORA_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = (
    "install Debian's chromium package (`apt-get install chromium`, as the README's test "
    f"command does) or set {CHROMIUM_ENV} to a Chromium or Chrome executable"
)


def chromium_executable() -> str:
    """The Chromium to drive: ``$FEDLORA_CHROMIUM``, else the first one on PATH."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        found = shutil.which(configured)
        if found is None:
            pytest.fail(
                f"{CHROMIUM_ENV}={configured} is not an executable: {INSTALL_HINT}",
                pytrace=False,
            )
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    pytest.fail(
        f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH): the browser "
        f"tests need a real browser; {INSTALL_HINT}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the whole session."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need the playwright package: install the test extras "
            '(pip install -e ".[test]")',
            pytrace=False,
        )
    executable = chromium_executable()
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as error:
            pytest.fail(f"Chromium at {executable} did not start: {error}", pytrace=False)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class OpenedPage:
    """A page and what it did while open."""

    page: Page
    errors: list[str] = field(default_factory=list)
    """Uncaught exceptions and console errors."""
    dialogs: list[str] = field(default_factory=list)
    """alert/confirm/prompt messages (each dismissed)."""
    requests: list[str] = field(default_factory=list)
    """Every URL the page asked for that is not a file: or data: URL."""


@contextmanager
def open_file(
    browser: Browser, path: Path, *, width: int = 1280, height: int = 900
) -> Iterator[OpenedPage]:
    """Open ``path`` through a file:// URL in a fresh context of the given viewport."""
    context = browser.new_context(viewport={"width": width, "height": height})
    try:
        page = context.new_page()
        opened = OpenedPage(page)
        page.on("pageerror", lambda error: opened.errors.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                opened.errors.append(f"console {message.type}: {message.text}")
                if message.type == "error"
                else None
            ),
        )

        def on_dialog(dialog: object) -> None:
            opened.dialogs.append(dialog.message)  # type: ignore[attr-defined]
            dialog.dismiss()  # type: ignore[attr-defined]

        page.on("dialog", on_dialog)
        page.on(
            "request",
            lambda request: (
                None
                if request.url.startswith(("file:", "data:"))
                else opened.requests.append(request.url)
            ),
        )
        page.goto(path.resolve().as_uri(), wait_until="load")
        yield opened
    finally:
        context.close()
