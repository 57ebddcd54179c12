"""`python benchmarks/run.py ARGS` = `python -m regnet_kernels bench ARGS`."""
import sys

from regnet_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
