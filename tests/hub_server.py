"""An in-memory Hugging Face Hub-protocol server on 127.0.0.1 for the test suite.

The tests drive the unmodified ``huggingface_hub`` client against it (``HF_ENDPOINT``), so this
speaks the wire protocol the client uses: resolve/HEAD downloads, repo info and tree listings,
repo creation, preupload, the LFS "basic" transfer and the ndjson commit endpoint
(see docs/hub-protocol.md in the shared docs). Xet must be disabled on the client side.

Faults can be injected to test how the package copes with a failing Hub: an error status, a
stall (client timeout), a dropped connection, flipped bytes, or a callback after a request (a push
landing mid-download); see :class:`Fault`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

# Files the Hub stores in LFS: the default .gitattributes patterns that matter here, plus any
# file above the Hub's 10 MB limit for plain git blobs.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.h5", "*.npy",
                "*.npz", "*.pkl", "*.msgpack", "*.zip", "*.tar.gz", "*.tif", "*.tiff")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# With exactly this message a 401 stays a plain HfHubHTTPError in the client instead of being
# reported as RepositoryNotFoundError, so a bad token reads as what it is.
BAD_CREDENTIALS = "Invalid credentials in Authorization header"


def is_lfs(path: str, size: int) -> bool:
    return size > LFS_THRESHOLD or any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        # What git stores for an LFS file: its git oid is the one the Hub reports in tree listings.
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def etag(self) -> str:
        """The value the client keys its blob cache by (and compares with preupload's `oid`)."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    private: bool = False
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> uploaded LFS object, per repo as on the Hub
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit id -> immutable snapshot

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


@dataclass
class Fault:
    """A misbehaviour of the server for the requests it matches (``HubServer.inject``).

    Attributes:
        path: ``fnmatch`` pattern of the request path, e.g. ``"/org/*/resolve/*/model.safetensors"``.
        method: only requests with this HTTP method; ``None`` for any.
        status: answer with this HTTP status instead of serving the request.
        stall_s: wait this many seconds before doing anything (a shorter client timeout gives up).
        drop: close the connection without sending any answer.
        flip_byte: serve the file with the byte at this offset inverted (downloads only).
        after: called once the request has been handled (e.g. to push a commit mid-download).
        times: how many matching requests it applies to; ``None`` for all of them.
        hits: how many requests it has applied to so far.
    """

    path: str
    method: str | None = None
    status: int | None = None
    stall_s: float = 0.0
    drop: bool = False
    flip_byte: int | None = None
    after: Callable[[], object] | None = None
    times: int | None = None
    hits: int = 0


class HubError(Exception):
    """An error answer: HTTP status, the `X-Error-Code` the client maps to an exception, extra headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class HubServer:
    """In-memory Hub. ``start()`` binds an ephemeral port and returns the endpoint URL."""

    def __init__(self, valid_tokens: set[str] | frozenset[str] = frozenset({"hf_test_token"}),
                 default_namespace: str = "test-user") -> None:
        self.valid_tokens = set(valid_tokens)
        self.default_namespace = default_namespace
        self.repos: dict[tuple[str, str], Repo] = {}
        # Upload URLs handed out by LFS batch calls (our stand-in for pre-signed storage URLs).
        self._lfs_pending: dict[str, tuple[Repo, str, int]] = {}  # upload id -> (repo, oid, size)
        self._lock = threading.RLock()
        self._log: list[tuple[str, str]] = []
        self._faults: list[Fault] = []
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- lifecycle and request log -------------------------------------------------------
    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # keep-alive connections must not block interpreter exit
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received since the last ``clear_log()``."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # ---- fault injection -----------------------------------------------------------------
    def inject(self, *faults: Fault) -> None:
        """Apply ``faults`` to the requests they match from now on (the first match wins)."""
        with self._lock:
            self._faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.method in (None, method) and fnmatch.fnmatchcase(path, fault.path)
                        and (fault.times is None or fault.hits < fault.times)):
                    fault.hits += 1
                    return fault
        return None

    # ---- server-side repo manipulation (no client involved) ------------------------------
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo with the Hub's initial `.gitattributes` commit; returns that commit id."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this model repo")
            repo = self.repos[(repo_type, repo_id)] = Repo(private=private)
            initial = {".gitattributes": Blob(GITATTRIBUTES, False)}
            return self._new_commit(repo, "main", initial, "initial commit")

    def seed_repo(self, repo_id: str, folder: str | Path, repo_type: str = "model",
                  private: bool = False, branch: str = "main") -> str:
        """Commit every file of ``folder`` on top of ``branch`` (creating the repo if needed)."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        with self._lock:
            if (repo_type, repo_id) not in self.repos:
                self.create_repo(repo_id, repo_type, private)
            repo = self.repos[(repo_type, repo_id)]
            snapshot = dict(repo.commits[repo.branches.get(branch) or repo.branches["main"]])
            for path, data in files.items():
                blob = Blob(data, is_lfs(path, len(data)))
                if blob.lfs:
                    repo.lfs[blob.sha256] = data
                snapshot[path] = blob
            return self._new_commit(repo, branch, snapshot, f"seed from {folder.name}")

    def head(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> str | None:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            return repo.branches.get(branch) if repo else None

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            return {p: b.data for p, b in repo.commits[repo.resolve(revision)].items()}

    def _new_commit(self, repo: Repo, branch: str, snapshot: dict[str, Blob], summary: str) -> str:
        # Commit ids only need to be unique 40-hex strings; the counter makes equal trees distinct.
        tree = sorted((p, b.etag) for p, b in snapshot.items())
        key = [next(self._counter), repo.branches.get(branch), tree, summary]
        oid = hashlib.sha1(json.dumps(key).encode()).hexdigest()
        repo.commits[oid] = snapshot
        repo.branches[branch] = oid
        return oid

    # ---- protocol helpers used by the handler --------------------------------------------
    def repo_for(self, repo_type: str, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token not in self.valid_tokens):
            # The Hub does not tell "private" from "missing" to anonymous callers.
            raise HubError(401 if repo else 404, "Repository not found", "RepoNotFound")
        return repo

    def check_write(self, token: str | None) -> None:
        if token not in self.valid_tokens:
            why = "No Bearer token was sent" if token is None else "This Hub does not accept that token"
            raise HubError(401, why, headers={"X-Error-Message": BAD_CREDENTIALS})

    def snapshot_at(self, repo: Repo, rev: str) -> tuple[str, dict[str, Blob]]:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit, repo.commits[commit]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    hub: HubServer

    def log_message(self, format: str, *args: object) -> None:  # the request log replaces stderr noise
        pass

    def _dispatch(self) -> None:
        raw_path = urlsplit(self.path).path
        with self.hub._lock:
            self.hub._log.append((self.command, raw_path))
        # Read the body before anything can fail: with keep-alive, unread bytes would corrupt the next request.
        # The client always sends Content-Length; a chunked body cannot be skipped, so drop the connection.
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return self._send(411, b"Content-Length required")
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        self.token = auth[7:] if auth.startswith("Bearer ") else None
        # Splitting before unquoting keeps quoted revisions such as refs%2Fpr%2F1 in one segment.
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        self.fault = self.hub._fault_for(self.command, raw_path)
        try:
            if self.fault is not None and self._misbehave(self.fault):
                return
            try:
                with self.hub._lock:
                    self._route(parts)
            except HubError as e:
                headers = {"X-Error-Code": e.code} if e.code else {}
                self._json({"error": str(e)}, e.status, {**headers, **e.headers})
            except (KeyError, IndexError, TypeError, ValueError) as e:
                # 400, not 500: the client retries 5xx with backoff, which would only slow a failing test down.
                self._json({"error": f"Malformed request: {e!r}"}, 400)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stall outlasted its timeout)
            self.close_connection = True
        finally:
            if self.fault is not None and self.fault.after is not None:
                self.fault.after()

    def _misbehave(self, fault: Fault) -> bool:
        """Apply the parts of ``fault`` that replace the answer; True when the request is done."""
        if fault.stall_s:
            threading.Event().wait(fault.stall_s)
        if fault.drop:
            self.close_connection = True  # the client sees the connection end with no answer
            return True
        if fault.status is not None:
            self._json({"error": f"Injected fault: HTTP {fault.status}"}, fault.status)
            return True
        return False

    do_HEAD = do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _route(self, parts: list[str]) -> None:
        hub, cmd = self.hub, self.command
        if parts[0] == "api":
            if parts[1:] == ["repos", "create"] and cmd == "POST":
                return self._create_repo()
            if parts[1:] == ["repos", "delete"] and cmd == "DELETE":
                hub.check_write(self.token)
                repo_type, repo_id = self._repo_from_body()
                hub.repo_for(repo_type, repo_id, self.token)
                del hub.repos[(repo_type, repo_id)]
                return self._json({})
            if parts[1:] == ["validate-yaml"] and cmd == "POST":
                return self._json({"errors": [], "warnings": []})
            if len(parts) >= 4 and parts[1] in REPO_TYPES:
                repo_type, repo_id, rest = REPO_TYPES[parts[1]], "/".join(parts[2:4]), parts[4:]
                repo = hub.repo_for(repo_type, repo_id, self.token)
                if cmd == "GET" and (not rest or rest[0] == "revision"):
                    return self._repo_info(repo_id, repo, rest[1] if len(rest) > 1 else "main")
                if cmd == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo, rest[1], "/".join(rest[2:]))
                if cmd == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                    return self._preupload(repo, rest[1])
                if cmd == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                    return self._commit_endpoint(repo_type, repo_id, repo, rest[1])
            raise HubError(404, f"Not found: {self.path}")  # includes /api/agent-harnesses
        if parts[0] == "lfs-upload" and len(parts) == 2 and cmd == "PUT":
            return self._lfs_put(parts[1])
        repo_type = REPO_TYPES.get(parts[0]) if parts[0] in ("datasets", "spaces") else "model"
        parts = parts[1:] if repo_type != "model" else parts
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            hub.check_write(self.token)
            repo_id = f"{parts[0]}/{parts[1][:-4]}"
            repo = hub.repo_for(repo_type, repo_id, self.token)
            if parts[5] == "batch":
                verify_url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"
                return self._lfs_batch(repo, verify_url)
            if parts[5] == "verify":
                if json.loads(self.body)["oid"] not in repo.lfs:
                    raise HubError(404, "LFS object not found")
                return self._json({"success": True})
        if len(parts) >= 5 and parts[2] == "resolve" and cmd in ("GET", "HEAD"):
            return self._resolve(repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not found: {self.path}")

    # ---- downloads -----------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        commit, snapshot = self.hub.snapshot_at(self.hub.repo_for(repo_type, repo_id, self.token), rev)
        blob = snapshot.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the miss under .no_exist/<commit>/.
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.lfs:
            # Served in place rather than via a 302 to a CDN; the linked headers are what the client keys on.
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        if self.fault is not None and self.fault.flip_byte is not None:
            data = bytearray(data)
            data[self.fault.flip_byte] ^= 0xFF
            data = bytes(data)
        if (rng := self.headers.get("Range", "")).startswith("bytes="):  # resumed downloads
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self._send(status, data, headers)

    def _repo_info(self, repo_id: str, repo: Repo, rev: str) -> None:
        commit, snapshot = self.hub.snapshot_at(repo, rev)
        siblings = [{"rfilename": p} for p in sorted(snapshot)]
        self._json({"id": repo_id, "sha": commit, "private": repo.private, "siblings": siblings})

    def _tree(self, repo: Repo, rev: str, prefix: str) -> None:
        _, snapshot = self.hub.snapshot_at(repo, rev)
        base = prefix + "/" if prefix else ""
        recursive = "recursive=true" in urlsplit(self.path).query.lower()
        folders = {p.rsplit("/", i)[0] for p in snapshot for i in range(1, p.count("/") + 1)}
        entries = []
        for path in sorted(set(snapshot) | folders):
            depth = path[len(base):].count("/")
            if not path.startswith(base) or (depth > 0 and not recursive):
                continue
            blob = snapshot.get(path)
            if blob is None:  # a folder: its git tree id means nothing to the client, any stable 40-hex does
                tree_id = hashlib.sha1(path.encode()).hexdigest()
                entries.append({"type": "directory", "path": path, "oid": tree_id})
                continue
            entry = {"type": "file", "path": path, "size": len(blob.data),
                     "oid": git_blob_sha1(blob.pointer if blob.lfs else blob.data)}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            entries.append(entry)
        if prefix and prefix not in folders:
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        self._json(entries)  # a single page: no Link header, so the client does not paginate

    # ---- uploads -------------------------------------------------------------------------
    def _repo_from_body(self) -> tuple[str, str]:
        req = json.loads(self.body)
        namespace = req.get("organization") or self.hub.default_namespace
        return req.get("type") or "model", f"{namespace}/{req['name']}"

    def _create_repo(self) -> None:
        self.hub.check_write(self.token)
        repo_type, repo_id = self._repo_from_body()
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        req = json.loads(self.body)
        private = req.get("private") or req.get("visibility") == "private"  # 2.x sends `visibility`
        try:
            self.hub.create_repo(repo_id, repo_type, bool(private))
        except HubError as e:
            # The client reads `url` from the 409 body when exist_ok=True.
            return self._json({"error": str(e), "url": url}, e.status)
        self._json({"url": url, "name": repo_id})

    def _preupload(self, repo: Repo, rev: str) -> None:
        self.hub.check_write(self.token)
        _, snapshot = self.hub.snapshot_at(repo, rev)
        files = []
        for f in json.loads(self.body)["files"]:
            lfs = is_lfs(f["path"], f["size"]) and f["size"] > 0
            current = snapshot.get(f["path"])
            # The client compares this oid with its own (sha256 for LFS, git sha1 otherwise) and leaves
            # unchanged files out of the commit.
            oid = current.etag if current is not None and current.lfs == lfs else None
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": files})

    def _lfs_batch(self, repo: Repo, verify_url: str) -> None:
        objects = []
        for obj in json.loads(self.body)["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in repo.lfs:
                objects.append({"oid": oid, "size": size})  # no actions: already stored
                continue
            upload_id = uuid.uuid4().hex
            self.hub._lfs_pending[upload_id] = (repo, oid, size)
            actions = {"upload": {"href": f"{self.hub.url}/lfs-upload/{upload_id}"},
                       "verify": {"href": verify_url}}
            objects.append({"oid": oid, "size": size, "actions": actions})
        self._json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, upload_id: str) -> None:
        # Like a pre-signed URL, the upload id is the credential: the client sends no Authorization here.
        if upload_id not in self.hub._lfs_pending:
            raise HubError(403, "Unknown or already used upload URL")
        repo, oid, size = self.hub._lfs_pending.pop(upload_id)
        if hashlib.sha256(self.body).hexdigest() != oid or len(self.body) != size:
            raise HubError(400, "Uploaded content does not match the announced sha256/size")
        repo.lfs[oid] = self.body
        self._send(200)

    def _commit_endpoint(self, repo_type: str, repo_id: str, repo: Repo, branch: str) -> None:
        self.hub.check_write(self.token)
        if "create_pr=1" in (urlsplit(self.path).query or ""):
            raise HubError(400, "Pull requests are not supported by the test Hub")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first ndjson line must be the commit header")
        header = lines[0]["value"]
        head = repo.branches[branch]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}: {branch} is at {head}")
        snapshot = dict(repo.commits[head])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                snapshot[path] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = repo.lfs.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                snapshot[path] = Blob(data, True)
            elif key in ("deletedFile", "deletedFolder"):
                folder = path.rstrip("/") + "/"
                doomed = [p for p in snapshot if p == path or (key == "deletedFolder" and p.startswith(folder))]
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del snapshot[p]
            else:
                raise HubError(400, f"Unsupported commit operation: {key}")
        oid = self.hub._new_commit(repo, branch, snapshot, header.get("summary", ""))
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{oid}"
        self._json({"commitOid": oid, "commitUrl": url, "pullRequestUrl": None})
