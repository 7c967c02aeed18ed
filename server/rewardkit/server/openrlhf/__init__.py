"""OpenRLHF's remote reward model: ``POST /get_reward`` (docs/integrations.md)."""
