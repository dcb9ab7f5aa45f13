"""megatron_sdpg: Self-Distilled Policy Gradient on Megatron-core with TP/PP/DP.

Importing the package is cheap and never touches CUDA: megatron-core and the CPU
platform layer are imported by the modules that need them.
"""

__version__ = "0.1.0"
