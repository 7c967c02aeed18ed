"""Operations: ``GET /metrics``, drift routes (``/v1/drift``), the scrape-time collector and the Redis wiring."""
