"""The web page (GET /) in a real browser against the real stack: search by file, thumbnails from presigned
URLs, click-through search by key, the status strip, API errors shown. Debian's Chromium drives it through
Playwright; `playwright install` is never needed."""

from __future__ import annotations

import functools
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from infra.samples import write_samples
from infra.stack import Stack

from .helpers import object_state, photo, wait_for

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
# A search by image embeds and verifies on a shared 2-core host, late in the suite behind a duplicate finder's
# backlog: Playwright's default of 5 s for each expectation is too short a wait there.
expect.set_options(timeout=30_000)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
COPY = "copies/chelsea-smaller.jpg"
PHOTOS = ("chelsea.jpg", "coffee.jpg", "rocket.jpg", COPY)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def make_unique(path: Path, seed: str) -> None:
    """Rotate the photo by a small angle derived from ``seed`` (then crop the corners away): the shared stack
    may hold byte-identical copies from other tests, which would tie with ours at score 1.0."""
    turn = int(hashlib.sha256(seed.encode()).hexdigest(), 16) % 40
    image = Image.open(path).convert("RGB").rotate(1.0 + turn / 10, resample=Image.Resampling.BICUBIC)
    w, h = image.size
    image.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(path, quality=92)


def why_not_grouped(stack: Stack, api: httpx.Client, prefix: str, photo: str, copy: str) -> str:
    """What the service says of two objects that were not grouped: the finder's state, where each ranks among the
    other's 40 nearest, with its matches, and the index service's last warnings and errors."""
    stats = api.get("/stats").json()
    said = [f"/duplicates: {api.get('/duplicates', params={'prefix': prefix}).text[:2000]}",
            f"/stats: duplicates {stats.get('duplicates')}, index_type {stats.get('index_type')}, "
            f"vectors {stats.get('vectors')}, generation {stats.get('generation')}, writer {stats.get('writer')}"]
    log = stack.home / "logs" / "api.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    said += [line[:400] for line in lines if " INFO " not in line][-30:]  # warnings, errors and their tracebacks
    for key, other in ((photo, copy), (copy, photo)):
        for rerank in (False, True):  # by global score (the finder's proposals), then as a search orders them
            hits = api.post("/search", json={"key": key, "k": 40, "rerank": rerank}).json().get("results", [])
            rank = next((i for i, h in enumerate(hits) if h["key"] == other), None)
            said.append(f"from {key} (rerank {rerank}): {other} at rank {rank} of {len(hits)}: "
                        + str({f: hits[rank].get(f) for f in ("score", "matches")} if rank is not None else hits[-1:]))
    return "\n".join(said)


def indexed(api: httpx.Client, bucket: str, key: str) -> bool:
    return (object_state(api, bucket, key) or {}).get("state") == "indexed"


def open_page(
    browser: Browser, api: httpx.Client, bucket: str, keys: list[str], viewport: tuple[int, int] = (1280, 900)
) -> tuple[Page, list[str]]:
    """Wait until ``keys`` are indexed, then a page with the JavaScript errors it will raise."""
    for key in keys:
        wait_for(functools.partial(indexed, api, bucket, key), timeout_s=180, interval_s=0.5, what=f"{key} indexed")
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    return page, js_errors


def wait_thumbnails_loaded(page: Page, prefix: str, at_least: int = 1) -> None:
    """The thumbnails of this test's objects (``at_least`` of them) decoded real pixels: the presigned GETs to the
    S3 server worked. Only ours: on the shared stack other tests' objects may come and go while the page loads,
    and a search by key may rank other tests' copies of the same photo above ours."""
    page.wait_for_function(
        """([prefix, atLeast]) => {
            const imgs = [...document.querySelectorAll('[data-testid=result]')]
                .filter((card) => card.dataset.key.startsWith(prefix))
                .map((card) => card.querySelector('[data-testid=result-thumb]'));
            return imgs.length >= atLeast
                && imgs.every((img) => img.complete && img.naturalWidth > 1 && !img.classList.contains('broken'));
        }""",
        arg=[prefix, at_least],
        timeout=30_000,
    )


def test_search_by_file_then_click_through(
    browser: Browser, stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str, tmp_path: Path
) -> None:
    bucket = stack.settings.bucket
    samples = {p.relative_to(tmp_path).as_posix(): p for p in write_samples(tmp_path)}
    keys = {}
    for name in PHOTOS:  # the copy is this test's own turned photo made smaller (last): the sample's flipped copy,
        # turned by an angle of its own, sat 25-52 apart late in the whole suite, other tests' copies of the photo
        # between them, and was not always grouped (CI, 420 s)
        if name == COPY:
            samples[name] = tmp_path / name
            samples[name].parent.mkdir(exist_ok=True)
            turned = Image.open(samples["chelsea.jpg"])
            turned.resize((turned.width * 2 // 3, turned.height * 2 // 3)).save(samples[name], quality=90)
        else:
            make_unique(samples[name], unique_prefix + name)
        keys[name] = unique_prefix + name
        s3.upload_file(str(samples[name]), bucket, keys[name], ExtraArgs={"ContentType": "image/jpeg"})
    try:
        page, js_errors = open_page(browser, api, bucket, list(keys.values()))
        api_calls: list[tuple[str, str | None]] = []  # (path, Authorization) of the page's calls to the API

        def record(request: Request) -> None:
            if request.url.startswith(stack.api_url + "/") and request.resource_type == "fetch":
                api_calls.append((request.url[len(stack.api_url) :], request.headers.get("authorization")))

        page.on("request", record)
        # Opened with a read token, the page passes it on as a bearer token (the stack sets none, so any passes).
        opened = page.goto(stack.api_url + "/?token=page-token")
        assert opened is not None and opened.headers["referrer-policy"] == "no-referrer"  # the token stays here
        assert opened.headers["x-frame-options"] == "DENY" and opened.headers["x-content-type-options"] == "nosniff"
        # ... kept for the tab and taken out of the address: the history and a shared link do not carry it
        assert page.url == stack.api_url + "/", page.url

        # Status strip: filled from /stats and /queues, refreshed every 2 s.
        expect(page.get_by_test_id("status-dot")).to_have_class(re.compile(r"\bok\b"), timeout=10_000)
        assert int(re.sub(r"\D", "", page.get_by_test_id("stat-vectors").inner_text())) >= len(PHOTOS)
        expect(page.get_by_test_id("stat-model")).to_have_text(api.get("/stats").json()["model"])
        live_queue = next(iter(api.get("/queues").json()["queues"]))
        expect(page.get_by_test_id(f"queue-{live_queue}")).to_be_visible()
        expect(page.get_by_test_id("rebuild")).to_be_hidden()  # shown only while a rebuild runs (none does now)

        # An API error is shown with its message.
        page.get_by_test_id("key-input").fill(unique_prefix + "no-such-image.jpg")
        page.get_by_test_id("key-submit").click()
        expect(page.get_by_test_id("error")).to_be_visible()
        expect(page.get_by_test_id("error")).to_contain_text("not in the index")

        # Search by file: the photo's own (rotated, so unique) object comes first, at score ~1.
        page.get_by_test_id("k-input").fill("8")
        page.get_by_test_id("file-input").set_input_files(str(samples["chelsea.jpg"]))
        results = page.get_by_test_id("results")
        expect(results).to_have_attribute("data-search-count", "1")  # completed searches; the failed one is none
        expect(page.get_by_test_id("error")).to_be_hidden()
        cards = page.get_by_test_id("result")
        expect(cards.first).to_have_attribute("data-key", keys["chelsea.jpg"])
        assert float(cards.first.get_attribute("data-score") or 0) > 0.999
        assert 1 < cards.count() <= 8
        expect(page.get_by_test_id("query-label")).to_contain_text("chelsea.jpg")
        # Spatial verification confirms the photo itself (other tests' copies of it may fill the rest), and says so.
        expect(cards.first.get_by_test_id("result-verified")).to_contain_text("same photo")
        expect(page.get_by_test_id("query-meta")).to_contain_text("copies of the same photo first, then by score")
        wait_thumbnails_loaded(page, unique_prefix)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-image-search.png"), full_page=True)

        # Clicking a result searches by its key, which excludes itself from its own results.
        first_before = cards.first.get_attribute("data-key")
        cards.first.click()
        expect(results).to_have_attribute("data-search-count", "2")
        expect(results).to_have_attribute("data-query-key", keys["chelsea.jpg"])
        expect(page.get_by_test_id("query-label")).to_contain_text(keys["chelsea.jpg"])
        result_keys = [cards.nth(i).get_attribute("data-key") for i in range(cards.count())]
        assert result_keys and keys["chelsea.jpg"] not in result_keys
        assert result_keys[0] != first_before
        wait_thumbnails_loaded(page, unique_prefix, at_least=0)

        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

        # The Near-duplicates view: the photo and its copy form one group, the larger first. The finder checks half
        # of each round from the newest arrivals (~64 objects per 20 s round, fewer while objects arrive).
        try:
            wait_for(lambda: api.get("/duplicates", params={"prefix": unique_prefix}).json()["total"] == 1 or None,
                     300, what="the copies grouped")
        except AssertionError as exc:  # (CI failed here twice where local runs passed: say what the finder saw)
            try:
                said = why_not_grouped(stack, api, unique_prefix, keys["chelsea.jpg"], keys[COPY])
            except Exception as failed:  # (the timeout is what fails the test)
                said = f"(could not say more: {failed!r})"
            raise AssertionError(f"{exc}\n{said}") from exc
        page.get_by_test_id("filter-prefix").fill(unique_prefix)  # the one folder box serves the groups too
        page.get_by_test_id("dup-submit").click()
        group = page.get_by_test_id("dup-group")
        expect(group).to_have_count(1)
        members = group.get_by_test_id("dup-member")
        expect(members).to_have_count(2)
        expect(members.first).to_have_attribute("data-key", keys["chelsea.jpg"])  # more pixels than the copy
        page.screenshot(path=str(ARTIFACTS / "web-page-duplicates.png"), full_page=True)
        # A reload of the view's address (no token in it) shows it again, the kept token on its calls (below)
        assert "duplicates=1" in page.url and "token" not in page.url, page.url
        page.reload()
        expect(page.get_by_test_id("dup-group")).to_have_count(1)
        assert not js_errors, js_errors
        called = {path for path, _ in api_calls}
        assert {"/stats", "/queues", "/search"} <= called and any(p.startswith("/duplicates?") for p in called), called
        assert all(auth == "Bearer page-token" for _, auth in api_calls), api_calls
        page.close()
        # A shared link opened elsewhere, with no token kept, where the service wants one: the search says how to
        # open the page, not the API's bare "missing or wrong read token" (the API's refusal stands in here: this
        # stack sets no read token; test_auth has the service's).
        elsewhere = browser.new_page()
        elsewhere.route("**/search", lambda route: route.fulfill(status=401, json={"error": {
            "code": "unauthorized", "message": "missing or wrong read token"}}))
        elsewhere.goto(f"{stack.api_url}/?text=cat")
        expect(elsewhere.get_by_test_id("error")).to_contain_text("this page needs the read token: open it as "
                                                                  "/?token=READ_TOKEN")
        elsewhere.close()
    finally:
        for key in keys.values():
            s3.delete_object(Bucket=bucket, Key=key)


def test_search_by_words_within_a_folder_and_by_tag(
    browser: Browser, stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str, tmp_path: Path
) -> None:
    bucket = stack.settings.bucket
    keys = {name: f"{unique_prefix}{name}" for name in ("chelsea.png", "coffee.png")}
    for name, key in keys.items():
        s3.put_object(Bucket=bucket, Key=key, Body=photo(name), ContentType="image/jpeg")
    # A format the workers index but Chromium cannot show.
    tiff = tmp_path / "coffee.tif"
    Image.open(io.BytesIO(photo("coffee.png"))).save(tiff, "TIFF")
    keys["coffee.tif"] = unique_prefix + "coffee.tif"
    s3.upload_file(str(tiff), bucket, keys["coffee.tif"], ExtraArgs={"ContentType": "image/tiff"})
    try:
        page, js_errors = open_page(browser, api, bucket, list(keys.values()))
        page.goto(stack.api_url + "/")
        results, cards = page.get_by_test_id("results"), page.get_by_test_id("result")

        # Autocomplete offers labels as the words are typed.
        page.get_by_test_id("text-input").fill("espr")
        expect(page.locator("#label-options option[value=espresso]")).to_have_count(1)

        # Words, within this test's folder: the cat comes first, with its tags.
        page.get_by_test_id("filter-prefix").fill(unique_prefix)
        page.get_by_test_id("text-input").fill("cat")
        page.get_by_test_id("text-submit").click()
        expect(results).to_have_attribute("data-search-count", "1")
        expect(results).to_have_attribute("data-query-kind", "text")
        expect(cards).to_have_count(1)
        expect(cards.first).to_have_attribute("data-key", keys["chelsea.png"])
        tags = cards.first.get_by_test_id("result-tag")
        expect(tags).to_have_count(3)
        wait_thumbnails_loaded(page, unique_prefix)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-text-search.png"), full_page=True)

        # A tag is a search by that label (not a click-through to the card's key).
        first_tag = tags.first.inner_text()
        tags.first.click()
        expect(results).to_have_attribute("data-search-count", "2")
        expect(results).to_have_attribute("data-query-kind", "text")
        expect(page.get_by_test_id("query-label")).to_contain_text(first_tag)
        expect(cards.first).to_have_attribute("data-key", keys["chelsea.png"])

        # A word the model does not know: no results, and the page says which word.
        page.get_by_test_id("text-input").fill("xyzzy")
        page.get_by_test_id("text-submit").click()
        expect(results).to_have_attribute("data-search-count", "3")
        expect(page.get_by_test_id("unmatched")).to_contain_text("xyzzy")
        expect(cards).to_have_count(0)

        # A date range that starts after today keeps nothing: picking the date runs the shown search again.
        page.get_by_test_id("text-input").fill("coffee")
        page.get_by_test_id("text-submit").click()
        expect(results).to_have_attribute("data-search-count", "4")
        expect(cards).to_have_count(2)
        page.get_by_test_id("filter-after").fill("2999-01-01")
        expect(results).to_have_attribute("data-search-count", "5")
        expect(cards).to_have_count(0)

        # The TIFF, which Chromium cannot show, is found and shows the service's JPEG of it (it showed "no preview").
        page.get_by_test_id("filter-after").fill("")
        expect(results).to_have_attribute("data-search-count", "6")
        expect(cards).to_have_count(2)
        tiff_thumb = results.locator(f'[data-key="{keys["coffee.tif"]}"] [data-testid=result-thumb]')
        tiff_thumb.scroll_into_view_if_needed()
        expect(tiff_thumb).to_have_attribute("src", re.compile(r"^/preview/"))
        wait_thumbnails_loaded(page, unique_prefix, at_least=2)  # both show their pixels, none the placeholder
        page.screenshot(path=str(ARTIFACTS / "web-page-tiff.png"), full_page=True)
        tiff_path = f"/preview/{bucket}/{quote(keys['coffee.tif'])}"
        preview = api.get(tiff_path)
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg", preview.text[:200]
        assert max(Image.open(io.BytesIO(preview.content)).size) == 320
        etag = object_state(api, bucket, keys["coffee.tif"])["etag"]  # type: ignore[index]
        named = api.get(tiff_path, params={"etag": etag})  # the page names the version: a browser may keep it
        assert named.status_code == 200 and "max-age" in named.headers["cache-control"], named.headers
        other = api.get(tiff_path, params={"etag": "another-version"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "object_changed", other.text
        unknown = api.get(f"/preview/{bucket}/{quote(unique_prefix)}no-such-image.tif")  # never a way to read S3
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_object", unknown.text

        # A failed search takes the previous results away with it: they do not answer the failed query.
        page.get_by_test_id("key-input").fill(unique_prefix + "no-such-image.jpg")
        page.get_by_test_id("key-submit").click()
        expect(page.get_by_test_id("error")).to_contain_text("not in the index")
        expect(cards).to_have_count(0)
        expect(page.get_by_test_id("query")).to_be_hidden()  # the heading and the "2 results" line

        # A file searched by: the TIFF's own preview is the placeholder too (the search itself works).
        page.get_by_test_id("file-input").set_input_files(str(tiff))
        expect(results).to_have_attribute("data-search-count", "7")
        expect(page.get_by_test_id("error")).to_be_hidden()
        expect(page.get_by_test_id("query-thumb")).to_have_class(re.compile(r"\bbroken\b"))

        # A file that is not an image, refused by the page itself: a failed search as well.
        page.get_by_test_id("file-input").set_input_files(
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
        expect(page.get_by_test_id("error")).to_contain_text("notes.txt is not an image")
        expect(cards).to_have_count(0)
        expect(page.get_by_test_id("query")).to_be_hidden()
        expect(page.get_by_test_id("spinner")).to_be_hidden()
        assert not js_errors, js_errors
        page.close()
    finally:
        for key in keys.values():
            s3.delete_object(Bucket=bucket, Key=key)


def test_the_near_duplicates_view_pages_through_every_group(browser: Browser, stack: Stack) -> None:
    """The view showed the first 50 groups and no way to the rest (1,013 groups in a scale check). Now it asks for
    the next page by offset and adds it below. The API's answers are stood in for (the page's own logic is under
    test; 120 groups of real copies would take many minutes to make): /duplicates itself is tested in
    test_duplicates.py, and with real copies in this page above."""
    def group(i: int) -> dict[str, Any]:
        return {"size": 2, "pairs": 1, "min_matches": 20, "members": [
            {"bucket": "b", "key": f"g{i}-{j}.jpg", "etag": "e", "pixels": 0, "url": "data:,"} for j in range(2)]}

    asked: list[tuple[int, int]] = []

    def answer(route: Route) -> None:
        params = parse_qs(urlparse(route.request.url).query)
        offset, limit = int(params["offset"][0]), int(params["limit"][0])
        asked.append((offset, limit))
        route.fulfill(json={"total": 120, "pending": 0, "offset": offset, "limit": limit,
                            "groups": [group(i) for i in range(offset, min(120, offset + limit))]})

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    page.route(re.compile(r".*/duplicates\?.*"), answer)
    page.goto(stack.api_url + "/")
    page.get_by_test_id("dup-submit").click()
    groups, summary, more = (page.get_by_test_id(name) for name in ("dup-group", "dup-summary", "dup-more"))
    expect(groups).to_have_count(50)
    expect(summary).to_have_text("120 groups of near-duplicates; showing the first 50")
    expect(more).to_have_text("Show 50 more")
    more.click()
    expect(groups).to_have_count(100)
    expect(more).to_have_text("Show 20 more")
    more.click()
    expect(groups).to_have_count(120)
    expect(more).to_have_count(0)
    expect(summary).to_have_text("120 groups of near-duplicates")
    expect(groups.last.get_by_test_id("dup-member").first).to_have_attribute("data-key", "g119-0.jpg")
    page.get_by_test_id("dup-submit").click()  # asked again: from the first page
    expect(groups).to_have_count(50)
    assert asked == [(0, 50), (50, 50), (100, 50), (0, 50)]
    # A member is a button (it was a mouse-only figure): the keyboard opens it, and its title names the whole key.
    member = groups.first.get_by_test_id("dup-member").first
    expect(member).to_have_attribute("title", re.compile(r"^b/g0-0\.jpg\n"))
    member.focus()
    with page.expect_request(lambda request: request.url.endswith("/search")) as opened:
        page.keyboard.press("Enter")
    assert opened.value.post_data_json == {"key": "g0-0.jpg", "k": 12, "bucket": "b"}, opened.value.post_data
    assert not js_errors, js_errors
    page.close()


def search_bodies(page: Page, stack: Stack) -> list[dict[str, Any]]:
    """The JSON bodies of the page's searches from now on, as they are sent."""
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda request: bodies.append(request.post_data_json)
            if request.url == stack.api_url + "/search" and request.method == "POST" else None)
    return bodies


def test_filters_run_the_shown_search_again_and_tags_answer_the_keyboard(
    browser: Browser, stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """Review 31: Enter on a focused tag ran the card's key search (the tag was inside the card's button); a
    changed folder left results from outside it on show; no way to hide weak matches; suggestions of labels that
    no object keeps, and a picked one took the words typed before it away."""
    bucket = stack.settings.bucket
    keys = {name: unique_prefix + name for name in ("a/chelsea.png", "b/chelsea.png", "b/coffee.png")}
    for name, key in keys.items():
        s3.put_object(Bucket=bucket, Key=key, Body=photo(name.split("/")[1]), ContentType="image/jpeg")
    try:
        page, js_errors = open_page(browser, api, bucket, list(keys.values()))
        page.goto(stack.api_url + "/")
        bodies = search_bodies(page, stack)
        results, cards = page.get_by_test_id("results"), page.get_by_test_id("result")

        # Suggestions: only labels some object keeps, each keeping the words typed before the last one.
        labels = api.get("/labels", params={"q": "ta", "limit": 12}).json()["labels"]
        kept = [label["name"] for label in labels if label["count"] > 0]
        assert kept and len(kept) < len(labels), labels  # the page has labels nothing keeps to leave out
        page.get_by_test_id("text-input").fill("coffee ta")
        options = page.locator("#label-options option")
        expect(options).to_have_count(len(kept))
        assert [options.nth(i).get_attribute("value") for i in range(len(kept))] == [f"coffee {n}" for n in kept]

        # A changed folder (Enter in its box) runs the shown search again, within the new folder.
        page.get_by_test_id("filter-prefix").fill(unique_prefix)
        page.get_by_test_id("text-input").fill("cat")
        page.get_by_test_id("text-submit").click()
        expect(results).to_have_attribute("data-search-count", "1")
        expect(cards).to_have_count(2)
        page.get_by_test_id("filter-prefix").fill(unique_prefix + "b/")
        page.get_by_test_id("filter-prefix").press("Enter")
        expect(results).to_have_attribute("data-search-count", "2")
        expect(cards).to_have_count(1)
        assert [cards.nth(i).get_attribute("data-key") for i in range(cards.count())] == [keys["b/chelsea.png"]]
        assert bodies[-1] == {"text": "cat", "k": 12, "prefix": unique_prefix + "b/"}, bodies

        # Enter and Space on a focused tag search by the tag, and by nothing else.
        for count, press in (("3", "Enter"), ("4", "Space")):
            tag = cards.first.get_by_test_id("result-tag").first
            name = tag.inner_text()
            tag.focus()
            page.keyboard.press(press)
            expect(results).to_have_attribute("data-search-count", count)
            expect(results).to_have_attribute("data-query-kind", "text")
            expect(page.get_by_test_id("query-label")).to_have_text(f"Words: {name}")
        assert not [body for body in bodies if "key" in body], bodies

        # A min score: an unrelated photo's neighbours are all below it, and the page says that nothing is similar.
        searched = int(results.get_attribute("data-search-count") or 0)
        page.get_by_test_id("filter-prefix").fill(unique_prefix)
        page.get_by_test_id("key-input").fill(keys["b/coffee.png"])
        page.get_by_test_id("key-submit").click()  # (leaving the folder box ran the tag search again, which
        # disabled this button: the click was lost, review 34)
        expect(results).to_have_attribute("data-query-kind", "key")
        expect(cards).to_have_count(2)
        # (A host slow enough to pass the filters' pause between the fill and the click reran the tag search first.)
        searched = max(searched + 1, int(results.get_attribute("data-search-count") or 0))
        page.wait_for_timeout(1500)  # (past the filters' pause: nothing runs again, the key search has them)
        expect(results).to_have_attribute("data-search-count", str(searched))
        page.get_by_test_id("filter-min-score").fill("0.99")
        page.get_by_test_id("filter-min-score").press("Enter")
        expect(results).to_have_attribute("data-search-count", str(searched + 1))
        expect(cards).to_have_count(0)
        expect(page.get_by_test_id("empty")).to_have_text(  # (every filter said: a folder's was blamed on the query)
            f"No similar images found in folder {unique_prefix}, with a score of at least 0.99 (the filters above).")
        # The typed key's own picture, though no result names its bucket (the answer does).
        expect(page.get_by_test_id("query-thumb")).to_be_visible()
        preview = f"/preview/{quote(bucket, safe='')}/{quote(keys['b/coffee.png'], safe='')}?"
        expect(page.get_by_test_id("query-thumb")).to_have_attribute("src", re.compile("^" + re.escape(preview)))
        assert bodies[-1] == {"key": keys["b/coffee.png"], "k": 12, "prefix": unique_prefix, "min_score": 0.99}
        page.get_by_test_id("filter-min-score").fill("")  # empty: no minimum, k results again
        page.get_by_test_id("filter-min-score").press("Enter")
        expect(results).to_have_attribute("data-search-count", str(searched + 2))
        expect(cards).to_have_count(2)
        page.get_by_test_id("filter-min-score").fill("80")  # out of range: not sent, the box marked invalid
        page.get_by_test_id("filter-min-score").press("Enter")
        assert page.get_by_test_id("filter-min-score").evaluate("box => !box.checkValidity()")
        expect(page.get_by_test_id("error")).to_have_text(  # said, not only the box's bubble (review 78)
            "min score: a score from -1 to 1 (cosine); empty: no least score")
        expect(results).to_have_attribute("data-search-count", str(searched + 2))  # (the filters are as before)
        page.get_by_test_id("filter-min-score").fill("")
        expect(page.get_by_test_id("error")).to_be_hidden()  # mended: the message goes

        # A date typed digit by digit runs the search once, when the typing pauses (review 34: once a year typed,
        # 0002, 0020, 0202, 2020, each an image search's upload and embedding).
        page.get_by_test_id("filter-after").focus()
        page.keyboard.type("01012020")
        expect(results).to_have_attribute("data-search-count", str(searched + 3))
        page.wait_for_timeout(1500)
        expect(results).to_have_attribute("data-search-count", str(searched + 3))
        assert bodies[-1]["modified_after"] == "2020-01-01" and "min_score" not in bodies[-1], bodies[-1]
        expect(cards).to_have_count(2)
        assert not js_errors, js_errors
        page.close()
    finally:
        for key in keys.values():
            s3.delete_object(Bucket=bucket, Key=key)


def test_the_address_keeps_each_search_and_a_label_of_several_words_is_suggested_whole(
    browser: Browser, stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """Review 52: searches never reached the address (Back left the page; a reload or a shared link lost the
    search); the results count sat in the key panel and a change of it ran nothing; "space sh" suggested "space
    space shuttle"; no way to the full-size object."""
    bucket = stack.settings.bucket
    keys = {name: unique_prefix + name for name in ("chelsea.png", "coffee.png")}
    for name, key in keys.items():
        s3.put_object(Bucket=bucket, Key=key, Body=photo(name), ContentType="image/jpeg")
    try:
        page, js_errors = open_page(browser, api, bucket, list(keys.values()))
        page.goto(stack.api_url + "/")
        results, cards = page.get_by_test_id("results"), page.get_by_test_id("result")

        # A label of several words, typed in part, is offered whole (and not after its own first word again).
        labels = api.get("/labels", params={"limit": 1000}).json()["labels"]
        name = next(label["name"] for label in labels if label["count"] > 0 and " " in label["name"])
        first, second = name.split(" ")[:2]
        page.get_by_test_id("text-input").fill(f"{first} {second[:2]}")
        expect(page.locator(f'#label-options option[value="{name}"]')).to_have_count(1)
        expect(page.locator(f'#label-options option[value="{first} {name}"]')).to_have_count(0)

        def address() -> dict[str, list[str]]:
            return parse_qs(urlparse(page.url).query)

        # A search by words is in the address, with the folder.
        page.get_by_test_id("filter-prefix").fill(unique_prefix)
        page.get_by_test_id("text-input").fill("cat")
        page.get_by_test_id("text-submit").click()
        expect(results).to_have_attribute("data-search-count", "1")
        assert address() == {"text": ["cat"], "prefix": [unique_prefix]}, page.url
        expect(cards.first.get_by_test_id("result-full")).to_have_attribute("href", re.compile("X-Amz-Signature="))
        # The count is a filter: a change runs the shown search again.
        page.get_by_test_id("k-input").fill("1")
        page.get_by_test_id("k-input").press("Enter")
        expect(results).to_have_attribute("data-search-count", "2")
        assert address() == {"text": ["cat"], "prefix": [unique_prefix], "k": ["1"]}, page.url
        # A clicked result: a search by its key, in the address too.
        cards.first.get_by_test_id("result-open").click()
        expect(results).to_have_attribute("data-query-kind", "key")
        assert address() == {"key": [keys["chelsea.png"]], "bucket": [bucket], "prefix": [unique_prefix],
                             "k": ["1"]}, page.url
        # Back runs the search before it again, and a reload the one in the address.
        page.go_back()
        expect(results).to_have_attribute("data-query-kind", "text")
        expect(page.get_by_test_id("query-label")).to_have_text("Words: cat")
        page.reload()
        expect(results).to_have_attribute("data-search-count", "1")  # (a new page: its first search)
        expect(page.get_by_test_id("query-label")).to_have_text("Words: cat")
        expect(page.get_by_test_id("k-input")).to_have_value("1")
        expect(page.get_by_test_id("filter-prefix")).to_have_value(unique_prefix)
        expect(cards).to_have_count(1)
        expect(cards.first).to_have_attribute("data-key", keys["chelsea.png"])
        page.go_back()  # the first search, with the default count
        expect(page.get_by_test_id("k-input")).to_have_value("12")
        expect(page.get_by_test_id("query-label")).to_have_text("Words: cat")
        page.go_back()  # the page as it opened
        expect(page.get_by_test_id("query")).to_be_hidden()
        expect(cards).to_have_count(0)
        expect(page.get_by_test_id("empty")).to_be_visible()

        # An image search names its file there, and Back to it asks for the file (it cleared the page, review 54);
        # the near-duplicates view is kept too.
        page.get_by_test_id("filter-prefix").fill(unique_prefix)
        page.get_by_test_id("file-input").set_input_files(
            {"name": "query.jpg", "mimeType": "image/jpeg", "buffer": photo("chelsea.png")})
        expect(results).to_have_attribute("data-query-kind", "image")
        assert address() == {"image": ["query.jpg"], "prefix": [unique_prefix]}, page.url
        page.get_by_test_id("dup-submit").click()
        expect(page.get_by_test_id("duplicates")).to_be_visible()
        assert address() == {"duplicates": ["1"], "prefix": [unique_prefix]}, page.url
        page.reload()
        expect(page.get_by_test_id("dup-summary")).to_be_visible()
        page.go_back()
        expect(page.get_by_test_id("empty")).to_have_text(
            "A search by the image query.jpg: drop or pick it again to run it.")
        assert not js_errors, js_errors
        page.close()
    finally:
        for key in keys.values():
            s3.delete_object(Bucket=bucket, Key=key)


def test_a_phone_sees_the_results_of_its_search(
    browser: Browser, stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """At 375 px the status chips wrapped into rows that a sticky header kept over a third of the screen, and the
    results came below the fold with no scroll to them: a search seemed to do nothing (review 31)."""
    bucket = stack.settings.bucket
    key = unique_prefix + "chelsea.png"
    s3.put_object(Bucket=bucket, Key=key, Body=photo("chelsea.png"), ContentType="image/jpeg")
    try:
        page, js_errors = open_page(browser, api, bucket, [key], viewport=(375, 740))
        page.goto(stack.api_url + "/")
        results = page.get_by_test_id("results")
        assert page.evaluate("document.getElementById('results').getBoundingClientRect().top") > 740  # (the fold)
        assert page.evaluate("getComputedStyle(document.querySelector('header')).position") != "sticky"
        page.get_by_test_id("filter-prefix").fill(unique_prefix)
        page.get_by_test_id("text-input").fill("cat")
        page.get_by_test_id("text-submit").click()
        expect(results).to_have_attribute("data-search-count", "1")
        expect(page.get_by_test_id("result").first).to_be_in_viewport()
        expect(page.get_by_test_id("query")).to_be_in_viewport()
        assert not js_errors, js_errors
        page.close()
    finally:
        s3.delete_object(Bucket=bucket, Key=key)


def test_the_failures_chip_lists_the_objects_that_could_not_be_indexed(
    browser: Browser, stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """The status strip counted failures, and nothing on the page said which objects or why (review 52): the chip
    opens their list, newest first, kept in the address as the other views are."""
    bucket, key = stack.settings.bucket, unique_prefix + "notes.jpg"
    s3.put_object(Bucket=bucket, Key=key, Body=b"a shopping list, not a photo", ContentType="image/jpeg")
    try:
        wait_for(lambda: (object_state(api, bucket, key) or {}).get("state") == "failed", 180,
                 what="the text file's failure record")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        js_errors: list[str] = []
        page.on("pageerror", lambda exc: js_errors.append(str(exc)))
        page.goto(stack.api_url + "/")
        expect(page.get_by_test_id("stat-failures")).not_to_have_text("–")
        page.get_by_test_id("chip-failures").click()
        row = page.locator(f"[data-testid=failure][data-key='{key}']")
        expect(row).to_have_count(1)
        expect(row.locator("td.reason")).to_have_text("not_an_image")
        expect(row.locator("td.key")).to_have_text(f"{bucket}/{key}")
        expect(page.get_by_test_id("failures-summary")).to_contain_text("could not be indexed")
        assert "failures=1" in page.url, page.url
        page.reload()  # the address shows the list again
        expect(page.locator(f"[data-testid=failure][data-key='{key}']")).to_have_count(1)
        page.get_by_test_id("text-input").fill("cat")  # another search puts the list away
        page.get_by_test_id("text-submit").click()
        expect(page.get_by_test_id("failures")).to_be_hidden()
        assert not js_errors, js_errors
        page.close()
    finally:
        s3.delete_object(Bucket=bucket, Key=key)


def test_a_service_that_does_not_answer_is_named(browser: Browser, stack: Stack) -> None:
    """The page said the browser's "Failed to fetch" beside the last counts, as though they were current."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(stack.api_url + "/")
    expect(page.get_by_test_id("status-dot")).to_have_class(re.compile(r"\bok\b"), timeout=10_000)
    expect(page.get_by_test_id("status")).not_to_have_class(re.compile(r"\bstale\b"))
    page.route(re.compile(r".*/(stats|queues|search)$"), lambda route: route.abort("connectionrefused"))
    host = urlparse(stack.api_url).netloc
    no_answer = re.compile(re.escape(f"index service at {host} does not answer (is the stack up? `bucketlens status`)"))
    expect(page.get_by_test_id("status-error")).to_contain_text(no_answer, timeout=10_000)
    expect(page.get_by_test_id("status")).to_have_class(re.compile(r"\bstale\b"))
    page.get_by_test_id("text-input").fill("cat")
    page.get_by_test_id("text-submit").click()
    expect(page.get_by_test_id("error")).to_have_text(no_answer)
    page.close()
