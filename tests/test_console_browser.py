"""The console in a real browser: Debian's chromium, headless, driven by Selenium through
Debian's chromedriver. scripts/test installs both (packages chromium and chromium-driver).

The driver is named by its path and SE_OFFLINE is set, so Selenium Manager never looks
for a driver or a browser of its own. The gateway runs in the test's event loop (real
Redis and PostgreSQL, the fake provider); the browser is driven from a worker thread
(`asyncio.to_thread`), since each of its calls waits for pages this same loop serves.

Screenshots of every page go into the test's folder, or into docs/console/ (which the
README shows) when GATEWAY_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from bench.console import LedgerShape, load_ledger
from tests.conftest import ADMIN_KEY, T0_MS, RunningGateway, StartGateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "console"
UPDATE_SCREENSHOTS = "GATEWAY_UPDATE_SCREENSHOTS"
DESKTOP = (1280, 900)
PHONE = (390, 844)
HI = [{"role": "user", "content": "Say hello to the console."}]
POLICIES = """
policies:
  - name: per-user
    scope: user
    limits:
      - {requests: 1000, per: minute}
      - {tokens: 1000000, per: minute}
  - name: per-team
    scope: team
    limits:
      - {tokens: 5000000, per: minute}
"""
# Recorded in the page's sessionStorage (it outlives each navigation within the console)
# by a script the driver adds to every document before the page's own: the CSP does not
# apply to it, and it hears every violation and uncaught error of the page.
WATCH_PAGE = """
(function () {
  function note(name, text) {
    var seen = JSON.parse(window.sessionStorage.getItem(name) || "[]");
    seen.push(text);
    window.sessionStorage.setItem(name, JSON.stringify(seen));
  }
  document.addEventListener("securitypolicyviolation", function (event) {
    note("csp-violations", event.violatedDirective + " blocked " + (event.blockedURI || "inline") +
      " at " + event.documentURI);
  });
  window.addEventListener("error", function (event) {
    note("js-errors", String(event.message) + " at " + event.filename + ":" + event.lineno);
  });
})();
"""
WAIT_SECONDS = 15


@dataclass
class ConsoleBrowser:
    """A headless chromium on the console at `base`, with the few moves the tests make."""

    driver: WebDriver
    base: str = ""

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    @property
    def path(self) -> str:
        return str(self.driver.current_url).removeprefix(self.base)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def wait_for_path(self, path: str) -> None:
        WebDriverWait(self.driver, WAIT_SECONDS).until(lambda _: self.path == path)

    def submit_with(self, button_id: str) -> None:
        """Click a form's button and wait until the next page has replaced this one."""
        page = self.find("html")
        self.find(f"#{button_id}").click()
        WebDriverWait(self.driver, WAIT_SECONDS).until(expected_conditions.staleness_of(page))
        WebDriverWait(self.driver, WAIT_SECONDS).until(
            lambda driver: driver.execute_script("return document.readyState") == "complete"
        )

    def login(self) -> None:
        self.open("/ui/")
        assert self.path == "/ui/login?next=/ui/"
        self.find("#admin_key").send_keys(ADMIN_KEY)
        self.submit_with("login")
        assert self.path == "/ui/"

    def viewport(self, width: int, height: int) -> None:
        """The page's viewport exactly this size, in CSS pixels at one device pixel each."""
        self.driver.execute_cdp_cmd(  # type: ignore[attr-defined]
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def script(self, source: str) -> object:
        return self.driver.execute_script(source)

    def press(self, key: str) -> None:
        ActionChains(self.driver).send_keys(key).perform()

    def focused_id(self) -> str:
        return str(self.script("return document.activeElement ? document.activeElement.id : ''"))

    def problems(self) -> list[str]:
        """What the browser reported since the last call: console errors, CSP violations,
        uncaught script errors (the watch script's notes are read once each)."""
        logged = [
            f"{entry['level']}: {entry['message']}"
            for entry in self.driver.get_log("browser")  # type: ignore[no-untyped-call]
            if entry["level"] in ("SEVERE", "WARNING")
        ]
        noted = self.script(
            "var found = [];"
            "['csp-violations', 'js-errors'].forEach(function (name) {"
            "  found = found.concat(JSON.parse(window.sessionStorage.getItem(name) || '[]'));"
            "  window.sessionStorage.removeItem(name); });"
            "return found;"
        )
        assert isinstance(noted, list)
        return logged + [str(item) for item in noted]

    def screenshot(self, name: str, folder: Path) -> Path:
        path = folder / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        return path


@pytest.fixture
def chrome(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsoleBrowser]:
    for program, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not program.exists():
            pytest.fail(f"{program} is missing; run the tests with scripts/test, which installs {package}")
    # Selenium Manager would otherwise try to fetch a driver when it thinks one is missing.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root, in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--force-color-profile=srgb",
        "--lang=en-US",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_PAGE})
        browser = ConsoleBrowser(driver)
        browser.viewport(*DESKTOP)
        yield browser
    finally:
        driver.quit()


@pytest.fixture
async def clean_database(pg: asyncpg.Connection) -> asyncpg.Connection:
    exists = await pg.fetchval("SELECT to_regclass('console_sessions')")
    if exists is not None:
        await pg.execute("TRUNCATE console_sessions")
    return pg


async def console_gateway(
    start_gateway: StartGateway,
    database: asyncpg.Connection,
    browser: ConsoleBrowser,
    policies: str = POLICIES,
    *,
    frozen: bool = True,
) -> RunningGateway:
    """A gateway with a month of generated history (so every page has something to show)
    and the browser pointed at it. `frozen`: the quota clock stands still, so counters
    never roll over between two readings."""
    gateway = await start_gateway(policies, clock_ms=(lambda: T0_MS) if frozen else None)
    shape = LedgerShape(rows=3_000, days=30, users=6, teams=3, keys=8, models=5)
    await load_ledger(database, shape, datetime.now(UTC))
    browser.base = gateway.url
    return gateway


# ---------------------------------------------------------------- a key from creation to use


def create_key(browser: ConsoleBrowser, user: str, team: str) -> tuple[str, str]:
    browser.login()
    browser.open("/ui/keys")
    browser.find("#key-user").send_keys(user)
    browser.find("#key-team").send_keys(team)
    browser.find("#key-models").send_keys("gpt-4o-mini")
    browser.submit_with("create-key-submit")
    assert browser.path == "/ui/keys"
    key = browser.find("input#new-key").get_attribute("value")
    key_id = browser.find("#new-key-id").text
    assert key is not None and key.startswith("gw-"), key
    return key, key_id


def tokens_meter(browser: ConsoleBrowser, scope: str, subject: str, limit: str) -> tuple[float, str]:
    """The meter's value and the used cell's figure of one limit on the Quotas page."""
    browser.open("/ui/quotas")
    row = f'section#quota-{scope}-{subject} tr[data-limit="{limit}"]'
    meter = browser.find(f"{row} meter").get_attribute("value")
    used = browser.find(f'{row} td[data-column="used"]').get_attribute("data-value")
    assert meter is not None and used is not None
    return float(meter), used


def usage_of_key(browser: ConsoleBrowser, key_id: str) -> dict[str, str]:
    """The Usage page's row of one key today, reached through its form."""
    browser.open("/ui/usage")
    Select(browser.find("#by")).select_by_value("key")
    browser.find("#filter-key").send_keys(key_id)
    browser.submit_with("show-report")
    assert browser.path.startswith("/ui/usage?by=key&"), browser.path
    figures = {}
    for column in ("requests", "prompt_tokens", "completion_tokens", "cost_usd"):
        cell = browser.find(f'#usage-table tr[data-name="{key_id}"] td[data-column="{column}"]')
        figures[column] = cell.get_attribute("data-value") or ""
    return figures


async def test_a_key_made_in_the_browser_is_used_and_its_request_shows_in_usage_and_quotas(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, chrome: ConsoleBrowser
) -> None:
    gateway = await console_gateway(start_gateway, clean_database, chrome)
    key, key_id = await asyncio.to_thread(create_key, chrome, "dora", "lab")
    limit = "per-user:tokens:minute"
    before, used_before = await asyncio.to_thread(tokens_meter, chrome, "user", "dora", limit)
    assert (before, used_before) == (0.0, "0")

    answer = await gateway.client(key=key).chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_tokens=5
    )
    assert answer.usage is not None
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    assert prompt > 0 and completion > 0
    await gateway.settle()

    figures = await asyncio.to_thread(usage_of_key, chrome, key_id)
    cost = (prompt * 0.15 + completion * 0.6) / 1_000_000
    assert figures == {
        "requests": "1",
        "prompt_tokens": str(prompt),
        "completion_tokens": str(completion),
        "cost_usd": f"{cost:.6f}",
    }
    after, used_after = await asyncio.to_thread(tokens_meter, chrome, "user", "dora", limit)
    assert after - before == prompt + completion
    assert used_after == str(prompt + completion)
    team_after, _ = await asyncio.to_thread(tokens_meter, chrome, "team", "lab", "per-team:tokens:minute")
    assert team_after == prompt + completion
    assert await asyncio.to_thread(chrome.problems) == []


# ---------------------------------------------------------------- keyboard


NAV = ("overview", "usage", "keys", "quotas", "policies", "health")
NAV_PATHS = {"overview": "/ui/", "usage": "/ui/usage", "keys": "/ui/keys"}
NAV_PATHS |= {"quotas": "/ui/quotas", "policies": "/ui/policies", "health": "/ui/health"}
FOCUS_STYLE = "return [getComputedStyle(document.activeElement).outlineStyle, getComputedStyle(document.activeElement).outlineWidth, getComputedStyle(document.activeElement).outlineColor, document.activeElement.matches(':focus-visible')]"


def tab_to(browser: ConsoleBrowser, element_id: str, most: int = 30) -> int:
    """Tab until `element_id` has the focus; how many presses it took."""
    for presses in range(1, most + 1):
        browser.press(Keys.TAB)
        if browser.focused_id() == element_id:
            return presses
    raise AssertionError(f"#{element_id} not reached in {most} presses of Tab")


def walk_by_keyboard(browser: ConsoleBrowser) -> list[tuple[str, int, list[object]]]:
    """Log in and visit every page with Tab and Enter alone; (page, presses, focus style) of each."""
    browser.open("/ui/")
    # The key field has autofocus: type, Enter submits the form.
    assert browser.focused_id() == "admin_key"
    page = browser.find("html")
    browser.press(ADMIN_KEY + Keys.ENTER)
    WebDriverWait(browser.driver, WAIT_SECONDS).until(expected_conditions.staleness_of(page))
    browser.wait_for_path("/ui/")
    visited = []
    for name in (*NAV[1:], NAV[0]):
        # Each page as it loads: the focus starts at its top.
        presses = tab_to(browser, f"nav-{name}")
        style = browser.script(FOCUS_STYLE)
        assert isinstance(style, list)
        page = browser.find("html")
        browser.press(Keys.ENTER)
        WebDriverWait(browser.driver, WAIT_SECONDS).until(expected_conditions.staleness_of(page))
        browser.wait_for_path(NAV_PATHS[name])
        current = browser.find(f"#nav-{name}").get_attribute("aria-current")
        assert current == "page", name
        visited.append((name, presses, style))
    # The first Tab reaches the skip link, shown while focused; Enter moves the focus to the content.
    browser.press(Keys.TAB)
    assert browser.script(
        "return document.activeElement.classList.contains('skip-link')"
        " && document.activeElement.getBoundingClientRect().left >= 0"
    )
    browser.press(Keys.ENTER)
    assert browser.focused_id() == "main"
    return visited


async def test_every_page_is_reached_with_the_keyboard_and_the_focus_is_visible(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, chrome: ConsoleBrowser
) -> None:
    await console_gateway(start_gateway, clean_database, chrome)
    visited = await asyncio.to_thread(walk_by_keyboard, chrome)
    assert [name for name, _, _ in visited] == [*NAV[1:], NAV[0]]
    for name, presses, style in visited:
        # Skip link first, then the navigation in order: nothing hidden takes the focus before it.
        assert presses == 2 + NAV.index(name), (name, presses)
        # console.css: a 3 px amber outline on :focus-visible.
        assert style == ["solid", "3px", "rgb(245, 158, 11)", True], (name, style)
    assert await asyncio.to_thread(chrome.problems) == []


# ---------------------------------------------------------------- phone width


PAGES = {
    "overview": "/ui/",
    "overview-month": "/ui/?period=month",
    "usage": "/ui/usage?by=model",
    "usage-by-day": "/ui/usage?by=day",
    "keys": "/ui/keys",
    "quotas": "/ui/quotas",
    "quota-reset": "/ui/quotas/user/user-00/reset",
    "policies": "/ui/policies",
    "health": "/ui/health",
}
FIT = """
var page = document.documentElement;
var regions = Array.from(document.querySelectorAll('.table-scroll')).map(function (region) {
  var box = region.getBoundingClientRect();
  return {left: box.left, right: box.right, inner: region.scrollWidth, shown: region.clientWidth,
          overflow: getComputedStyle(region).overflowX};
});
return {scrollWidth: page.scrollWidth, innerWidth: window.innerWidth, regions: regions};
"""


def measure_at_phone_width(browser: ConsoleBrowser, folder: Path) -> dict[str, dict[str, object]]:
    browser.viewport(*PHONE)
    measured = {}
    browser.open("/ui/login")
    measured["login"] = browser.script(FIT)
    browser.screenshot("phone-login", folder)
    browser.login()
    for name, path in PAGES.items():
        browser.open(path)
        found = browser.script(FIT)
        assert isinstance(found, dict)
        measured[name] = found
        browser.screenshot(f"phone-{name}", folder)
    return measured  # type: ignore[return-value]


async def test_every_page_fits_a_phone_and_wide_tables_scroll_inside_their_box(
    tmp_path: Path, start_gateway: StartGateway, clean_database: asyncpg.Connection, chrome: ConsoleBrowser
) -> None:
    await console_gateway(start_gateway, clean_database, chrome)
    measured = await asyncio.to_thread(measure_at_phone_width, chrome, tmp_path)
    scrolling_inside = 0
    for name, found in measured.items():
        assert found["innerWidth"] == PHONE[0], name
        # Nothing wider than the screen: the page never scrolls sideways.
        assert found["scrollWidth"] <= PHONE[0], (name, found)
        regions = found["regions"]
        assert isinstance(regions, list)
        for region in regions:
            assert region["overflow"] == "auto", (name, region)
            assert 0 <= region["left"] and region["right"] <= PHONE[0], (name, region)
            if region["inner"] > region["shown"]:
                scrolling_inside += 1
    # The keys table (nine columns) and others are wider than a phone: they scroll in their box.
    assert scrolling_inside >= 3, measured
    assert await asyncio.to_thread(chrome.problems) == []


# ---------------------------------------------------------------- CSP, scripts, screenshots


def screenshot_issued_key(browser: ConsoleBrowser, folder: Path) -> tuple[str, list[str]]:
    """Log in, make a key, and take its page's picture with a dummy in the key's place
    (the key is shown once, on this page only)."""
    browser.open("/ui/login")
    browser.screenshot("login", folder)
    problems = browser.problems()
    key, _ = create_key(browser, "dora", "lab")
    browser.script("document.getElementById('new-key').value = 'gw-' + '\u2022'.repeat(43);")
    assert browser.find("#new-key").get_attribute("value") != key
    browser.screenshot("key-issued", folder)
    return key, problems + browser.problems()


# A tmp folder's name means nothing to a reader of the README: the files' place as installed.
SHOW_POLICY_FILES_AS_INSTALLED = (
    "document.querySelectorAll('#files-table code').forEach(function (cell) {"
    "  cell.textContent = cell.textContent.replace(/^.*\\/policies\\//, '/etc/gateway/policies/'); });"
)


def visit_every_page(browser: ConsoleBrowser, folder: Path) -> dict[str, list[str]]:
    """Every page at desktop width, each screenshot taken, and what the browser reported on each."""
    reported = {}
    today = datetime.now(UTC).date()
    month_ago = (today - timedelta(days=29)).isoformat()
    shots = {
        "overview": "/ui/",
        "usage": f"/ui/usage?by=model&since={month_ago}",
        "keys": "/ui/keys",
        "quotas": "/ui/quotas?subject=dora",
        "policies": "/ui/policies",
        "health": "/ui/health",
    }
    for name, path in shots.items():
        browser.open(path)
        if name in ("overview", "usage"):
            # Drawn by console.js with the vendored uPlot: both scripts ran under the CSP.
            WebDriverWait(browser.driver, WAIT_SECONDS).until(
                lambda driver: driver.find_elements(By.CSS_SELECTOR, "#chart div.uplot canvas")
            )
        if name == "policies":
            browser.script(SHOW_POLICY_FILES_AS_INSTALLED)
        browser.screenshot(name, folder)
        reported[name] = browser.problems()
    for name, path in PAGES.items():
        browser.open(path)
        reported.setdefault(name, []).extend(browser.problems())
    return reported


def inline_script_is_refused(browser: ConsoleBrowser) -> list[str]:
    """The watch works: an inline script added to a page is refused, and both the
    console log and the page's violation event report it."""
    browser.open("/ui/health")
    browser.script(
        "var element = document.createElement('script');"
        "element.textContent = 'window.inlineRan = true;';"
        "document.body.appendChild(element);"
    )
    assert browser.script("return window.inlineRan === true") is False
    return browser.problems()


# Limits a screenshot can show moving: a few requests fill a visible part of each bar.
SCREENSHOT_POLICIES = """
policies:
  - name: per-user
    scope: user
    limits:
      - {requests: 10, per: minute}
      - {tokens: 400, per: minute}
  - name: per-team
    scope: team
    limits:
      - {tokens: 100000, per: day}
"""


async def test_no_page_reports_a_csp_violation_or_a_script_error_and_each_has_a_screenshot(
    tmp_path: Path, start_gateway: StartGateway, clean_database: asyncpg.Connection, chrome: ConsoleBrowser
) -> None:
    gateway = await console_gateway(start_gateway, clean_database, chrome, SCREENSHOT_POLICIES, frozen=False)
    folder = SCREENSHOTS if os.environ.get(UPDATE_SCREENSHOTS) == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    key, first_problems = await asyncio.to_thread(screenshot_issued_key, chrome, folder)
    for tokens in (20, 40, 60):
        await gateway.client(key=key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=tokens
        )
    await gateway.settle()
    reported = await asyncio.to_thread(visit_every_page, chrome, folder)
    reported["login and key-issued"] = first_problems
    assert {name: problems for name, problems in reported.items() if problems} == {}
    for name in ("login", "key-issued", "overview", "usage", "keys", "quotas", "policies", "health"):
        picture = folder / f"{name}.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    refused = await asyncio.to_thread(inline_script_is_refused, chrome)
    assert any("Content Security Policy" in line for line in refused), refused
    assert any(line.startswith("script-src") for line in refused), refused
