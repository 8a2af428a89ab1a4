"""Data-driven neuron allocation: train an over-complete seed ScaleNet on ImageNet (training.py),
then keep each block's neurons with the largest BN scales (pruning.py) to write an allocation file."""
