"""A small in-memory Hugging Face Hub, enough for the real ``huggingface_hub`` / ``datasets`` clients.

Standard library only (``http.server`` in a thread) so tests can push and pull models and datasets
on 127.0.0.1 without internet. It speaks the parts of the Hub HTTP API the clients use:

* repos: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``GET /api/{models|datasets|spaces}/{id}[/revision/{rev}]`` (``sha``, ``siblings``),
  ``POST .../branch/{name}``;
* listing: ``GET .../tree/{rev}[/{path}]`` (``recursive``), ``POST .../paths-info/{rev}``;
* uploads: ``POST .../preupload/{rev}`` (LFS for binary/large files, like the Hub),
  ``POST /{prefix}{id}.git/info/lfs/objects/batch`` + ``PUT`` to the href it returns,
  ``POST .../commit/{rev}`` (NDJSON ``header`` / ``file`` / ``lfsFile`` / ``deletedFile`` /
  ``deletedFolder``), ``POST /api/validate-yaml``;
* downloads: ``HEAD|GET /{prefix}{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files and HTTP ``Range`` support (streaming reads).

Every commit is kept, so a revision may be a branch name, a pull-request ref (``refs/pr/<n>``, made by
``POST .../commit/{rev}?create_pr=1``) or any commit sha. Errors carry the ``X-Error-Code`` header the
client maps to ``RepositoryNotFoundError`` & co.

For tests of failure handling, ``state.faults["commit"] = n`` makes the next ``n`` commit requests fail
with a 500 after the body was read (``"lfs_upload"``: the next ``n`` LFS uploads), and
``state.authorizations`` records the ``Authorization`` header of every request.

Usage::

    with HubServer() as hub:            # hub.endpoint == "http://127.0.0.1:<port>"
        os.environ["HF_ENDPOINT"] = hub.endpoint   # before importing huggingface_hub / datasets
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

USER_NAME = "test-user"
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Same rule as the Hub's default .gitattributes: these go through LFS whatever their size.
LFS_SUFFIXES = (
    ".parquet", ".arrow", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".h5",
    ".onnx", ".msgpack", ".pkl", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".zip", ".gz", ".tar",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    is_lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @property
    def blob_oid(self) -> str:
        # For an LFS file git stores the pointer, so its blob id is the pointer's.
        return git_blob_oid(self.pointer if self.is_lfs else self.content)

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(self.content), "oid": self.blob_oid}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubState:
    """The repos, commits and LFS objects; all access goes through one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path): lets tests check what the client did
        self.authorizations: list[str] = []  # the Authorization header of every request (which token was sent)
        # Fault injection: endpoint name ("commit", "lfs_upload") -> how many of the next requests fail with a 500.
        self.faults: dict[str, int] = {}

    def take_fault(self, name: str) -> bool:
        """Whether the next request to the endpoint `name` must fail (and count it)."""
        remaining = self.faults.get(name, 0)
        if remaining > 0:
            self.faults[name] = remaining - 1
            return True
        return False

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_type}/{repo_id} not found", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Revision {revision!r} not found in {repo.repo_id}", "RevisionNotFound")
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, "You already created this repo")
        repo = Repo(repo_type, repo_id, private)
        initial = Commit(uuid.uuid4().hex + "00000000", "initial commit", {}, _now())
        repo.commits[initial.oid] = initial
        repo.branches["main"] = initial.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo


def _folders_of(paths) -> set[str]:
    folders = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folders.add("/".join(parts[:depth]))
    return folders


class HubRequestHandler(BaseHTTPRequestHandler):
    server_version = "TestHub/1.0"
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    # ---- plumbing -------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        with self.state.lock:
            self.state.requests.append((self.command, url.path))
            if self.headers.get("Authorization"):
                self.state.authorizations.append(self.headers["Authorization"])
        try:
            with self.state.lock:
                self._route(url.path, query, body)
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self._json({"error": error.message}, error.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _base_url(self) -> str:
        host, port = self.server.server_address[:2]  # type: ignore[index]
        return f"http://{host}:{port}"

    # ---- routing ----------------------------------------------------------------------------

    def _route(self, path: str, query: dict[str, str], body: bytes) -> None:
        segments = [unquote(s) for s in path.strip("/").split("/")]
        method = self.command
        if path == "/api/whoami-v2":
            return self._json({"type": "user", "name": USER_NAME, "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if segments[0] == "__lfs_upload" and method == "PUT":
            return self._lfs_put(segments[1], body)
        if segments[0] == "api" and len(segments) >= 3 and segments[1] in API_PLURALS:
            return self._api_repo(API_PLURALS[segments[1]], segments[2:], query, body)
        match = re.fullmatch(r"/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if match and method == "POST":
            return self._lfs_batch(json.loads(body))
        if "resolve" in segments and method in ("GET", "HEAD"):
            return self._resolve(segments, path)
        raise HubError(404, f"no route for {method} {path}")

    def _split_repo_segments(self, segments: list[str]) -> tuple[str, list[str]]:
        # "ns/name/<action>/..." or just "ns/name"; single-segment (namespace-less) ids are not supported.
        if len(segments) < 2:
            raise HubError(404, f"repo id must be 'namespace/name', got {'/'.join(segments)!r}", "RepoNotFound")
        return f"{segments[0]}/{segments[1]}", segments[2:]

    def _api_repo(self, repo_type: str, segments: list[str], query: dict[str, str], body: bytes) -> None:
        repo_id, rest = self._split_repo_segments(segments)
        repo = self.state.repo(repo_type, repo_id)
        action = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else "main"
        if action == "revision" and self.command == "GET":
            return self._repo_info(repo, revision)
        if action == "tree" and self.command == "GET":
            return self._tree(repo, revision, "/".join(rest[2:]), query.get("recursive", "false").lower() == "true")
        if action == "paths-info" and self.command == "POST":
            return self._paths_info(repo, revision, body)
        if action == "preupload" and self.command == "POST":
            return self._preupload(json.loads(body))
        if action == "commit" and self.command == "POST":
            return self._commit(repo, revision, body, query)
        if action == "branch" and self.command == "POST":
            return self._create_branch(repo, revision, json.loads(body or b"{}"))
        if action == "refs" and self.command == "GET":
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                        for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
            pulls = [{"name": n, "ref": n, "targetCommit": o} for n, o in repo.branches.items() if n.startswith("refs/pr/")]
            return self._json({"branches": branches, "tags": [], "converts": [], "pullRequests": pulls})
        raise HubError(404, f"unsupported repo action {self.command} {action!r}")

    # ---- repos ------------------------------------------------------------------------------

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or USER_NAME
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"
        try:
            self.state.create_repo(repo_type, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        except HubError as error:
            return self._json({"error": error.message, "url": url}, 409)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict[str, Any]) -> None:
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or USER_NAME
        repo_id = f"{namespace}/{payload['name']}"
        self.state.repo(repo_type, repo_id)
        del self.state.repos[(repo_type, repo_id)]
        self._json({})

    def _create_branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> None:
        if branch in repo.branches:
            raise HubError(409, f"branch {branch!r} already exists")
        start = self.state.commit(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._json({})

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = self.state.commit(repo, revision)
        self._json(
            {
                "id": repo.repo_id,
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "lastModified": commit.date,
                "createdAt": commit.date,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": path, "size": len(f.content)} for path, f in sorted(commit.files.items())],
            }
        )

    # ---- listing ----------------------------------------------------------------------------

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> None:
        commit = self.state.commit(repo, revision)
        folder = folder.strip("/")
        folders = _folders_of(commit.files)
        if folder and folder not in folders:
            raise HubError(404, f"{folder!r} does not exist at {revision!r}", "EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        entries = []
        for sub in sorted(folders):
            if sub.startswith(prefix) and (recursive or "/" not in sub[len(prefix):]):
                entries.append({"type": "directory", "path": sub, "oid": git_blob_oid(sub.encode())})
        for path, stored in sorted(commit.files.items()):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
                entries.append(stored.tree_entry(path))
        self._json(entries)

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        commit = self.state.commit(repo, revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        folders = _folders_of(commit.files)
        infos = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                infos.append(commit.files[path].tree_entry(path))
            elif path in folders:
                infos.append({"type": "directory", "path": path, "oid": git_blob_oid(path.encode())})
        self._json(infos)

    # ---- uploads ----------------------------------------------------------------------------

    def _preupload(self, payload: dict[str, Any]) -> None:
        files = []
        for entry in payload.get("files", []):
            sample = base64.b64decode(entry.get("sample", ""))
            binary = b"\0" in sample
            lfs = entry["path"].lower().endswith(LFS_SUFFIXES) or entry.get("size", 0) > LFS_SIZE_THRESHOLD or binary
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._json({"files": files})

    def _lfs_batch(self, payload: dict[str, Any]) -> None:
        objects = []
        for obj in payload.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:  # already stored objects get no upload action
                answer["actions"] = {"upload": {"href": f"{self._base_url()}/__lfs_upload/{obj['oid']}", "header": {}}}
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if self.state.take_fault("lfs_upload"):
            raise HubError(500, "injected fault: the LFS storage failed while receiving the upload")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        self.state.lfs_objects[oid] = body
        self._send(200)

    def _commit(self, repo: Repo, revision: str, body: bytes, query: dict[str, str]) -> None:
        if self.state.take_fault("commit"):
            # The body has been read: a server that dies while applying a commit.
            raise HubError(500, "injected fault: the server failed while applying the commit")
        if revision not in repo.branches:
            raise HubError(404, f"branch {revision!r} not found", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        title = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary") or title
                parent = value.get("parentCommit")
                if parent and parent != head.oid:
                    raise HubError(412, f"parent commit {parent} is not the head of {revision!r} ({head.oid})")
            elif key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), is_lfs=False)
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(content, is_lfs=True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"cannot delete missing file {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        oid = hashlib.sha1(f"{head.oid}{uuid.uuid4()}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, title, files, _now())
        pull_request = None
        if query.get("create_pr") in ("1", "true", "True"):
            # A pull request is a ref of its own whose commit sits on the target branch's head; the branch is unchanged.
            pull_request = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            repo.branches[f"refs/pr/{pull_request}"] = oid
        else:
            repo.branches[revision] = oid
        repo_url = f"{self._base_url()}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"
        pr_url = f"{repo_url}/discussions/{pull_request}" if pull_request else None
        self._json({"commitUrl": f"{repo_url}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url, "success": True})

    # ---- downloads --------------------------------------------------------------------------

    def _resolve(self, segments: list[str], raw_path: str) -> None:
        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type = API_PLURALS[segments[0]]
            segments = segments[1:]
        if len(segments) < 5 or segments[2] != "resolve":
            raise HubError(404, f"bad resolve url {raw_path}")
        repo = self.state.repo(repo_type, f"{segments[0]}/{segments[1]}")
        commit = self.state.commit(repo, segments[3])
        file_path = "/".join(segments[4:])
        stored = commit.files.get(file_path)
        if stored is None:
            raise HubError(404, f"{file_path} not found at {segments[3]}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "ETag": f'"{stored.blob_oid}"'}
        if stored.is_lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        content, status = stored.content, 200
        byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if byte_range and (byte_range.group(1) or byte_range.group(2)):
            size = len(content)
            if byte_range.group(1):
                start = int(byte_range.group(1))
                end = min(int(byte_range.group(2)) if byte_range.group(2) else size - 1, size - 1)
            else:  # suffix range: last N bytes
                start, end = max(size - int(byte_range.group(2)), 0), size - 1
            if start >= size:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers, content_type="application/octet-stream")


class HubServer:
    """Runs :class:`HubRequestHandler` on 127.0.0.1 in a daemon thread; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.httpd = ThreadingHTTPServer((host, port), HubRequestHandler)
        self.httpd.daemon_threads = True
        self.httpd.state = HubState()  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-hub", daemon=True)

    @property
    def state(self) -> HubState:
        return self.httpd.state  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def repo_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            return {path: f.content for path, f in self.state.commit(repo, revision).files.items()}


def resolve_url(endpoint: str, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> str:
    return f"{endpoint}/{URL_PREFIXES[repo_type]}{repo_id}/resolve/{quote(revision, safe='')}/{path}"
