"""The web adapter: the playground, a community's gallery and its dashboard, in a browser."""

from bots.web._app import PLAYGROUND_COMMUNITY, create_app
from bots.web._server import WebServer, check_listen, is_loopback, serve_forever

__all__ = ["PLAYGROUND_COMMUNITY", "WebServer", "check_listen", "create_app", "is_loopback",
           "serve_forever"]
