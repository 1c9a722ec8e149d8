"""hayabusa.bench"""
