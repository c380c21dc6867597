"""A local web page for labelling the human preference pool: which of two responses is better.

In:  the human preference pool (generate_preferences' human.jsonl); the labels file, if it exists
Out: the labels file, rewritten after every label, one line per labelled prompt in pool order:
     {"prompt_id", "preference": "1" | "2" | "tie", "response_1", "response_2", "labeller"}
     (the stage `label_human` turns it into labelled pairs)

    python -m tools.label_server --pool data/preferences/human.jsonl --labels data/raw/labels/human.jsonl

then open the printed address. Keys: 1 or Left = response 1 is better, 2 or Right = response 2,
t = tie, s = skip, u or Backspace = back. Each label is saved at once; a reload or a restart
continues at the first unlabelled pair after the last labelled one. Labelling a pair again
replaces its label; labels of prompts that are not in the pool are kept as they are.
The server listens on localhost only: it has no authentication.
"""

import argparse
import contextlib
import getpass
import ipaddress
import json
import signal
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

from stages.lib import StageError, run_stage
from stages.lib.log import get_logger
from stages.lib.records import PREFERENCES, LabelRecord, read_labels, read_pool, write_labels

log = get_logger("label_server")

PAGE = Path(__file__).with_name("label_page.html")
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10  # a client that stalls mid-request cannot hold a handler thread (or shutdown) longer


class LabelStore:
    """The pool and its labels; every change rewrites the labels file whole."""

    def __init__(self, pool_path: Path, labels_path: Path, labeller: str):
        self.pool = read_pool(pool_path)
        self.labels_path = labels_path
        self.labeller = labeller
        self.prompt_ids = [record["metadata"]["prompt_id"] for record in self.pool]
        self.index_of = {prompt_id: index for index, prompt_id in enumerate(self.prompt_ids)}
        existing = read_labels(labels_path) if labels_path.exists() else []
        self.labels = {label["prompt_id"]: label for _, label in existing}
        self.lock = threading.Lock()

    def labelled(self) -> int:
        return sum(prompt_id in self.labels for prompt_id in self.prompt_ids)

    def next_unlabelled(self, after: int | None = None) -> int | None:
        """The first unlabelled pair after `after` in pool order, wrapping around; None when all are labelled.

        Without `after`, it starts after the last labelled pair, so a reload continues where the
        labeller stopped and comes back to skipped pairs at the end.
        """
        if after is None:
            after = max((i for i, prompt_id in enumerate(self.prompt_ids) if prompt_id in self.labels), default=-1)
        total = len(self.prompt_ids)
        for step in range(1, total + 1):
            index = (after + step) % total
            if self.prompt_ids[index] not in self.labels:
                return index
        return None

    def state(self, after: int | None = None) -> dict:
        with self.lock:
            return {"total": len(self.pool), "labelled": self.labelled(), "next": self.next_unlabelled(after),
                    "labeller": self.labeller, "labels_file": str(self.labels_path)}

    def pair(self, index: int) -> dict:
        record = self.pool[index]
        prompt_id = self.prompt_ids[index]
        with self.lock:
            label = self.labels.get(prompt_id)
        earlier = label is not None and (label["response_1"], label["response_2"]) != (
            record["response_1"], record["response_2"])
        return {"index": index, "prompt_id": prompt_id, "prompt": record["prompt"],
                "response_1": record["response_1"], "response_2": record["response_2"],
                "label": label["preference"] if label else None, "labelled_on_earlier_samples": earlier}

    def set_label(self, prompt_id: str, preference: str) -> dict:
        record = self.pool[self.index_of[prompt_id]]
        with self.lock:
            labels = {**self.labels, prompt_id: LabelRecord(prompt_id=prompt_id, preference=preference,
                                                            response_1=record["response_1"],
                                                            response_2=record["response_2"], labeller=self.labeller)}
            in_pool = [labels[p] for p in self.prompt_ids if p in labels]
            elsewhere = [label for p, label in labels.items() if p not in self.index_of]
            write_labels(self.labels_path, in_pool + elsewhere)
            self.labels = labels  # only once the file holds it, so the page never shows an unsaved label
            labelled = self.labelled()
            next_index = self.next_unlabelled(self.index_of[prompt_id])
        log.info("%s: %s (%d / %d labelled)", prompt_id, preference, labelled, len(self.pool))
        return {"total": len(self.pool), "labelled": labelled, "next": next_index}


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class LabelHandler(BaseHTTPRequestHandler):
    server: "LabelServer"
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self):
        self.respond(self.handle_get)

    def do_POST(self):
        self.respond(self.handle_post)

    def respond(self, handler):
        try:
            self.check_host()
            status, content_type, body = handler()
        except RequestError as err:
            status, content_type = err.status, "application/json"
            body = json.dumps({"error": str(err)}).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def check_host(self):
        # A page from another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own Host.
        host = self.headers.get("Host")
        if host is None:
            return
        name = urlsplit(f"//{host}").hostname or ""
        if name not in {"localhost", "127.0.0.1", "::1", self.server.server_address[0]}:
            raise RequestError(HTTPStatus.FORBIDDEN, f"unexpected Host header {host!r}")

    def handle_get(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        store = self.server.store
        if url.path == "/":
            return HTTPStatus.OK, "text/html; charset=utf-8", self.server.page
        if url.path == "/api/state":
            after = self.index_param(query, "after") if "after" in query else None
            return self.json(store.state(after))
        if url.path == "/api/pair":
            return self.json(store.pair(self.index_param(query, "index")))
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

    def handle_post(self):
        if urlsplit(self.path).path != "/api/label":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
        # Requiring JSON makes a cross-site form or fetch need a CORS preflight, which this server never grants.
        if self.headers.get_content_type() != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the label as application/json")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be 1 to {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        prompt_id, preference = body.get("prompt_id"), body.get("preference")
        if not isinstance(prompt_id, str) or prompt_id not in self.server.store.index_of:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"prompt_id {prompt_id!r} is not in the pool")
        if preference not in PREFERENCES:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"preference must be \"1\", \"2\" or \"tie\", got {preference!r}")
        try:
            return self.json(self.server.store.set_label(prompt_id, preference))
        except OSError as err:
            raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not write the labels file: {err}") from None

    def index_param(self, query: dict, name: str) -> int:
        value = (query.get(name) or [""])[0]
        total = len(self.server.store.pool)
        if not (value.isascii() and value.isdigit()) or int(value) >= total:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer from 0 to {total - 1}, got {value!r}")
        return int(value)

    @staticmethod
    def json(payload: dict):
        return HTTPStatus.OK, "application/json", json.dumps(payload, ensure_ascii=False).encode()

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


class LabelServer(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so none outlive the server.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], store: LabelStore, page: bytes):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.page = page
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, LabelHandler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        # Browsers open sockets ahead of need and leave them idle; ending their reads lets the handler
        # threads waiting on them finish now rather than at REQUEST_TIMEOUT_S.
        with self.connections_lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
        super().server_close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def require_loopback(host: str, what: str = "the labelling server") -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise StageError(f"--host {host}: {what} has no authentication and only listens on "
                         f"localhost (127.0.0.1, ::1); reach it from elsewhere through an SSH tunnel")


def make_server(pool: str | Path, labels: str | Path, host: str = "127.0.0.1", port: int = 8765,
                labeller: str | None = None) -> LabelServer:
    """A bound, not yet serving, labelling server; run it with `serve_forever()`, stop it with
    `shutdown()` + `server_close()`."""
    require_loopback(host)
    store = LabelStore(Path(pool), Path(labels), labeller or default_labeller())
    if not store.pool:
        raise StageError(f"{pool}: the pool is empty; nothing to label")
    try:
        return LabelServer((host, port), store, PAGE.read_bytes())
    except OSError as err:
        raise StageError(f"--port {port}: cannot listen on {host}:{port}: {err.strerror or err}") from None


def default_labeller() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", required=True, type=Path, help="the human preference pool (JSONL)")
    parser.add_argument("--labels", required=True, type=Path, help="the labels file (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    parser.add_argument("--port", default=8765, type=int)
    parser.add_argument("--labeller", default=None, help="name written with each label (default: your user name)")
    args = parser.parse_args(argv)

    # Ctrl-C stops the server even when started from a process that ignores SIGINT (which children inherit).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = make_server(args.pool, args.labels, args.host, args.port, args.labeller)
    state = server.store.state()
    log.info("%d / %d pairs labelled (labeller %s); open %s  (Ctrl-C stops)", state["labelled"], state["total"],
             state["labeller"], server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped; labels are in %s", args.labels)
    finally:
        server.server_close()


if __name__ == "__main__":
    run_stage(main)
