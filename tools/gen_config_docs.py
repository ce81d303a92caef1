"""Regenerates the key table in docs/configuration.md from the config schema (sdtune/config.py).

python tools/gen_config_docs.py
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import config_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN, END = "<!-- BEGIN GENERATED REFERENCE -->", "<!-- END GENERATED REFERENCE -->"


def main() -> None:
    """Replaces the text between the markers with the current reference."""
    text = DOC.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{config_reference()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
