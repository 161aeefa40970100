"""A small local stand-in for the Hub endpoints huggingface_hub's upload path calls (LFS transfer, no Xet).

Loopback only, one daemon thread, bounded request sizes, and it shuts itself down after `lifetime` seconds even if
a test forgets to. It keeps what a real Hub would: repositories, branches, commits, and the bytes of every file,
so tests can compare what arrived with what was on disk. Implemented: whoami-v2, repos/create, model info,
validate-yaml, preupload, branch, LFS batch + PUT + verify, and the ndjson commit endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

MAX_BODY = 256 * 2**20
REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)
    prs: list[dict] = field(default_factory=list)


class FakeHub:
    """`with FakeHub(token="...") as hub:` then point the client at `hub.url` (HF_ENDPOINT or endpoint=)."""

    def __init__(self, token: str, user: str = "tester", orgs: tuple[str, ...] = ("kvorg",), lifetime: float = 300):
        self.token, self.user, self.orgs, self.lifetime = token, user, orgs, lifetime
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.yaml_checked: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    timeout = 30

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > MAX_BODY:
                    raise ValueError("body too large")
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _dispatch(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        query = urlparse(self.path).query
        with self.hub._lock:
            self.hub.requests.append((method, path, self.headers.get("Authorization")))
        body = self._body() if method in ("POST", "PUT") else b""
        presigned = path.startswith("/lfs-upload/")  # like S3 URLs: the URL itself is the credential
        if not presigned and not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        for pattern, handler in ROUTES:
            m = re.fullmatch(pattern[1], path)
            if pattern[0] == method and m:
                with self.hub._lock:
                    return handler(self, body, query, **m.groupdict())
        return self._error(404, "NotFound", f"no route {method} {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --- endpoints -------------------------------------------------------------------------------
    def whoami(self, body, query) -> None:
        orgs = [{"name": o} for o in self.hub.orgs]
        self._send(200, {"type": "user", "name": self.hub.user, "orgs": orgs, "auth": {"type": "access_token"}})

    def create_repo(self, body, query) -> None:
        req = json.loads(body)
        repo_id = f"{req.get('organization') or self.hub.user}/{req['name']}"
        if repo_id.split("/")[0] not in (self.hub.user, *self.hub.orgs):
            return self._error(403, "Forbidden", "You don't have the rights to create a model under this namespace")
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
        self.hub.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo(self, repo: str) -> Repo | None:
        if repo not in self.hub.repos:
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
            return None
        return self.hub.repos[repo]

    def model_info(self, body, query, repo, revision="main") -> None:
        r = self._repo(repo)
        if r is None:
            return None
        if revision not in r.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha = r.commits[-1]["oid"] if r.commits else "0" * 40
        siblings = [{"rfilename": f} for f in sorted(r.branches[revision])]
        self._send(200, {"id": repo, "private": r.private, "sha": sha, "siblings": siblings})

    def validate_yaml(self, body, query) -> None:
        content = json.loads(body)["content"]
        self.hub.yaml_checked.append(content)
        front = content.split("---")[1] if content.startswith("---") else ""
        try:
            meta = yaml.safe_load(front) or {}
        except yaml.YAMLError as exc:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        errors = []
        base = meta.get("base_model")
        if base is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
            errors.append({"message": f'"base_model" with value "{base}" is not valid'})
        if errors:
            return self._send(400, {"errors": errors}, {"X-Error-Message": errors[0]["message"]})
        self._send(200, {"errors": [], "warnings": []})

    def create_branch(self, body, query, repo, branch) -> None:
        r = self._repo(repo)
        if r is None:
            return None
        if branch in r.branches:
            return self._error(409, "Conflict", "Reference already exists")
        r.branches[branch] = dict(r.branches["main"])
        self._send(200, {})

    def preupload(self, body, query, repo, revision) -> None:
        r = self._repo(repo)
        if r is None:
            return None
        files = json.loads(body)["files"]
        current = r.branches.get(revision, {})
        out = []
        for f in files:
            lfs = f["path"].endswith(".safetensors") or f["size"] > 10 * 2**20
            oid = None
            if f["path"] in current and not lfs:
                oid = hashlib.sha1(b"blob %d\0" % len(current[f["path"]]) + current[f["path"]]).hexdigest()
            out.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": out})

    def lfs_batch(self, body, query, repo) -> None:
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            actions = None
            if obj["oid"] not in self.hub.lfs:
                actions = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify"},
                }
            objects.append({"oid": obj["oid"], "size": obj["size"], **({"actions": actions} if actions else {})})
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, body, query, oid) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 mismatch")
        self.hub.lfs[oid] = body
        self._send(200, {})

    def lfs_verify(self, body, query) -> None:
        req = json.loads(body)
        ok = req["oid"] in self.hub.lfs and len(self.hub.lfs[req["oid"]]) == req["size"]
        return self._send(200, {}) if ok else self._error(400, "BadRequest", "object not uploaded")

    def commit(self, body, query, repo, revision) -> None:
        r = self._repo(repo)
        if r is None:
            return None
        create_pr = "create_pr=1" in query
        if revision not in r.branches and not create_pr:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        tree = dict(r.branches.get(revision, {}))
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                tree[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.hub.lfs:
                    return self._error(400, "BadRequest", f"LFS object {v['oid']} was not uploaded")
                tree[v["path"]] = self.hub.lfs[v["oid"]]
            elif item["key"] == "deletedFile":
                tree.pop(v["path"], None)
        oid = hashlib.sha1(json.dumps([header, sorted(tree)]).encode() + str(len(r.commits)).encode()).hexdigest()
        commit = {"oid": oid, "summary": header["summary"], "files": sorted(tree), "revision": revision}
        r.commits.append(commit)
        pr_url = None
        if create_pr:
            num = len(r.prs) + 1
            r.prs.append({"num": num, "tree": tree, "commit": commit})
            pr_url = f"{self.hub.url}/{repo}/discussions/{num}"
        else:
            r.branches[revision] = tree
        self._send(
            200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}
        )


ROUTES = [
    (("GET", r"/api/whoami-v2"), _Handler.whoami),
    (("POST", r"/api/repos/create"), _Handler.create_repo),
    (("GET", rf"/api/models/{REPO}"), _Handler.model_info),
    (("GET", rf"/api/models/{REPO}/revision/(?P<revision>.+)"), _Handler.model_info),
    (("POST", r"/api/validate-yaml"), _Handler.validate_yaml),
    (("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)"), _Handler.create_branch),
    (("POST", rf"/api/models/{REPO}/preupload/(?P<revision>.+)"), _Handler.preupload),
    (("POST", rf"/{REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    (("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), _Handler.lfs_upload),
    (("POST", r"/lfs-verify"), _Handler.lfs_verify),
    (("POST", rf"/api/models/{REPO}/commit/(?P<revision>.+)"), _Handler.commit),
]
