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
