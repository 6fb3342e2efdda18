"""The OpenAPI 3.1 description of the balancer, served at /_lb/openapi.json.

Written by hand, next to the code it describes, and kept true by ``tests/test_openapi.py``: the
document must validate, and every response it lists is provoked on a real stack and checked
against its schema (and every reply seen there must be listed).
"""

from __future__ import annotations

from typing import Any

from lb.naming import HOSTNAME_RE, MAX_HOSTNAME
from lb.registry import ReplicaState
from lb.strategies import MAX_WEIGHT

JSON = "application/json"
PREFIX = "/_lb"
STATES = [str(s) for s in ReplicaState]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str, example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _ref(schema)}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {JSON: media}}


def _failure(description: str, example: str | None = None) -> dict[str, Any]:
    return _json(description, "Failure",
                 None if example is None else {"message": f"<Error> {example}",
                                               "status": "failure"})


def _success(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["message", "status"],
        "additionalProperties": False,
        "properties": {"message": schema, "status": {"const": "successful"}},
    }


def _scale_request(**more: dict[str, Any]) -> dict[str, Any]:
    """/rm's body, or /add's with its ``weight`` as ``more``."""
    return {
        "type": "object",
        "required": ["n"],
        "additionalProperties": False,
        "properties": {
            "n": {"type": "integer", "minimum": 1},
            "hostnames": {
                "type": "array",
                "description": "At most n names; the rest are chosen at random (/add) or "
                               "removed at random (/rm)",
                "items": {"type": "string", "maxLength": MAX_HOSTNAME,
                          "pattern": "^" + HOSTNAME_RE.pattern.removesuffix("\\Z") + "$"},
            },
            **more,
        },
    }


SCHEMAS: dict[str, Any] = {
    "Failure": {
        "description": "The contract's error envelope, for every error the balancer returns.",
        "type": "object",
        "required": ["message", "status"],
        "additionalProperties": False,
        "properties": {
            "message": {"type": "string", "pattern": "^<Error> "},
            "status": {"const": "failure"},
        },
    },
    "Rep": {
        "type": "object",
        "required": ["N", "replicas"],
        "additionalProperties": False,
        "properties": {
            "N": {"type": "integer", "minimum": 0},
            "replicas": {"type": "array", "items": {"type": "string"},
                         "description": "Hostnames of the managed replicas"},
        },
    },
    "RepReply": _success(_ref("Rep")),
    "ScaleRequest": _scale_request(),
    "AddRequest": _scale_request(weight={
        "type": "integer", "minimum": 1, "maximum": MAX_WEIGHT, "default": 1,
        "description": "The weight of every replica the call starts: its share of the keys "
                       "relative to the others' (see POST /weight)"}),
    "WeightsRequest": {
        "type": "object",
        "required": ["weights"],
        "additionalProperties": False,
        "properties": {"weights": {
            "type": "object", "description": "Hostname -> its new weight (0 drains it: "
                                             "routed nothing new). Empty: a read, nothing "
                                             "changes",
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT}}},
    },
    "Weights": {
        "type": "object",
        "required": ["N", "replicas", "weights", "shares"],
        "additionalProperties": False,
        "properties": {
            "N": {"type": "integer", "minimum": 0},
            "replicas": {"type": "array", "items": {"type": "string"}},
            "weights": {"type": "object", "description": "Hostname -> weight, every managed "
                        "replica",
                        "additionalProperties": {"type": "integer", "minimum": 0,
                                                 "maximum": MAX_WEIGHT}},
            "shares": {"type": "object", "description": "Hostname -> its part of the key "
                       "space (ring slots or Maglev table entries) at these weights, slow "
                       "start's ramps aside (0: drained, or not ready)",
                       "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}},
        },
    },
    "WeightsReply": _success(_ref("Weights")),
    "HomeReply": {
        "description": "A replica's /home reply, passed through as it is.",
        "type": "object",
        "required": ["message", "status"],
        "properties": {
            "message": {"type": "string", "pattern": "^Hello from Server: [0-9]+$"},
            "status": {"const": "successful"},
        },
    },
    "Alive": _success({"const": "alive"}),
    "Ready": _success({
        "type": "object",
        "required": ["ready", "routable", "registry_version", "stale"],
        "additionalProperties": False,
        "properties": {
            "ready": {"const": True},
            "routable": {"type": "integer", "minimum": 1,
                         "description": "Routable replicas in the set this worker routes with"},
            "registry_version": {"type": "integer", "description": "That set's registry version"},
            "stale": {"type": ["string", "null"],
                      "description": "Null, or why that set may be out of date: the registry "
                                     "cannot be read (routing goes on with the last good set), "
                                     "or nobody has written it for a while (the supervisor is "
                                     "not running, or cannot write it)"},
        },
    }),
    "ReplicaStatus": {
        "type": "object",
        "required": ["hostname", "server_id", "state", "routable", "address", "domain",
                     "virtual_slots", "slots_owned", "weight", "share", "expected_share", "ramp",
                     "last_heartbeat", "heartbeat_age",
                     "failures", "restarts", "requests", "errors", "request_rate", "error_rate",
                     "ejected_until", "ejections", "in_flight", "queued"],
        "additionalProperties": False,
        "properties": {
            "hostname": {"type": "string"},
            "server_id": {"type": "integer", "minimum": 1},
            "state": {"enum": STATES},
            "routable": {"type": "boolean", "description": "Ready and has an address: requests "
                                                           "go to it"},
            "address": {"type": ["string", "null"]},
            "domain": {"type": ["string", "null"],
                       "description": "Its failure domain (the Swarm node it runs on); null "
                                      "when unknown or when all replicas share one host. A "
                                      "failed try is retried in another domain first"},
            "virtual_slots": {"type": "array", "items": {"type": "integer", "minimum": 0},
                              "description": "Where its virtual servers sit on the map (K, "
                                             "or weight x K when LB_STRATEGY=ring)"},
            "slots_owned": {"type": "integer", "minimum": 0,
                            "description": "Slots (ring) or table entries (maglev) of the "
                                           "routing strategy that are its at its weight"},
            "weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT,
                       "description": "Its share of the keys relative to the others' (0: "
                                      "drained, routed nothing new)"},
            "share": {"type": "number", "minimum": 0, "maximum": 1,
                      "description": "The part of the key space the router gives it now: "
                                     "slots_owned / ring.slots, but while a replica ramps up "
                                     "(LB_SLOW_START) that one's expected_share x ramp, and "
                                     "the rest of its slots' keys with their former owners"},
            "expected_share": {"type": "number", "minimum": 0, "maximum": 1,
                               "description": "Its share at its weight once no ramp runs "
                                              "(equal to share when nothing ramps)"},
            "ramp": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                     "description": "How far its slow start has gone (LB_SLOW_START): the "
                                    "fraction of its keys it takes so far; null when it does "
                                    "not ramp up now"},
            "last_heartbeat": {"type": ["number", "null"],
                               "description": "Unix time of the last heartbeat on record "
                                              "(recorded at least every max(2 s, 4 x "
                                              "LB_HEARTBEAT_INTERVAL))"},
            "heartbeat_age": {"type": ["number", "null"], "description": "Seconds"},
            "failures": {"type": "integer", "minimum": 0,
                         "description": "Consecutive missed heartbeats"},
            "restarts": {"type": "integer", "minimum": 0,
                         "description": "Consecutive starts that never became ready"},
            "requests": {"type": "integer", "minimum": 0,
                         "description": "Requests it answered since lb-run started"},
            "errors": {"type": "integer", "minimum": 0,
                       "description": "Its 5xx answers plus attempts that could not reach it"},
            "request_rate": {"type": ["number", "null"], "minimum": 0,
                             "description": "Per second over the last rate_window seconds"},
            "error_rate": {"type": ["number", "null"], "minimum": 0},
            "ejected_until": {"type": ["number", "null"],
                              "description": "Unix time until which the balancer worker that "
                                             "answered routes around it after failures in a "
                                             "row (passive ejection; each worker judges for "
                                             "itself), or null"},
            "ejections": {"type": "integer", "minimum": 0,
                          "description": "Times a balancer worker ejected it since lb-run "
                                         "started (lb_replica_ejections_total)"},
            "in_flight": {"type": "integer", "minimum": 0,
                          "description": "Requests the balancer worker that answered has in "
                                         "flight to it, counted when LB_REPLICA_MAXCONN is set"},
            "queued": {"type": "integer", "minimum": 0,
                       "description": "Requests that worker has waiting for a slot at it "
                                      "(LB_QUEUE_SIZE at most)"},
        },
    },
    "Status": {
        "type": "object",
        "required": ["deployment", "generated_at", "registry_version", "registry", "rep",
                     "replicas_desired", "replicas_by_state", "hash_map", "ring",
                     "rate_window", "totals", "replicas"],
        "additionalProperties": False,
        "properties": {
            "deployment": {"type": "string"},
            "generated_at": {"type": "number"},
            "registry_version": {"type": "integer"},
            "registry": {
                "type": "object",
                "description": "The store this balancer worker routes from",
                "required": ["store", "revision", "leader", "change_age"],
                "additionalProperties": False,
                "properties": {
                    "store": {"type": "string", "enum": ["file", "etcd"]},
                    "revision": {"type": "integer", "description": "The registry revision "
                                 "this worker has applied (etcd: the state key's revision; "
                                 "file: the registry version)"},
                    "leader": {"type": ["string", "null"], "description": "The supervisor "
                               "that leads (etcd: 'host:pid' of the lease holder; null: none, "
                               "or the file store, whose one supervisor needs no election)"},
                    "change_age": {"type": ["number", "null"], "minimum": 0,
                                   "description": "Seconds since this worker applied the last "
                                                  "change of the registry"},
                },
            },
            "rep": _ref("Rep"),
            "replicas_desired": {"type": "integer", "minimum": 0},
            "replicas_by_state": {
                "type": "object",
                "required": STATES,
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "hash_map": {
                "type": "object",
                "required": ["preset", "description", "formulas", "slots", "virtual",
                             "probing", "strategy", "hash_key"],
                "additionalProperties": False,
                "properties": {
                    "preset": {"type": "string", "description": "The registry's hash spec: a "
                               "preset name, canonical formulas 'H=...; Phi=...' or a plug-in "
                               "'package.module:name'"},
                    "description": {"type": "string"},
                    "formulas": {"type": ["object", "null"], "description": "H and Phi as "
                                 "formulas, when the hash has them (null: xxhash, plug-ins)",
                                 "required": ["H", "Phi"], "additionalProperties": False,
                                 "properties": {"H": {"type": "string"},
                                                "Phi": {"type": "string"}}},
                    "slots": {"type": "integer"},
                    "virtual": {"type": "integer"}, "probing": {"type": "string"},
                    "strategy": {"type": "string"}, "hash_key": {"type": "string"},
                },
            },
            "ring": {
                "type": "object",
                "description": "The key space of the strategy that routes: the ring's slots "
                               "(ring, ring160) or Maglev's table entries",
                "required": ["layout", "slots", "arcs", "virtual_servers"],
                "additionalProperties": False,
                "properties": {
                    "layout": {"type": "string", "enum": ["ring", "table"],
                               "description": "ring: replicas answer for arcs of consecutive "
                                              "slots; table: for entries scattered over a "
                                              "table (no arcs)"},
                    "slots": {"type": "integer", "minimum": 1},
                    "arcs": {"type": "array", "description": "[first slot, last slot, server id] "
                             "of each run of slots one routable replica answers for",
                             "items": {"type": "array", "minItems": 3, "maxItems": 3,
                                       "items": {"type": "integer", "minimum": 0}}},
                    "virtual_servers": {"type": "array", "description": "[slot, server id] of "
                                        "every routable replica's virtual servers on the ring",
                                        "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                  "items": {"type": "integer", "minimum": 0}}},
                },
            },
            "rate_window": {"type": ["number", "null"],
                            "description": "Seconds the rates span; null on a first sample"},
            "totals": {
                "type": "object",
                "required": ["requests", "errors"],
                "additionalProperties": False,
                "properties": {"requests": {"type": "integer", "minimum": 0},
                               "errors": {"type": "integer", "minimum": 0}},
            },
            "replicas": {"type": "array", "items": _ref("ReplicaStatus")},
        },
    },
    "StatusReply": _success(_ref("Status")),
}

_SCALE_BODY = {"required": False, "content": {JSON: {"schema": _ref("ScaleRequest")}}}
_ADD_BODY = {"required": False, "content": {JSON: {"schema": _ref("AddRequest")}}}
_WEIGHTS_BODY = {"required": True, "content": {JSON: {"schema": _ref("WeightsRequest")}}}
_TOKEN: list[dict[str, list[str]]] = [{}, {"adminToken": []}]
_UNAUTHORIZED = _failure("LB_ADMIN_TOKEN is set and the request lacks "
                         "'Authorization: Bearer <token>'")
_DEFAULT = _failure("The balancer's own trouble (registry locked or unreadable, ...)")
_REGISTRY = ("The registry is locked, cannot be read (routing goes on with the last good set) "
             "or cannot be written; the message says which, never where")


def _routed(ok: dict[str, Any], not_served: bool) -> dict[str, Any]:
    out = {"200": ok}
    if not_served:
        out["400"] = _failure("No replica serves this path (it answered 404)",
                              "'/other' endpoint does not exist in server replicas")
    out["502"] = _failure("No replica could be reached (each one was tried clockwise)")
    out["503"] = _failure("No replica is available", "No replica available to serve the request")
    return out


PATHS: dict[str, Any] = {
    "/rep": {"get": {
        "operationId": "rep", "tags": ["contract"], "summary": "The managed replicas",
        "responses": {"200": _json("N and the replicas' hostnames", "RepReply"),
                      "503": _failure(_REGISTRY),
                      "default": _DEFAULT},
    }},
    "/add": {"post": {
        "operationId": "add", "tags": ["contract"], "security": _TOKEN,
        "summary": "Start n new replicas (named as given, the rest at random)",
        "description": "All or nothing: a rejected or failed call changes nothing. The body is "
                       "read as JSON whatever its Content-Type.",
        "requestBody": _ADD_BODY,
        "responses": {
            "200": _json("The replica set after the call", "RepReply"),
            "400": _failure("Malformed body, n not a positive integer, an invalid hostname, "
                            f"more hostnames than n, or a weight not an integer 1..{MAX_WEIGHT}",
                            "Length of hostname list is more than newly added instances"),
            "401": _UNAUTHORIZED,
            "409": _failure("A name already exists, the maximum or the hash map would be "
                            "exceeded (weights included)"),
            "408": _failure("The body stopped arriving for LB_CLIENT_TIMEOUT seconds"),
            "413": _failure("Body larger than LB_MAX_BODY"),
            "503": _failure("The new replicas could not be started in time (nothing was "
                            "added), or " + _REGISTRY[0].lower() + _REGISTRY[1:]),
            "default": _DEFAULT,
        },
    }},
    "/rm": {"delete": {
        "operationId": "rm", "tags": ["contract"], "security": _TOKEN,
        "summary": "Remove n replicas: the named ones, then others at random",
        "requestBody": _SCALE_BODY,
        "responses": {
            "200": _json("The replica set after the call", "RepReply"),
            "400": _failure("Malformed body, n not a positive integer, or more hostnames than n",
                            "Length of hostname list is more than removable instances"),
            "401": _UNAUTHORIZED,
            "409": _failure("A named replica does not exist, or n exceeds the replicas"),
            "408": _failure("The body stopped arriving for LB_CLIENT_TIMEOUT seconds"),
            "413": _failure("Body larger than LB_MAX_BODY"),
            "503": _failure(_REGISTRY),
            "default": _DEFAULT,
        },
    }},
    "/weight": {
        "post": {
            "operationId": "setWeights", "tags": ["admin"], "security": _TOKEN,
            "summary": "Change the weights of any replicas at once; {\"weights\": {}} lists "
                       "them",
            "description": "All or nothing. A weight change moves keys only between the "
                           "replica whose weight changed and the others (on the rings; "
                           "Maglev's table moves a few more). Weight 0 drains a replica: it "
                           "stays in /rep and answers what it has. The body is read as JSON "
                           "whatever its Content-Type.",
            "requestBody": _WEIGHTS_BODY,
            "responses": {
                "200": _json("/rep's message, every replica's weight and share", "WeightsReply"),
                "400": _failure("Malformed body, or a weight not an integer 0.."
                                f"{MAX_WEIGHT}", "The weight of 'Server1' must be an integer "
                                f"from 0 to {MAX_WEIGHT} (0 drains the replica)"),
                "401": _UNAUTHORIZED,
                "409": _failure("A name that is not a replica, or one still being added, or "
                                "weights that do not fit the strategy's map",
                                "Replica 'nobody' does not exist"),
                "408": _failure("The body stopped arriving for LB_CLIENT_TIMEOUT seconds"),
                "413": _failure("Body larger than LB_MAX_BODY"),
                "503": _failure(_REGISTRY),
                "default": _DEFAULT,
            },
        },
        "get": {
            "operationId": "routedWeight", "tags": ["routed"],
            "summary": "Routed to one replica like any GET: only POST /weight is the "
                       "balancer's",
            "responses": _routed({"description": "The replica's reply, as it sent it"},
                                 not_served=True),
        },
    },
    "/home": {"get": {
        "operationId": "home", "tags": ["routed"],
        "summary": "Routed to one replica by the consistent hash map",
        "responses": _routed(_json("The replica's reply", "HomeReply"), not_served=False),
    }},
    "/{path}": {"get": {
        "operationId": "routed", "tags": ["routed"],
        "summary": "Any other GET: routed to one replica, whose reply is passed back",
        "description": "The path may have several segments. Paths under /_lb/ are the "
                       "balancer's own and are never routed.",
        "parameters": [{"name": "path", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": _routed({"description": "The replica's reply, as it sent it (e.g. "
                                             "/heartbeat: an empty body)"}, not_served=True),
    }},
    f"{PREFIX}/healthz": {"get": {
        "operationId": "healthz", "tags": ["operations"],
        "summary": "Liveness: the balancer answers",
        "responses": {"200": _json("Alive", "Alive")},
    }},
    f"{PREFIX}/readyz": {"get": {
        "operationId": "readyz", "tags": ["operations"],
        "summary": "Readiness: this worker has a replica set with a routable replica",
        "description": "Fail static: a registry that becomes unreadable leaves the last good "
                       "set, so the balancer stays ready, and 'stale' says what is wrong.",
        "responses": {"200": _json("Ready to route", "Ready"),
                      "503": _failure("Not ready: no routable replica, or no replica set was "
                                      "ever read", "Not ready: no routable replica")},
    }},
    f"{PREFIX}/status.json": {"get": {
        "operationId": "status", "tags": ["operations"],
        "summary": "Replicas, heartbeats, ring, request counts and recent rates",
        "responses": {"200": _json("The status document", "StatusReply"),
                      "503": _failure(_REGISTRY),
                      "default": _DEFAULT},
    }},
    f"{PREFIX}/status": {"get": {
        "operationId": "statusPage", "tags": ["operations"],
        "summary": "The live status page (HTML; refreshes itself from status.json)",
        "responses": {"200": {"description": "An HTML page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}},
    }},
    f"{PREFIX}/metrics": {"get": {
        "operationId": "metrics", "tags": ["operations"],
        "summary": "Prometheus metrics of every worker and of the supervisor",
        "responses": {
            "200": {"description": "Prometheus text exposition format 0.0.4",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            "503": _failure("prometheus-client is not installed (pip install 'hashlb[ops]')"),
        },
    }},
    f"{PREFIX}/openapi.json": {"get": {
        "operationId": "openapi", "tags": ["operations"], "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1",
                              "content": {JSON: {"schema": {"type": "object"}}}}},
    }},
}


def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hashlb: consistent-hashing load balancer",
            "version": version,
            "description": "The contract's endpoints (/rep, /add, /rm and routed GETs) and the "
                           f"balancer's own endpoints under the reserved prefix {PREFIX}/. "
                           "Every error uses the envelope {\"message\": \"<Error> ...\", "
                           "\"status\": \"failure\"}. A method a path does not take, "
                           "OPTIONS included, is a 405 in that envelope, with the path's one "
                           "Allow: POST for /add, DELETE for /rm, GET, HEAD, POST for "
                           "/weight, GET, HEAD for every other path.",
        },
        "tags": [
            {"name": "contract", "description": "Fixed by the contract: same keys, strings, "
                                                "codes"},
            {"name": "admin", "description": "The balancer's own admin endpoints beyond "
                                             "the contract (weights)"},
            {"name": "routed", "description": "GETs passed on to a replica"},
            {"name": "operations", "description": f"The balancer's own, under {PREFIX}/"},
        ],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"adminToken": {
                "type": "http", "scheme": "bearer",
                "description": "Needed by /add, /rm and POST /weight only when "
                               "LB_ADMIN_TOKEN is set"}},
        },
    }
