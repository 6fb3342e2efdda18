"""gunicorn settings of every replica (local processes, containers, the tests' echo replicas).

The balancer accepts requests within gunicorn's default limits (a request line of 4,094 bytes,
100 header fields of up to 8,190 bytes) and forwards them with headers of its own: one more
address on ``X-Forwarded-For``, ``X-Forwarded-Host``, ``X-Forwarded-Proto``, ``X-Request-ID``.
A replica's limits leave room for those, so a request the balancer took is never refused by
the replica for what the balancer added.
"""

limit_request_line = 8190
limit_request_fields = 200
limit_request_field_size = 16380
