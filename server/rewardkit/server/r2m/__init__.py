"""R2M online alignment in the server: feedback ingestion, the background updater, versioned heads, routes.

See docs/r2m.md ("Serving") for the HTTP API, the frame fields and the delivery guarantees.
"""
