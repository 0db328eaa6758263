"""A loopback stand-in for the Hugging Face Hub: the endpoints `huggingface_hub` calls to publish and download.

It keeps repositories in memory and speaks just enough of the Hub's HTTP API for `HfApi.whoami`, `create_repo`,
`create_branch`, `repo_info`, `upload_folder` (preupload, LFS batch and basic upload, README validation, commit) and
`hf_hub_download` (HEAD and GET on `resolve`), which is what `publish` and `from_pretrained` use. It binds 127.0.0.1
only, reads bodies up to `MAX_BODY_BYTES`, and times out idle connections.

Usage:

    with HubServer() as hub:
        os.environ["HF_ENDPOINT"] = hub.endpoint
        ...
        hub.repos["org/name"].branches["main"].files  # what was committed
        hub.drop_next("commit")  # the next commit request loses its connection before any answer
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_loopback_test_token"
USER = "tester"
MAX_BODY_BYTES = 64 * 2**20
SOCKET_TIMEOUT_S = 10
# Files the Hub stores with LFS (decided by .gitattributes there); the rest are committed inline.
LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".model")

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("GET", re.compile(r"/api/agent-harnesses"), "agent_harnesses"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?"), "model_info"),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)"), "tree"),
    ("POST", re.compile(rf"/api/models/{REPO}/branch/(?P<revision>[^/]+)"), "create_branch"),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), "lfs_upload"),
    ("GET", re.compile(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), "resolve"),
]


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    branches: dict[str, Commit]
    pulls: list[Commit] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)  # every commit, branch heads or not

    def revision(self, name: str) -> Commit | None:
        """A branch, a pull request ("refs/pr/N") or a commit id, as `resolve/<revision>` accepts."""
        if name.startswith("refs/pr/"):
            number = int(name.removeprefix("refs/pr/"))
            return self.pulls[number - 1] if 0 < number <= len(self.pulls) else None
        if name in self.branches:
            return self.branches[name]
        return next((commit for commit in self.commits if commit.oid == name), None)


class HubError(Exception):
    """An error answer: HTTP status, the Hub's `X-Error-Code` header, a message and other fields of the body."""

    def __init__(self, status: int, message: str, code: str | None = None, **fields):
        super().__init__(message)
        self.status, self.code, self.fields = status, code, fields


def _commit_oid(parent: str, files: dict[str, bytes]) -> str:
    digest = hashlib.sha1(parent.encode())
    for path in sorted(files):
        digest.update(path.encode() + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()


class HubServer:
    """The server and its state; a context manager that serves from a daemon thread until exit."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        self._drop: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval lets `shutdown` return quickly at the end of each test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT_S)

    def drop_next(self, route: str) -> None:
        """Close the connection of the next request to `route` (e.g. "commit") without answering it."""
        self._drop.add(route)

    def should_drop(self, route: str) -> bool:
        with self._lock:
            if route in self._drop:
                self._drop.discard(route)
                return True
            return False

    def handle(self, route: str, match: dict, query: dict, body: bytes, authorized: bool):
        """Answer one request: (status, headers, body bytes) or raise `HubError`."""
        with self._lock:
            return getattr(self, f"_{route}")(match=match, query=query, body=body, authorized=authorized)

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.revision(unquote(revision))
        if commit is None:
            raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        return commit

    @staticmethod
    def _require_token(authorized: bool) -> None:
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _whoami(self, authorized, **_):
        self._require_token(authorized)
        user = {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        return _json(200, user)

    def _agent_harnesses(self, **_):
        return _json(200, {"standardEnvVars": [], "harnesses": {}})

    def _create_repo(self, body, authorized, **_):
        self._require_token(authorized)
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            # The Hub names the existing repository, which `create_repo(exist_ok=True)` returns.
            raise HubError(409, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
        empty = Commit(oid=_commit_oid(repo_id, {}), files={})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private", branches={"main": empty})
        return _json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, authorized, **_):
        self._require_token(authorized)
        return _json(200, {"errors": [], "warnings": []})

    def _model_info(self, match, authorized, **_):
        repo = self._repo(match["repo"], authorized)
        commit = self._revision(repo, match["revision"] or "main")
        info = {
            "id": match["repo"],
            "sha": commit.oid,
            "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            "tags": [],
        }
        return _json(200, info)

    def _tree(self, match, authorized, **_):
        """The files of a revision (no folders here), as `list_repo_tree` and `snapshot_download` read them."""
        commit = self._revision(self._repo(match["repo"], authorized), match["revision"])
        entries = []
        for path, content in sorted(commit.files.items()):
            entry = {"type": "file", "path": path, "size": len(content), "oid": _git_blob_oid(content)}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return _json(200, entries)

    def _create_branch(self, match, authorized, **_):
        self._require_token(authorized)
        repo = self._repo(match["repo"], authorized)
        branch = unquote(match["revision"])
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = repo.branches["main"]
        return _json(200, {})

    def _preupload(self, match, body, authorized, **_):
        self._require_token(authorized)
        repo = self._repo(match["repo"], authorized)
        self._revision(repo, match["revision"])
        files = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
            | {"shouldIgnore": False}
            for f in json.loads(body)["files"]
        ]
        return _json(200, {"files": files})

    def _lfs_batch(self, match, body, authorized, **_):
        self._require_token(authorized)
        self._repo(match["repo"], authorized)
        objects = []
        for item in json.loads(body)["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs_objects:
                answer["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{item['oid']}"}}
            objects.append(answer)
        return _json(200, {"transfer": "basic", "objects": objects})

    def _lfs_upload(self, match, body, **_):
        # The upload URL stands for a pre-signed storage URL: the oid in it is the credential.
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            raise HubError(400, "Uploaded content does not match its sha256")
        self.lfs_objects[match["oid"]] = body
        return 200, {}, b""

    def _commit(self, match, query, body, authorized, **_):
        self._require_token(authorized)
        repo = self._repo(match["repo"], authorized)
        revision = unquote(match["revision"])
        parent = self._revision(repo, revision)
        files = dict(parent.files)
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.lfs_objects[value["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        commit = Commit(oid=_commit_oid(parent.oid, files), files=files)
        repo.commits.append(commit)
        answer = {"commitUrl": f"{self.endpoint}/{match['repo']}/commit/{commit.oid}", "commitOid": commit.oid}
        if query.get("create_pr") == ["1"]:
            repo.pulls.append(commit)
            answer["pullRequestUrl"] = f"{self.endpoint}/{match['repo']}/discussions/{len(repo.pulls)}"
        else:
            repo.branches[revision] = commit
        return _json(200, answer)

    def _resolve(self, match, authorized, **_):
        repo = self._repo(match["repo"], authorized)
        commit = self._revision(repo, match["revision"])
        path = unquote(match["path"])
        if path not in commit.files:
            raise HubError(404, f"{path} not found", "EntryNotFound")
        content = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
        return 200, headers, content


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _json(status: int, payload) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_S

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            self._serve()

        def do_HEAD(self):
            self._serve()

        def do_POST(self):
            self._serve()

        def do_PUT(self):
            self._serve()

        def _serve(self):
            url = urlsplit(self.path)
            hub.requests.append(f"{self.command} {url.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._answer(413, {}, b"")
            body = self.rfile.read(length)
            route, match = _route(self.command, url.path)
            if route is None:
                return self._answer(*_json(404, {"error": f"no route for {self.command} {url.path}"}))
            if hub.should_drop(route):
                self.close_connection = True
                return
            authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            try:
                self._answer(*hub.handle(route, match, parse_qs(url.query), body, authorized))
            except HubError as error:
                headers = {"X-Error-Message": str(error)} | ({"X-Error-Code": error.code} if error.code else {})
                status, json_headers, payload = _json(error.status, {"error": str(error)} | error.fields)
                self._answer(status, headers | json_headers, payload)

        def _answer(self, status: int, headers: dict, body: bytes):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _route(method: str, path: str) -> tuple[str | None, dict]:
    for route_method, pattern, route in ROUTES:
        match = pattern.fullmatch(path)
        if route_method == method and match:
            return route, match.groupdict()
    return None, {}
