"""jadam: the Adam family as pure, optax-compatible gradient transformations.

Everything public is re-exported here; the modules behind it are private.
"""

__version__ = "0.1.0"
