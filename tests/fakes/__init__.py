"""Test doubles: a numpy stand-in for the CUDA driver and its kernels, tiny random-weight models."""
