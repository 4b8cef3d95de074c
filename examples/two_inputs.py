# python examples/two_inputs.py
"""A model combining two sub-networks on two inputs.

The wine data's 13 measurements are split into two groups (the first 6 and the last 7
columns) fed to two small towers whose outputs are concatenated and classified. Two
ways to write it: jadam's `Combine`, which can be saved and rebuilt from JSON, and a
Linen module of your own (any Flax module works, Linen or NNX; a tuple of inputs is
passed as positional arguments, a dict as keyword arguments).
"""

import flax.linen as nn
import jax.numpy as jnp

import jadam

ds = jadam.datasets.load("wine")
split = lambda x: (x[:, :6], x[:, 6:])  # noqa: E731
k = ds.n_outputs

# 1. jadam's Combine: branches + head, all MLPs.
combined = jadam.Combine(branches=(jadam.MLP((16,)), jadam.MLP((16,))), head=jadam.MLP((16, k)))


# 2. The same idea as a Linen module of your own.
class TwoTowers(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, chem, color):
        a = nn.relu(nn.Dense(16)(chem))
        b = nn.relu(nn.Dense(16)(color))
        return nn.Dense(self.classes)(nn.relu(nn.Dense(16)(jnp.concatenate([a, b], -1))))


for name, model in (("Combine", combined), ("TwoTowers", TwoTowers(k))):
    trainer = jadam.Trainer(model, "adam", loss=ds.loss, optimizer_options={"learning_rate": 3e-3})
    trainer.fit(split(ds.x_train), ds.y_train, epochs=40, batch_size=16, verbose=0,
                validation_data=(split(ds.x_val), ds.y_val))  # fmt: skip
    acc = trainer.evaluate(split(ds.x_test), ds.y_test)["accuracy"]
    print(f"{name:10s} test accuracy {acc:.3f}")
    assert acc >= 0.9

    # A dict of inputs works too: {"chem": ..., "color": ...} become keyword arguments.
    if name == "TwoTowers":
        t2 = jadam.Trainer(model, "adam", loss=ds.loss)
        as_dict = lambda x: {"chem": x[:, :6], "color": x[:, 6:]}  # noqa: E731
        t2.fit(as_dict(ds.x_train), ds.y_train, epochs=5, verbose=0)
        print("dict inputs: predict ->", t2.predict(as_dict(ds.x_test[:2])).round(2))
