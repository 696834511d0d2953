"""Build the report card of a run from its run directories alone (no GPU, no model loading):

    python scripts/report.py RUN_DIR [RUN_DIR ...] [--out DIR]

The run directories are the phases in order (base, mid, sft, rl). Writes DIR/report.md (default DIR: the first
RUN_DIR) and DIR/loss.png, DIR/val_bpb.png; the last line printed is `report: PATH`. See megachat/report.py.
"""
import argparse

from megachat import cli
from megachat.report import write_report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of the phases, in order")
    p.add_argument("--out", default=None, help="directory for report.md and the plots (default: the first RUN_DIR)")
    args = p.parse_args(argv)
    print(f"report: {write_report(args.run_dirs, args.out or args.run_dirs[0])}")
    return 0


if __name__ == "__main__":
    cli.run(main)
