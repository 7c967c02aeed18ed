"""``python -m rewardkit.training.testbed make --out DIR``."""

from rewardkit.training.testbed.cli import main

raise SystemExit(main())
