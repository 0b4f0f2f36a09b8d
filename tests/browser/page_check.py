#!/usr/bin/env python3
"""Drives the daemon's browser page in headless Chromium (Playwright, Debian's chromium):
picks an avatar, plays a speech file into the page through its file input, and waits until
the utterance's frames were decoded and its sound played. Prints the page's figures as JSON
(frames, idle and speech frames, first-frame latency, first speech frame, sound played), the
page's errors, what its Content-Security-Policy refused, and the URL it ended on.

    page_check.py URL AVATAR SPEECH.wav SPEECH_FRAMES [CHROMIUM]
"""

import json
import sys
import time

from playwright.sync_api import sync_playwright


def wait_stats(page, done, timeout_s):
    """Polls the page's figures until done(stats). Playwright's wait_for_function evaluates its
    predicate with eval inside the page, which the page's Content-Security-Policy forbids (no
    'unsafe-eval'); page.evaluate goes through the DevTools protocol instead."""
    until = time.monotonic() + timeout_s
    while True:
        stats = page.evaluate("window.lipsyncStats")
        if stats["error"] or done(stats):
            return stats
        if time.monotonic() > until:
            raise TimeoutError(f"the page did not get there in {timeout_s} s: {stats}")
        time.sleep(0.05)


def main():
    url, avatar, wav, speech_frames = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    chromium = sys.argv[5] if len(sys.argv) > 5 else "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # The page's Content-Security-Policy refusing something of its own shows here.
            csp = []
            page.on("console", lambda m: csp.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(url)
            page.wait_for_selector("#avatar option", state="attached", timeout=20000)
            page.select_option("#avatar", avatar)
            page.set_input_files("#file", wav)
            page.click("#play")
            wait_stats(page, lambda s: s["speech"] >= speech_frames and s["audioPlayedMs"] > 0, 60)
            page.click("#stop")
            stats = wait_stats(page, lambda s: s["done"], 30)
            stats["page_errors"] = errors
            stats["csp_errors"] = csp
            stats["url"] = page.url
            print(json.dumps(stats))
        finally:
            browser.close()


if __name__ == "__main__":
    main()
