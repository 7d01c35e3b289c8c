"""Headless Chromium for the dashboards' browser tests (Debian's package; installed with
apt-get when missing and possible, else these tests skip saying why)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser.cdp import Browser, find_chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed and cannot be installed here "
                    "(needs root and apt-get: apt-get install chromium)")
    return path


@pytest.fixture(scope="session")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    base = tmp_path_factory.mktemp("chromium")
    started = Browser(chromium, base / "profile", base / "chromium.log")
    yield started
    started.close()
