"""Command line: `unike demo | bench | train-tiny`."""
import sys


def main(argv=None) -> int:
    print("unike", argv or sys.argv[1:])
    return 0
