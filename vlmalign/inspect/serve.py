"""`vlmalign inspect --serve PORT`: the site on localhost, annotations written to a file.

GET serves the site's folder; POST /annotations takes one annotation (a JSON object, as the
annotate view sends after each verdict) and appends it as a line to the annotation file, so the
work of a session is on disk as it is done. Only 127.0.0.1 is bound: the site shows model outputs
and paths of the machine it runs on.

Other pages open in the same browser can still reach 127.0.0.1, so the server serves only its own
origin: the Host header must be 127.0.0.1:PORT or localhost:PORT (a DNS-rebinding page sends its
own name), an Origin header must be that origin, and a POST must be `application/json`, a type a
cross-origin page can only send after a CORS preflight, which this server never grants (OPTIONS is
not answered with Access-Control headers). A posted row must pass the rule the annotation file is
read by (`agreement.annotation_problem`), so the file the server writes always reads back.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlmalign.errors import VlmalignError
from vlmalign.inspect.agreement import annotation_problem

MAX_BODY = 1 << 20  # one annotation is a few hundred bytes


class _Handler(SimpleHTTPRequestHandler):
    annotations: Path
    lock: threading.Lock

    def _own_origin(self) -> bool:
        """Whether the request names this server (Host, and Origin if sent); else answered 403."""
        port = self.server.server_address[1]
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        origin = self.headers.get("Origin")
        if self.headers.get("Host") in hosts and (origin is None or origin in {f"http://{h}" for h in hosts}):
            return True
        self.send_error(403, f"only http://127.0.0.1:{port}/ is served here")
        return False

    def do_GET(self):
        if self._own_origin():
            super().do_GET()

    def do_HEAD(self):
        if self._own_origin():
            super().do_HEAD()

    def do_POST(self):
        if not self._own_origin():
            return
        if self.path.rstrip("/") != "/annotations":
            self.send_error(404, "POST only to /annotations")
            return
        if self.headers.get_content_type() != "application/json":
            self.send_error(415, "an annotation is posted as application/json")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            self.send_error(400, f"Content-Length must be 1 to {MAX_BODY} bytes, not {length[:20]!r}")
            return
        try:
            row = json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        problem = "expected one annotation as a JSON object" if not isinstance(row, dict) else annotation_problem(row)
        if problem:
            # the reason goes in the status line, which must be Latin-1: a row's text may not be
            self.send_error(400, problem.encode("ascii", "backslashreplace").decode())
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
