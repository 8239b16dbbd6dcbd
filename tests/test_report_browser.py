"""The demo's report in a real browser: headless Chromium opens index.html from file://, offline.

Every <img> must have loaded, the recall tables and both galleries must be there, and no request may leave the
file system. The screenshot it takes is the README's picture: set BLIP_REPORT_SCREENSHOT=docs/report.png to
write it there (optimised to a 256-colour PNG).
Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium (requirements-dev.txt).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from PIL import Image

SCREENSHOT_ENV = 'BLIP_REPORT_SCREENSHOT'
REQUIRE_ENV = 'BLIP_REQUIRE_CHROMIUM'  # set by .ci/run: a missing browser fails the test there
WINDOW = (1280, 1500)
# Flags for a closed network: no first-run, sync, component or background fetches of the browser's own.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--disable-dev-shm-usage', f'--window-size={WINDOW[0]},{WINDOW[1]}')


def chromium_or_skip() -> tuple[str, str]:
    """(browser, driver) paths; skip with the fix when missing, fail instead under CI (BLIP_REQUIRE_CHROMIUM=1)."""
    unavailable = pytest.fail if os.environ.get(REQUIRE_ENV) == '1' else pytest.skip
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable('selenium is not installed: pip install -r requirements-dev.txt')
    browser = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
    driver = shutil.which('chromedriver')
    if not browser or not driver:
        unavailable('Chromium or its driver not found: apt-get install -y chromium chromium-driver (.ci/run does)')
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver_path = chromium_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + (f'--user-data-dir={tmp_path / "profile"}',):
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'performance': 'ALL'})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def requests_sent(driver) -> list[dict]:
    """Network.requestWillBeSent events since the last call (Chrome's performance log)."""
    events = [json.loads(entry['message'])['message'] for entry in driver.get_log('performance')]
    return [event['params'] for event in events if event['method'] == 'Network.requestWillBeSent']


def test_demo_report_opens_offline_in_chromium(browser, demo_run, tmp_path):
    index = demo_run['out'] / 'report' / 'index.html'
    requests_sent(browser)  # the browser's own start-up page (chrome://), before ours
    browser.get(index.as_uri())
    deadline = time.time() + 30
    while browser.execute_script('return document.readyState !== "complete" || '
                                 'Array.from(document.images).some(i => !i.complete)'):
        assert time.time() < deadline, 'the page did not finish loading in 30 s'
        time.sleep(0.1)

    images = browser.execute_script('return Array.from(document.images).map(i => [i.getAttribute("src"), '
                                    'i.naturalWidth])')
    assert len(images) > 50, len(images)  # plots and thumbnails of both splits
    assert [src for src, width in images if width == 0] == []  # every image loaded
    count = lambda selector: browser.execute_script(f'return document.querySelectorAll({selector!r}).length')
    assert count('table.recall') == 2 and count('table.recall td[data-metric]') == 14
    # Chance beside each recall table: what the console's summary printed for the split.
    chance = browser.execute_script('return Array.from(document.querySelectorAll("table.recall tr.chance '
                                    'td[data-chance=r_mean]")).map(td => [td.closest("table").dataset.split, '
                                    'td.textContent])')
    printed = re.findall(r'^  (val|test) +r_mean .*\(chance r_mean ([\d.]+)\)$', demo_run['stdout'], flags=re.M)
    assert len(printed) == 2 and sorted(map(tuple, chance)) == sorted(printed), (chance, printed)
    assert count('table.recall tr.chance td[data-chance]') == 14
    for direction in ('t2i', 'i2t'):
        assert count(f'section.gallery.{direction}') == 2, direction  # val and test
        assert count(f'section.gallery.{direction} .query') == 2 * 24, direction

    # At 1280 px: under each thumbnail the score and its formula each stay on one line inside the figure, and
    # a query's top 5 stay in one row.
    browser.execute_cdp_cmd('Emulation.setDeviceMetricsOverride', {  # the viewport exactly, whatever the window
        'width': WINDOW[0], 'height': WINDOW[1], 'deviceScaleFactor': 1, 'mobile': False})
    layout = browser.execute_script('''
        const figures = Array.from(document.querySelectorAll('figure.hit'));
        const broken = [], outside = [], rows = [];
        for (const figure of figures) {
            const box = figure.getBoundingClientRect();
            for (const nums of figure.querySelectorAll('.nums')) {
                const line = nums.getBoundingClientRect();
                if (nums.getClientRects().length !== 1) broken.push(nums.textContent);
                if (line.left < box.left || line.right > box.right - 5) outside.push(nums.textContent);
            }
        }
        for (const hits of document.querySelectorAll('.t2i .hits')) {
            const tops = Array.from(hits.querySelectorAll('figure.hit:not(.extra)'), f => f.getBoundingClientRect().top);
            rows.push(new Set(tops).size);
        }
        return {figures: figures.length, lines: document.querySelectorAll('figure.hit .nums').length,
                broken: broken, outside: outside, rows: rows};
    ''')
    assert layout['figures'] > 100 and layout['lines'] == 2 * layout['figures'], layout  # all re-ranked (k_test 16)
    assert layout['broken'] == [] and layout['outside'] == [] and set(layout['rows']) == {1}, layout

    sent = requests_sent(browser)
    ours = [r['request']['url'] for r in sent if r.get('documentURL', '').startswith('file:')]
    assert ours and all(url.startswith(('file:', 'data:')) for url in ours), ours
    assert index.as_uri() in ours and any(url.endswith('.jpg') for url in ours)
    # Nothing left the machine at all (the browser's own chrome:// pages are not network requests).
    assert [r['request']['url'] for r in sent if r['request']['url'].split(':')[0] in ('http', 'https', 'ws', 'wss',
                                                                                          'ftp')] == []

    shot = tmp_path / 'report.png'
    browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size == WINDOW
        small = image.convert('RGB').quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(tmp_path / 'report_small.png', optimize=True)
    assert (tmp_path / 'report_small.png').stat().st_size < 300_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(tmp_path / 'report_small.png', os.environ[SCREENSHOT_ENV])


def test_results_table_sorts_and_links_to_each_report_in_chromium(browser, result_runs, tmp_path):
    """`python -m report.table` over the shared runs and a broken folder: rows, links and sorting, offline."""
    from report.table import main as table_main
    out = tmp_path / 'table'
    runs = [str(path) for path in result_runs['runs'].values()] + [str(result_runs['broken'])]
    assert table_main(runs + ['--out', str(out)]) == 0
    requests_sent(browser)
    browser.get((out / 'index.html').as_uri())
    script = lambda js: browser.execute_script(js)
    rows = script('return Array.from(document.querySelectorAll("table.results tbody tr")).map(r => '
                  '[r.getAttribute("data-run"), r.getAttribute("data-split")])')
    assert sorted(map(tuple, rows)) == sorted((str(path), split) for path in result_runs['runs'].values()
                                              for split in ('val', 'test'))
    links = script('return Array.from(document.querySelectorAll("table.results a")).map(a => a.href)')
    assert len(links) == 6 and all(link.startswith('file:') and link.endswith('/report/index.html') for link in links)
    assert script('return document.querySelector("ul.skipped li").getAttribute("data-run")') == \
        str(result_runs['broken'])
    assert all(script(f'return document.querySelectorAll("table.results th")[{i}].offsetHeight') > 0 for i in (0, 11))

    # A click on TR@1 sorts the rows by it, a second click the other way; empty cells stay last.
    column = script('return Array.from(document.querySelectorAll("table.results th")).findIndex('
                    'th => th.getAttribute("data-key") === "txt_r1")')
    values = lambda: script(f'return Array.from(document.querySelectorAll("table.results tbody tr")).map('
                            f'r => Number(r.cells[{column}].getAttribute("data-value")))')
    header = browser.find_elements('css selector', 'table.results th')[column]
    header.click()
    assert values() == sorted(values())
    header.click()
    assert values() == sorted(values(), reverse=True)

    # Each link opens its run's report.
    browser.get(links[0])
    assert browser.title == 'Retrieval report'
    sent = requests_sent(browser)
    assert [r['request']['url'] for r in sent if r['request']['url'].split(':')[0] in ('http', 'https', 'ws', 'wss',
                                                                                          'ftp')] == []
