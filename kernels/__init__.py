"""hayabusa.kernels"""
