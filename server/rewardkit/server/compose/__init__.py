"""Several reward models in one server and composed rewards (issue 24 part 3; docs/team.md)."""
