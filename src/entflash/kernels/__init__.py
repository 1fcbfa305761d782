"""Triton kernels of entflash. Stages of the forward: sweep.py (dense row max, row-relative tile max), solve.py (tau),
output.py (sparse output); shared @triton.jit helpers in common.py; launch plan in launch.py;
the pipeline in forward.py."""
