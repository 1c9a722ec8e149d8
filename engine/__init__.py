"""hayabusa.engine"""
