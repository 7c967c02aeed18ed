"""rewardkit.training: preference datasets, the synthetic testbed, trainers (BT, RRM, Id-RM, R2M heads),
evaluation and export."""
