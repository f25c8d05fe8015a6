"""Ablation: no position skips (PoSE off). Hypothesis: without gaps in training, loss at a 10**6 position gap rises
well above the no-gap loss, while the no-gap loss is unchanged.

    python train.py configs/tiny.py configs/ablate/no_pose.py --out_dir=out/tiny-no-pose
Baseline: configs/tiny.py (pose = True). Compare with bench/position_gap.py on both checkpoints.
"""
pose = False
