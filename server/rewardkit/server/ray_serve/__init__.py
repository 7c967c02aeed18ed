"""rewardkit on Ray Serve: ``rewardkit serve --ray`` (docs/deploy.md).

The same FastAPI app as ``rewardkit serve``, one per Serve replica (one model worker each), behind Serve's HTTP
proxy on ``--host/--port``. Replicas share heads, the score cache and drift through Redis, as plain replicas do; with
R2M on, the feedback stream has one reader: an updater deployment of exactly one replica. Needs the ``ray`` extra
(``pip install 'rewardkit[ray]'``); nothing else in rewardkit imports Ray.

- ``deployment``: the Serve deployments, their options, and ``app_builder`` (the import path of
  ``serve run`` and of KubeRay's ``serveConfigV2``).
- ``launch``: the ``serve --ray`` command: join or start Ray, run the application, SIGTERM shuts it down.
"""
