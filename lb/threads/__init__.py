"""The threads data path (``LB_WORKER=threads``), the reference the event-driven path is held
to: gunicorn's gthread worker with JSON errors and client deadlines (``worker``), and blocking
keep-alive connections to the replicas under the Flask view (``forward``)."""
