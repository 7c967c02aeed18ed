"""The `rewardkit` command."""
def main() -> None:
    raise SystemExit("not yet")
