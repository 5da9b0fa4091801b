"""The explorer's views: head atlas, head detail (with the ranking table), model view, compare.

Each module owns one tab's static layout and the pure helpers that turn a Scan into that tab's components and
figures (through `posprobe.render`). Implements no metric (docs/explorer.md).
"""
