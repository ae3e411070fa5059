"""A Hugging Face hub on 127.0.0.1 that serves one dataset repo from a local folder, answering the requests
`datasets.load_dataset` makes through `HF_ENDPOINT` (dataset info, tree listings, file resolves), so that
the download stage's real hub code runs offline. It logs every request."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path
from typing import Any

SHA = "c0ffee" + "0" * 34  # the one commit of the repo


class FakeHub:
    def __init__(self, root: Path, repo: str, revision: str) -> None:
        self.root, self.repo, self.revision, self.log = root, repo, revision, []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def entry(self, path: Path) -> dict[str, Any]:
        rel = path.relative_to(self.root).as_posix()
        if path.is_file():
            return {"type": "file", "path": rel, "size": path.stat().st_size, "oid": SHA}
        return {"type": "directory", "path": rel, "oid": SHA}

    def strip_revision(self, rest: str) -> str | None:
        """`rest` without its leading revision (the branch or the commit); None for an unknown revision."""
        for rev in (self.revision, SHA):
            if rest == rev or rest.startswith(rev + "/"):
                return rest[len(rev):].strip("/")
        return None


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_json(self, obj: Any) -> None:
            self.send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            hub.log.append(f"{self.command} {path}")
            resolve, api = f"/datasets/{hub.repo}/resolve/", f"/api/datasets/{hub.repo}/"
            if path.startswith(resolve):  # a file, as `hf_hub_download` fetches it
                rel = hub.strip_revision(path[len(resolve):])
                if rel is None:
                    return self.send(404, headers={"X-Error-Code": "RevisionNotFound"})
                f = hub.root / rel
                if not f.is_file():
                    return self.send(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA})
                data = f.read_bytes()
                return self.send(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": SHA})
            if path.startswith(api + "revision/"):  # dataset_info
                files = sorted(p for p in hub.root.rglob("*") if p.is_file())
                return self.send_json({"id": hub.repo, "sha": SHA, "private": False, "disabled": False,
                                       "gated": False, "tags": [], "cardData": {},
                                       "siblings": [{"rfilename": p.relative_to(hub.root).as_posix()} for p in files]})
            if path.startswith(api + "tree/"):  # list_repo_tree
                rel = hub.strip_revision(path[len(api + "tree/"):])
                folder = hub.root / (rel or "")
                if rel is None or not folder.is_dir():
                    return self.send(404, headers={"X-Error-Code": "EntryNotFound"})
                recursive = "recursive=true" in url.query.lower()
                return self.send_json([hub.entry(p) for p in sorted(folder.rglob("*") if recursive
                                                                    else folder.iterdir())])
            self.send(404, b'{"error": "not served by this test hub"}', {"Content-Type": "application/json"})

    return Handler
