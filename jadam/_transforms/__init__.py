"""The math of the newer Adam-family members: one module per family.

Each module holds a `scale_by_<name>` building block (state, init, update) and its
public alias; `_common` holds the few helpers they share.
"""
