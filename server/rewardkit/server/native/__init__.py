"""The native API: ``POST /v1/rewards`` (scalar and ABC dense), ``GET /v1/models``, ``/health``, ``/ready``."""
