"""List the operators kiln supports, generated from the operator registry.

  kiln ops [--markdown | --json]
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/operators.md)")
    style.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import json

    from ..tools.ops_table import format_markdown, format_text, operator_rows

    rows = operator_rows()
    print(json.dumps(rows, indent=2) if args.json else format_markdown(rows) if args.markdown else format_text(rows))
    return 0
