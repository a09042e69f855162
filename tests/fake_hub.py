"""A loopback HTTP server standing in for the Hugging Face Hub: it accepts what huggingface_hub sends to create a
repo, a branch and a commit, and records every request (method, path, headers, decoded commit files)."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.commits: list[dict] = []  # {"repo", "revision", "message", "files": {path: bytes}}
        self.cards: list[dict] = []  # model cards sent for metadata validation
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, payload: dict | list, status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: bytes) -> None:
                hub.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )

            def do_GET(self):
                self._record(b"")
                self._reply({"error": "not found"}, 404)

            def do_POST(self):
                body = self._body()
                self._record(body)
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(body)
                    repo = f"{name.get('organization') or 'user'}/{name['name']}"
                    return self._reply({"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":  # the model card's metadata
                    hub.cards.append(json.loads(body))
                    return self._reply({})
                if re.fullmatch(r"/api/models/[^/]+/[^/]+/branch/.+", path):
                    return self._reply({})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
                if match:
                    files = json.loads(body)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
                if match:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    repo, revision = match.group(1), match.group(2)
                    hub.commits.append(
                        {"repo": repo, "revision": revision, "message": header["summary"], "files": files}
                    )
                    url = f"{hub.endpoint}/{repo}/commit/{len(hub.commits):040x}"
                    return self._reply({"commitUrl": url, "commitOid": f"{len(hub.commits):040x}"})
                self._reply({"error": f"unexpected {path}"}, 404)

        return Handler
