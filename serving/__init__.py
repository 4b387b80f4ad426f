"""Ray Serve application over the engine (see the serving issue)."""
