"""Command line: `python -m entflash demo` (placeholder until the demo lands)."""
import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="entflash")
    parser.add_argument("command", choices=["demo"])
    parser.parse_args(argv)
    print("entflash demo: not built yet")
    return 0
