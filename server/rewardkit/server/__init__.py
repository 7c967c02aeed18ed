"""rewardkit.server: the FastAPI reward-model service (app, scheduler, model worker, metrics, drift)."""
