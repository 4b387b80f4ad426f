"""cogrt's video service: the OpenAI videos API on Ray Serve, with durable jobs.

- schema.py: the wire models; catalog.py: what the model accepts; handlers.py: the endpoints' work; app.py: routes
  and `build_app`; options.py: the deployments' Serve options.
- store.py: the job store (SQLAlchemy: SQLite or PostgreSQL); storage.py: outputs (a directory or fsspec URL).
- dispatcher.py: jobs from the store to free replicas; generator.py: the engine, one pipeline per replica;
  autoscale.py: replicas for the store's backlog.
- auth.py, loras.py, limits.py, metrics.py; cli.py: `cogrt serve`.
"""
