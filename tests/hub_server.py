"""A small stand-in for the Hugging Face Hub, standard library only, speaking real HTTP to the real
huggingface_hub client: repos, branches, preupload, LFS basic transfer, NDJSON commits, commit
listing, tree listing and file download at any revision. State lives in memory and survives a
stop()/start() of the server (to test outages). Tokens: "bad" is refused with 401."""

import base64
import hashlib
import json
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class HubState:
    def __init__(self):
        self.repos = {}  # repo_id -> {"branches": {name: commit id}, "commits": {id: commit}}
        self.blobs = {}  # sha256 hex -> bytes
        self.regular = set()  # sha256 of the blobs sent as regular (not LFS) files: the tree lists them by git sha1
        self.lock = threading.Lock()
        self.count = threading.Lock()  # guards bytes_sent (replies are written outside self.lock)
        self.requests = []  # (method, path) of every request, for assertions
        self.collections = {}  # slug -> [item ids]
        self.echo_token = False  # refuse every request with 403, echoing the Authorization header (a leaky server)
        self.bytes_sent = 0  # response body bytes, all requests together (to measure what downloads cost)
        self.rate = None  # bytes per second: bodies are sent at this pace (a slow link); None: at once

    def new_commit(self, repo, parent, title, files, message=""):
        cid = hashlib.sha1(f"{len(repo['commits'])}{title}{time.time_ns()}".encode()).hexdigest()
        repo["commits"][cid] = {"id": cid, "parent": parent, "title": title, "files": files, "message": message,
                                "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
        return cid

    def add_repo(self, repo_id):
        repo = self.repos[repo_id] = {"branches": {}, "commits": {}}
        repo["branches"]["main"] = self.new_commit(repo, None, "initial commit", {})

    def resolve(self, repo, rev):
        rev = unquote(rev)
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["commits"]:
            return rev
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState = None
    base = ""

    def log_message(self, *args):
        pass

    # helpers -------------------------------------------------------------------------------
    def reply(self, status, body=b"", headers=None, content_type="application/json"):
        self.answer = (status, body, headers, content_type)  # sent once the state lock is let go

    def send(self, status, body=b"", headers=None, content_type="application/json"):
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        for i in range(0, len(body), 1 << 16):
            chunk = body[i:i + (1 << 16)]
            if self.state.rate:
                time.sleep(len(chunk) / self.state.rate)
            self.wfile.write(chunk)
            with self.state.count:
                self.state.bytes_sent += len(chunk)

    def error(self, status, message, code=None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.reply(status, {"error": message}, headers)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def authorized(self):
        if self.state.echo_token:
            self.error(403, f"Forbidden: no write access for Authorization: {self.headers.get('Authorization', '')}")
            return False
        if self.headers.get("Authorization", "") == "Bearer bad":
            self.error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def repo(self, repo_id):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self.error(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return repo

    # routing -------------------------------------------------------------------------------
    def route(self):
        self.answer = None
        self.handle_request()
        if self.answer:
            self.send(*self.answer)

    def handle_request(self):
        self.state.requests.append((self.command, self.path))
        if not self.authorized():
            return
        url = urlparse(self.path)
        path, query = url.path, parse_qs(url.query)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self.state.lock:
            if path == "/api/repos/create" and self.command == "POST":
                return self.create_repo(json.loads(self.body()))
            if path.startswith("/api/collections/") and self.command == "POST":
                slug = "/".join(parts[2:-1])
                self.state.collections.setdefault(slug, []).append(json.loads(self.body())["item"]["id"])
                return self.reply(200, {"slug": slug, "title": slug, "owner": {"name": "tester"}, "items": [],
                                        "lastUpdated": datetime.now(timezone.utc).isoformat(), "position": 0,
                                        "private": False, "theme": "default", "upvotes": 0})
            if parts[0] == "api" and parts[1] in ("models", "datasets") and len(parts) == 4:
                repo_id = ("" if parts[1] == "models" else "datasets/") + f"{parts[2]}/{parts[3]}"
                repo = self.repo(repo_id)
                return self.repo_info(repo_id, repo, "main") if repo is not None else None
            if parts[0] == "api" and parts[1] in ("models", "datasets") and len(parts) >= 5:
                prefix = "" if parts[1] == "models" else "datasets/"
                repo_id, action, rest = f"{prefix}{parts[2]}/{parts[3]}", parts[4], parts[5:]
                repo = self.repo(repo_id)
                if repo is None:
                    return
                if action == "branch" and self.command == "POST":
                    return self.create_branch(repo, "/".join(rest))
                if action == "preupload":
                    return self.preupload(json.loads(self.body()))
                if action == "commit" and self.command == "POST":
                    return self.commit(repo_id, repo, "/".join(rest))
                if action == "commits":
                    return self.list_commits(repo, "/".join(rest))
                if action == "tree":
                    return self.tree(repo, rest[0], "/".join(rest[1:]), query)
                if action == "revision":
                    return self.repo_info(repo_id, repo, "/".join(rest))
            if path.endswith(".git/info/lfs/objects/batch"):
                return self.lfs_batch(json.loads(self.body()))
            if parts[0] == "lfs-upload" and self.command == "PUT":
                return self.lfs_put(parts[1])
            if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
                parts = [f"datasets/{parts[1]}"] + parts[2:]
                repo = self.repo(f"{parts[0]}/{parts[1]}")
                if repo is not None:
                    return self.resolve(f"{parts[0]}/{parts[1]}", repo, parts[3], "/".join(parts[4:]))
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = self.repo(f"{parts[0]}/{parts[1]}")
                if repo is not None:
                    return self.resolve(f"{parts[0]}/{parts[1]}", repo, parts[3], "/".join(parts[4:]))
                return
        self.error(404, f"no route for {self.command} {self.path}")

    do_GET = do_POST = do_PUT = do_HEAD = route

    # endpoints -----------------------------------------------------------------------------
    def create_repo(self, payload):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"tester/{repo_id}"
        if payload.get("type") == "dataset":
            repo_id = f"datasets/{repo_id}"
        url = f"{self.base}/{repo_id}"
        if repo_id in self.state.repos:
            return self.reply(409, {"error": "You already created this model repo", "url": url})
        self.state.add_repo(repo_id)
        self.reply(200, {"url": url, "name": repo_id})

    def create_branch(self, repo, branch):
        if branch in repo["branches"]:
            return self.error(409, f"Branch {branch} already exists")
        payload = json.loads(self.body() or b"{}")
        start = self.state.resolve(repo, payload.get("startingPoint", "main"))
        repo["branches"][branch] = start
        self.reply(200, {})

    def preupload(self, payload):
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            binary = b"\x00" in sample or f["size"] > 10_000
            files.append({"path": f["path"], "uploadMode": "lfs" if binary else "regular",
                          "shouldIgnore": False, "oid": None})
        self.reply(200, {"files": files, "commitOid": None})

    def lfs_batch(self, payload):
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}}}}
                   for o in payload["objects"]]
        self.reply(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, oid):
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "sha256 mismatch")
        self.state.blobs[oid] = data
        self.reply(200, {})

    def commit(self, repo_id, repo, rev):
        branch = unquote(rev)
        if branch not in repo["branches"]:
            return self.error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        header = lines[0]["value"]
        parent = repo["branches"][branch]
        files = dict(repo["commits"][parent]["files"])
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                oid = hashlib.sha256(data).hexdigest()
                self.state.blobs[oid] = data
                self.state.regular.add(oid)
                files[value["path"]] = oid
            elif key == "lfsFile":
                if value["oid"] not in self.state.blobs:
                    return self.error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = value["oid"]
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self.error(404, f"A file with this name doesn't exist: {value['path']}")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
        cid = self.state.new_commit(repo, parent, header["summary"], files, header.get("description", ""))
        repo["branches"][branch] = cid
        self.reply(200, {"commitUrl": f"{self.base}/{repo_id}/commit/{cid}", "commitOid": cid, "success": True})

    def list_commits(self, repo, rev):
        cid = self.state.resolve(repo, rev)
        if cid is None:
            return self.error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        out = []
        while cid is not None:
            c = repo["commits"][cid]
            out.append({"id": cid, "title": c["title"], "message": c["message"], "authors": [{"user": "tester"}],
                        "date": c["date"]})
            cid = c["parent"]
        self.reply(200, out)

    def tree(self, repo, rev, prefix, query):
        cid = self.state.resolve(repo, rev)
        if cid is None:
            return self.error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        entries, dirs = [], set()
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = prefix.rstrip("/") + "/" if prefix else ""
        for path, oid in sorted(repo["commits"][cid]["files"].items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):].split("/")
            for i in range(1, len(rest)):  # the folders on the way
                folder = base + "/".join(rest[:i])
                if (recursive or i == 1) and folder not in dirs:
                    dirs.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
            if recursive or len(rest) == 1:
                data = self.state.blobs[oid]
                if oid in self.state.regular:  # as the Hub lists a file kept in git: its git blob id
                    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    entries.append({"type": "file", "path": path, "size": len(data), "oid": git})
                else:
                    entries.append({"type": "file", "path": path, "size": len(data), "oid": oid,
                                    "lfs": {"oid": oid, "size": len(data), "pointerSize": 130}})
        self.reply(200, entries)

    def repo_info(self, repo_id, repo, rev):
        cid = self.state.resolve(repo, rev)
        if cid is None:
            return self.error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        self.reply(200, {"id": repo_id, "modelId": repo_id, "sha": cid, "private": False,
                         "siblings": [{"rfilename": p} for p in sorted(repo["commits"][cid]["files"])]})

    def resolve(self, repo_id, repo, rev, path):
        cid = self.state.resolve(repo, rev)
        if cid is None:
            return self.error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        oid = repo["commits"][cid]["files"].get(path)
        if oid is None:
            return self.error(404, f"Entry not found: {path}", "EntryNotFound")
        data = self.state.blobs[oid]
        headers = {"X-Repo-Commit": cid, "ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start, _, end = rng[6:].partition("-")
            if not start:  # the last `end` bytes
                start, end = max(0, len(data) - int(end)), len(data) - 1
            else:
                start, end = int(start), int(end) if end else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self.reply(206, data[start:end + 1], headers, "application/octet-stream")
        self.reply(200, data, headers, "application/octet-stream")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args):
        self.connections = set()  # the open client sockets, closed by stop() (an outage cuts kept-alive ones too)
        super().__init__(*args)

    def get_request(self):
        sock, address = super().get_request()
        self.connections.add(sock)
        return sock, address

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        pass  # clients that hang up mid-request (a killed trainer, a stopped server) are expected


class HubServer:
    """server = HubServer(); server.start() ... server.stop(); server.start() (same port, same state)."""

    def __init__(self, port=0):
        self.state, self.port, self.httpd, self.thread = HubState(), port, None, None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        for _ in range(50):
            try:
                self.httpd = QuietServer(("127.0.0.1", self.port), handler)
                break
            except OSError:  # the port of a just-stopped server may linger briefly
                time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}")
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        handler.base = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        for sock in list(self.httpd.connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd.server_close()

    def files(self, repo_id, rev):
        repo = self.state.repos[repo_id]
        cid = self.state.resolve(repo, rev)
        return {p: self.state.blobs[o] for p, o in repo["commits"][cid]["files"].items()}

    def create(self, repo_id):
        """An empty repository (datasets/owner/name for a dataset) with its first commit on main."""
        with self.state.lock:
            self.state.add_repo(repo_id)

    def plant(self, repo_id, branch, title, files, message=""):
        """Commit files ({repo path: bytes}) to a branch directly, as the owner of a hostile or
        damaged repository could (as LFS files)."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            parent = repo["branches"][branch]
            tree = dict(repo["commits"][parent]["files"])
            for path, data in files.items():
                oid = hashlib.sha256(data).hexdigest()
                self.state.blobs[oid] = data
                tree[path] = oid
            repo["branches"][branch] = self.state.new_commit(repo, parent, title, tree, message)

    def titles(self, repo_id, branch):
        repo, out = self.state.repos[repo_id], []
        cid = repo["branches"][branch]
        while cid is not None:
            out.append((repo["commits"][cid]["title"], cid))
            cid = repo["commits"][cid]["parent"]
        return list(reversed(out))
