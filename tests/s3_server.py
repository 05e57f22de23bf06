"""A real S3 endpoint on loopback (moto's server), and the environment that points boto3 at it."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                           create_backend_app)
from werkzeug.serving import make_server


def _slow_writes(app: Callable[..., Any], delay_s: float) -> Callable[..., Any]:
    """Every PUT (an object or a part of one) waits ``delay_s`` first: a slow link to S3."""
    def delayed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["REQUEST_METHOD"] == "PUT":
            time.sleep(delay_s)
        return app(environ, start_response)
    return delayed


_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                  b'<Message>Access Denied</Message></Error>')


def _refused_writes(app: Callable[..., Any], refuse: threading.Event) -> Callable[..., Any]:
    """While ``refuse`` is set, every PUT is answered 403 AccessDenied, as S3 answers a role
    without its bucket's KMS key grant; reads and deletions go on."""
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["REQUEST_METHOD"] == "PUT" and refuse.is_set():
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [_ACCESS_DENIED]
        return app(environ, start_response)
    return guarded


@contextlib.contextmanager
def s3_endpoint(*, put_delay_s: float = 0.0,
                refuse_puts: threading.Event | None = None) -> Iterator[str]:
    """The URL of an in-memory S3 on 127.0.0.1 for as long as the block runs (moto's
    ThreadedMotoServer, with the application wrapped when writes should be slow or refused)."""
    app = DomainDispatcherApplication(create_backend_app)
    if put_delay_s:
        app = _slow_writes(app, put_delay_s)
    if refuse_puts is not None:
        app = _refused_writes(app, refuse_puts)
    server = make_server("127.0.0.1", 0, app, threaded=True,
                         request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        thread.join()


def aws_env(endpoint: str) -> dict[str, str]:
    """What a user exports on the cluster: boto3 reads these itself, nothing is in the config."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}  # never ask an instance-metadata service
