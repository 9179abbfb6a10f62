"""`vlmalign inspect --serve PORT`: the site on localhost, annotations written to a file.

GET serves the site's folder; POST /annotations takes one annotation (a JSON object, as the
annotate view sends after each verdict) and appends it as a line to the annotation file, so the
work of a session is on disk as it is done. Only 127.0.0.1 is bound: the site shows model outputs
and paths of the machine it runs on.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlmalign.errors import VlmalignError

MAX_BODY = 1 << 20  # one annotation is a few hundred bytes


class _Handler(SimpleHTTPRequestHandler):
    annotations: Path
    lock: threading.Lock

    def do_POST(self):
        if self.path.rstrip("/") != "/annotations":
            self.send_error(404, "POST only to /annotations")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self.send_error(400, "expected one annotation as a JSON object")
            return
        try:
            row = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):
            self.send_error(400, "expected one annotation as a JSON object")
            return
        with self.lock, open(self.annotations, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, format, *args):  # requests are not news; errors still reach stderr
        pass


def make_server(site: Path, annotations: Path, port: int) -> ThreadingHTTPServer:
    """A server (not yet serving) of `site` on 127.0.0.1:`port` (0: any free port)."""
    handler = type("InspectHandler", (_Handler,), {"annotations": Path(annotations), "lock": threading.Lock()})
    return ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(site)))


def serve(site: Path, annotations: Path, port: int) -> None:
    try:
        server = make_server(site, annotations, port)
    except OSError as e:
        raise VlmalignError(f"--serve {port}: cannot listen on 127.0.0.1:{port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    print(f"serving {site} at http://{host}:{port}/ (annotations are appended to {annotations}); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
