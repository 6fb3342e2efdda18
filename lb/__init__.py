"""A customizable consistent-hashing load balancer.

The package at a glance, by concern:

- **hashing** (pure, no I/O): ``hashring`` (the consistent hash map), ``formulas`` (hash
  functions as integer formulas), ``strategies`` (ring, Maglev, ...: a key to a replica);
- **the registry** (the replicas' shared state): ``registry`` (the model and the JSON file
  store), ``etcd`` (the etcd store), ``stores`` (which one the settings name), ``watch``
  (inotify on the file), ``leases`` and ``owners`` (who holds an entry), ``bootstrap`` (the
  first state, a consistent hash map);
- **the data paths**: ``routing`` (the rules both share: candidates, the one ring walk,
  headers), ``ejections`` (passive health: replicas failing in a row leave routing), ``aio/`` (the event-driven worker, the default) and ``threads/`` (the threads
  worker, the reference);
- **the admin API**: ``app`` (the Flask app gunicorn serves), ``admin`` (``/add`` and ``/rm``),
  ``balancer`` (the parts one worker is built from, typed, handed to both paths), ``errors``
  (the contract's envelope), ``naming`` (replica hostnames);
- **operations**: ``ops/`` (status page, metrics, OpenAPI), ``logs``, ``events``, ``ctl``
  (``lbctl``);
- **replicas**: ``backends/`` (local processes, Docker, Swarm), ``heartbeat``;
- **running it**: ``settings`` (every setting, once), ``stack`` (``lb-run``), ``ha``
  (``lb-ha``), ``gunicorn_conf``, ``lifeline``.

The supervisor is its own package (``supervisor``), and so is the replica (``replica``).
"""
