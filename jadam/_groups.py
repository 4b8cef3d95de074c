"""Parameter groups by name, and the usual weight-decay mask.

`param_groups` turns rules on parameter paths into one `optax.partition`, so
the result is still a single optax transformation; `decay_mask` is the
"decay matrices, not biases or norm scales" mask for `mask=` arguments.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jadam import _numerics as nx

DEFAULT_LABEL = "default"
_SHOWN = 10  # paths listed in an error message before "... and N more"


def path_name(path: Any) -> str:
    """A key path as `param_groups` matches it: keys joined by "/", e.g. "Dense_0/kernel"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _listing(names: list[str], quote: bool = True) -> str:
    shown = ", ".join(repr(n) if quote else n for n in names[:_SHOWN])
    more = len(names) - _SHOWN
    return shown + (f" ... and {more} more" if more > 0 else "")


def _build_override(
    factory: Callable[..., Any], pattern: str, overrides: Mapping[str, Any]
) -> optax.GradientTransformation:
    """`factory(**overrides)`, with `lr_scale` as a final `optax.scale`."""
    kwargs = dict(overrides)
    lr_scale = kwargs.pop("lr_scale", None)
    where = f"param_groups rule {pattern!r}"
    try:
        inspect.signature(factory).bind_partial(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"{where}: the default optimizer factory does not take {sorted(kwargs)} ({err}). "
            "Overrides are lr_scale and keyword arguments of the factory, e.g. "
            "weight_decay, mu_dtype, nu_dtype."
        ) from None
    except ValueError:  # a callable without an inspectable signature: let it decide
        pass
    tx = factory(**kwargs)
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(
            f"{where}: the default factory returned {tx!r}, not an optax GradientTransformation."
        )
    if lr_scale is None:
        return tx
    nx.check_nonnegative(f"{where}: lr_scale", lr_scale)
    # Every jadam alias (and optax optimizer) ends in scale_by_learning_rate, so
    # scaling its output scales the learning rate, decoupled decay included,
    # as a torch param group's `lr` does.
    return optax.chain(tx, optax.scale(lr_scale))


def param_groups(
    rules: Mapping[str, Any], default: Any = None
) -> optax.GradientTransformationExtraArgs:
    """One optimizer that treats groups of parameters, chosen by path, differently.

    Each parameter leaf is named by its path in the params tree, keys joined by
    "/" (`jax.tree_util.keystr(path, simple=True, separator="/")`): a Flax
    `params` collection gives "Dense_0/kernel", a list index gives "layers/0/w".
    Pass the tree the optimizer is initialised with (`variables["params"]` for
    Flax, so paths start at the module names). A rule applies to a leaf when its
    regular expression matches the *whole* path (`re.fullmatch`): write
    `r".*/bias"` for every bias, `r"Embed_0/.*"` for one module.

    A rule's value is either an optax transformation for its leaves, or a dict
    of overrides applied to the `default` optimizer factory: `lr_scale` (a
    learning-rate multiplier) and any keyword of the factory, such as
    `weight_decay`, `mask`, `mu_dtype` and `nu_dtype` for the jadam aliases.

    `default` is what unmatched leaves get: `None` (every leaf must match a
    rule), an optax transformation, or a factory called with no arguments for
    them and with the overrides for the dict rules (`jadam.adamw`, or
    `functools.partial(jadam.adamw, 1e-3, weight_decay=0.05)`). Dict rules need
    a factory.

    Errors (`ValueError`, at `init`, naming the leaves): a leaf that no rule
    matches while `default` is None; a leaf that two rules match (with or
    without a default: there is no precedence); a rule that matches no leaf
    (usually a misspelt path). The result is `optax.partition` over labels
    "rule_0", "rule_1", ... (in the order of `rules`) and "default"; its state
    holds one inner state per label.

    Example:
      >>> import functools, jax.numpy as jnp, jadam
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
      ...           "LayerNorm_0": {"scale": jnp.ones(2)}}
      >>> tx = jadam.param_groups(
      ...     {r".*/(bias|scale)": {"weight_decay": 0.0},
      ...      r"Dense_0/kernel": {"lr_scale": 0.1, "nu_dtype": jnp.bfloat16}},
      ...     default=functools.partial(jadam.adamw, 1e-3, weight_decay=0.05))
      >>> state = tx.init(params)
    """
    if not isinstance(rules, Mapping):
        raise ValueError(
            f"rules must be a dict from regular expressions to optimizers or overrides, "
            f"got {rules!r}."
        )
    if default is None or isinstance(default, optax.GradientTransformation):
        factory = None
    elif callable(default):
        factory = default
    else:
        raise ValueError(
            "default must be None, an optax GradientTransformation or a factory such as "
            f"jadam.adamw, got {default!r}."
        )

    compiled: list[tuple[str, re.Pattern[str]]] = []
    transforms: dict[str, optax.GradientTransformation] = {}
    for i, (pattern, target) in enumerate(rules.items()):
        if not isinstance(pattern, str):
            raise ValueError(f"param_groups rule keys must be strings, got {pattern!r}.")
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as err:
            raise ValueError(
                f"param_groups rule {pattern!r} is not a regular expression: {err}."
            ) from None
        if isinstance(target, optax.GradientTransformation):
            tx = target
        elif isinstance(target, Mapping):
            if factory is None:
                raise ValueError(
                    f"param_groups rule {pattern!r} gives overrides {dict(target)!r}, which need "
                    "an optimizer factory as default, e.g. default=jadam.adamw or "
                    "functools.partial(jadam.adamw, 1e-3, weight_decay=0.05)."
                )
            tx = _build_override(factory, pattern, target)
        else:
            raise ValueError(
                f"param_groups rule {pattern!r} must map to an optax GradientTransformation or "
                f"a dict of overrides, got {target!r}."
            )
        transforms[f"rule_{i}"] = tx
    if factory is not None:
        transforms[DEFAULT_LABEL] = _build_override(factory, "default", {})
    elif default is not None:
        transforms[DEFAULT_LABEL] = default

    def labels(tree: Any) -> Any:
        named = jax.tree_util.tree_flatten_with_path(tree)[0]
        unmatched, doubled, used = [], [], set()
        out = []
        for path, _ in named:
            name = path_name(path)
            hits = [i for i, (_, rx) in enumerate(compiled) if rx.fullmatch(name)]
            used.update(hits)
            if len(hits) > 1:
                doubled.append(f"{name!r} ({' and '.join(repr(compiled[i][0]) for i in hits)})")
            if not hits and default is None:
                unmatched.append(name)
            out.append(f"rule_{hits[0]}" if hits else DEFAULT_LABEL)
        if doubled:
            raise ValueError(
                "param_groups: these parameters match more than one rule: "
                f"{_listing(doubled, quote=False)}. Make the regular expressions exclusive."
            )
        if unmatched:
            raise ValueError(
                f"param_groups: no rule matches the parameters {_listing(unmatched)}. Add a rule "
                "or pass default= (an optimizer, or a factory such as jadam.adamw)."
            )
        unused = [pattern for i, (pattern, _) in enumerate(compiled) if i not in used]
        if unused and named:
            names = [path_name(path) for path, _ in named]
            raise ValueError(
                f"param_groups: the rules {_listing(unused)} match no parameter (each must "
                f"match a whole path, re.fullmatch). The paths are: {_listing(names)}."
            )
        treedef = jax.tree.structure(tree)
        return treedef.unflatten(out)

    return optax.partition(transforms, labels)


def decay_mask(params: Any) -> Any:
    """True on leaves of 2 or more dimensions (kernels, embeddings), False on the rest.

    Biases, norm scales and every other 1-D or scalar leaf are not decayed,
    the common practice for AdamW. A tree of booleans shaped like `params`
    (`None` leaves stay `None`), for the `mask=` of `jadam.adamw`, `nadamw`,
    `adamaxw`, `optax.adamw` and `optax.add_decayed_weights`; pass the function
    itself (`mask=jadam.decay_mask`) or its value on the params.
    """
    # `.ndim` first: it also answers for jax.ShapeDtypeStruct (an abstract init).
    return jax.tree.map(lambda p: (p.ndim if hasattr(p, "ndim") else np.ndim(p)) >= 2, params)
