"""hayabusa.tokenizer"""
