"""A local OpenAI-compatible /v1/embeddings server for tests, backed by a real embedder.

It listens on 127.0.0.1 (an ephemeral port), serves until stopped, and can be told to answer
the next requests with given HTTP errors (429, 500 ...) to exercise retries.
"""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class EmbeddingServer:
    def __init__(self, embedder):
        self.embedder = embedder
        self.fail_next = []      # HTTP statuses to answer with, in order, before serving again
        self.requests = []       # JSON bodies received
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, payload, headers=()):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    status = server.fail_next.pop(0) if server.fail_next else None
                if self.path != "/v1/embeddings":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                if status is not None:
                    return self._reply(status, {"error": {"message": f"injected {status}",
                                                          "type": "test"}},
                                       headers=[("Retry-After", "0")] if status == 429 else [])
                texts = body["input"]
                texts = [texts] if isinstance(texts, str) else texts
                if not texts or not all(isinstance(t, str) for t in texts):
                    return self._reply(400, {"error": {"message": "input must be strings"}})
                e = server.embedder.encode_documents(texts)
                dims = body.get("dimensions")
                if dims is not None:
                    if dims > e.shape[1]:
                        return self._reply(400, {"error": {"message": f"dimensions {dims} too large"}})
                    # As text-embedding-3 does: shorten, then re-normalise.
                    e = e[:, :dims]
                    e = e / np.linalg.norm(e, axis=1, keepdims=True)
                b64 = body.get("encoding_format") == "base64"
                data = [{"object": "embedding", "index": i,
                         "embedding": (base64.b64encode(row.astype("<f4").tobytes()).decode()
                                       if b64 else row.tolist())}
                        for i, row in enumerate(e)]
                # Out of order, as the API allows: clients must sort by index.
                data.reverse()
                self._reply(200, {"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
