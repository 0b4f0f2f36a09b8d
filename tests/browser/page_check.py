#!/usr/bin/env python3
"""Drives the daemon's browser page in headless Chromium (Playwright, Debian's chromium):
picks an avatar, plays a speech file into the page through its file input, and waits until
the utterance's frames were decoded and its sound played. Prints the page's figures as JSON
(frames, idle and speech frames, first-frame latency, first speech frame, sound played).

    page_check.py URL AVATAR SPEECH.wav SPEECH_FRAMES [CHROMIUM]
"""

import json
import sys

from playwright.sync_api import sync_playwright


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
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#avatar option').length > 0", timeout=20000)
            page.select_option("#avatar", avatar)
            page.set_input_files("#file", wav)
            page.click("#play")
            page.wait_for_function(
                f"window.lipsyncStats.error || (window.lipsyncStats.speech >= {speech_frames}"
                " && window.lipsyncStats.audioPlayedMs > 0)",
                timeout=60000,
            )
            page.click("#stop")
            page.wait_for_function("window.lipsyncStats.done || window.lipsyncStats.error", timeout=30000)
            stats = page.evaluate("window.lipsyncStats")
            stats["page_errors"] = errors
            print(json.dumps(stats))
        finally:
            browser.close()


if __name__ == "__main__":
    main()
