"""Our server in this process: uvicorn in a thread on a socket bound to 127.0.0.1 port 0."""

import contextlib
import socket
import threading

import uvicorn

from sparse_ssm.serve import ServeConfig, create_app, served_model
from sparse_ssm.serve.guard import uvicorn_config


@contextlib.contextmanager
def running_server(model, tokenizer, name="tiny", **limits):
    """Yield (base url, Served).  The socket listens before the thread starts, so a client may
    connect at once (the connection waits until the server accepts it)."""
    served = served_model(model, tokenizer, name, ServeConfig(port=0, **limits))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn_config(create_app(served), served.limits, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", served
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def raw_exchange(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` as it is on a new connection to the server at `url` (127.0.0.1) and return all
    it answers until it closes the connection (or `timeout` passes: socket.timeout)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def http_head(path: str, length: int | None = None, chunked: bool = False) -> bytes:
    """A POST request head for `raw_exchange` (Connection: close)."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Connection: close"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
