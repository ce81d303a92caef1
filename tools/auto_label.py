"""Auto-label an image folder into metadata.csv, the lora-scripts habit: `python tools/auto_label.py DIR [options]`.

The same as `sdtune label DIR [options]` (see `sdtune label --help`).
"""

import sys

from sdtune.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
