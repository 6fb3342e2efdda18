"""Operating the balancer: metrics, structured request logs, the status page, the OpenAPI
description and the health endpoints, all under the reserved prefix ``/_lb/``.

``blueprint`` holds the endpoints and request hooks, ``metrics`` the Prometheus figures,
``status`` the status document, ``openapi`` the API description and ``supervision`` the
supervisor's metrics. Nothing is imported here, so the supervisor can load its metrics without
Flask.
"""
