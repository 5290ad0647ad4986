"""Build a tiny preset model (random weights, offline tokenizer) into a folder: the study's build_model rule.

    python workflow/scripts/build_model.py PRESET OUT_DIR
"""

import sys

from moetuner.extraction.presets import build_preset

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: build_model.py PRESET OUT_DIR (PRESET: a conf/presets/model/tiny-*.yaml name)")
    build_preset(sys.argv[1], sys.argv[2])
