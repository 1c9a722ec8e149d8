"""hayabusa's GPU first light: one command that turns a lent GPU into numbers, whatever breaks on the way.

`bench/gpu_first_light.sh` runs it (`python3 -m first_light` from bench/, before the checkout is installed: the
install is one of its stages, so this package uses the standard library only). `plan` holds the stages, `runner`
runs them under one deadline, `finish` writes the summary and bundles what exists, `probe` is the preflight.
"""
