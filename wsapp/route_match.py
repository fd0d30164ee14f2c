"""Which Flask endpoint an upgrade request is for, without binding Werkzeug's URL map every time.

`url_map.bind_to_environ(environ).match()` builds a `MapAdapter` for each request (host, scheme,
script name, subdomain) before it matches: a tenth of a handshake's Python time on the built-in
routes (docs/PERFORMANCE.md, "Connect time"). A match on a rule without variable parts depends on
nothing but the request fields in `_KEY_FIELDS` and the map's rules, so it is remembered under those.
Matches with URL arguments are never remembered (a converter may decide differently next time),
nor are misses; both go through Werkzeug each time, as before.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

# Everything `bind_to_environ` and `match` read from the environ (werkzeug.routing.map, get_host),
# but the query string: only a redirect's URL uses it, and a redirect is a miss here.
_KEY_FIELDS = ("PATH_INFO", "SCRIPT_NAME", "REQUEST_METHOD", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT",
               "wsgi.url_scheme", "HTTP_CONNECTION", "HTTP_UPGRADE")
# Client-chosen paths and hosts must not grow it without bound; a full cache starts over.
MAX_REMEMBERED = 256

_remembered: WeakKeyDictionary[Map, dict[tuple[Any, ...], str]] = WeakKeyDictionary()


def endpoint_for(url_map: Map, environ: dict[str, Any]) -> str | None:
    """The endpoint `url_map` gives this request, or None where Werkzeug raises (404, 405, redirect)."""
    # The rule count keys it too: a rule added later (Flask allows it until a first Flask request)
    # is seen at once. (Werkzeug's `_rules` would build a list of them all to count them.)
    rules = sum(map(len, url_map._rules_by_endpoint.values()))
    key = (rules, *map(environ.get, _KEY_FIELDS))
    known = _remembered.get(url_map)
    if known is None:
        known = _remembered[url_map] = {}
    endpoint = known.get(key)
    if endpoint is not None:
        return endpoint
    try:
        rule, args = url_map.bind_to_environ(environ).match(return_rule=True)
    except HTTPException:
        return None
    if not args and not rule.arguments:
        if len(known) >= MAX_REMEMBERED:
            known.clear()
        known[key] = rule.endpoint
    return rule.endpoint
