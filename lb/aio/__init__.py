"""The event-driven data path (``LB_WORKER=async``): a gunicorn worker running an event loop.

``worker``: the gunicorn worker class; ``server``: the HTTP/1.1 server on the client side;
``upstream``: pooled keep-alive connections to the replicas. Every routing rule comes from
``lb.routing``, shared with the threads path.
"""
