"""Operating the balancer: metrics, structured request logs, the status page, the OpenAPI
description and the health endpoints, all under the reserved prefix ``/_lb/``.

``blueprint`` holds the endpoints and request hooks, ``metrics`` the Prometheus figures (the
supervisor's counters, ``supervisor.metrics``, use its helpers), ``status`` the status document
and ``openapi`` the API description. Nothing is imported here, so loading ``metrics`` pulls in
no Flask.
"""
