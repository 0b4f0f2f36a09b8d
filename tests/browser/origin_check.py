#!/usr/bin/env python3
"""Pages of other origins try the daemon's WebSocket in headless Chromium (Playwright, Debian's
chromium): one tiny page is served on each of two addresses (say 127.0.0.2:P, an origin the
daemon was told to allow, and 127.0.0.3:Q, one it was not); each opens WS_URL, sends Hello and
reports whether the socket opened and whether Welcome came. Prints JSON:
{"allowed": {"opened", "welcome", "closeCode"}, "refused": {...}}.

    origin_check.py WS_URL ALLOWED_HOST:PORT REFUSED_HOST:PORT [CHROMIUM]
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from playwright.sync_api import sync_playwright

PAGE = """<!doctype html><meta charset="utf-8"><title>another origin</title><script>
window.result = new Promise((done) => {
  const r = { opened: false, welcome: false, closeCode: null };
  const ws = new WebSocket(%s, ["lipsync.v2"]);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    r.opened = true;
    const p = new TextEncoder().encode(JSON.stringify({ protocol: 2, client: "another origin" }));
    const b = new Uint8Array(5 + p.length);
    new DataView(b.buffer).setUint32(0, p.length + 1);
    b[4] = 0x01;
    b.set(p, 5);
    ws.send(b);
  };
  ws.onmessage = (e) => { if (new Uint8Array(e.data)[4] === 0x02) { r.welcome = true; ws.close(); } };
  ws.onclose = (e) => { r.closeCode = e.code; done(r); };
  setTimeout(() => done(r), 15000);
});
</script>"""


def serve(hostport, body):
    host, port = hostport.rsplit(":", 1)

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, int(port)), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    ws_url, allowed, refused = sys.argv[1], sys.argv[2], sys.argv[3]
    chromium = sys.argv[4] if len(sys.argv) > 4 else "/usr/bin/chromium"
    body = (PAGE % json.dumps(ws_url)).encode()
    servers = [serve(allowed, body), serve(refused, body)]
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for name, hostport in (("allowed", allowed), ("refused", refused)):
                page = browser.new_page()
                page.goto(f"http://{hostport}/page.html")
                out[name] = page.evaluate("window.result")
                page.close()
        finally:
            browser.close()
            for s in servers:
                s.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
