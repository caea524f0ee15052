"""qcowd_client: a client for qcowd's REST API (openapi/openapi.yaml), standard
library only (http.client, json).

    from qcowd_client import Client, NotFound
    c = Client("http://127.0.0.1:8080")
    c.create("disk", 1 << 30, cluster_size=65536)
    c.write("disk", 4096, b"hello")
    assert c.read("disk", 4096, 5) == b"hello"
    job = c.convert("disk", "copy", wait=True)

Every method raises a QcowdError subclass (NotFound, Conflict, ...; see
qcowd_client.errors) when the server answers an error, and OSError when it
cannot be reached. A Client keeps one HTTP/1.1 connection: use one per thread.
"""

from .client import CHUNK, Client, Event
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors

__version__ = "0.1.0"
__all__ = ["Client", "Event", "CHUNK"] + _errors
