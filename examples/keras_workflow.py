# python examples/keras_workflow.py
"""The classic Keras tutorial, rewritten with jadam.

Keras:                                            jadam:
  model = Sequential([Dense(32, 'relu'),            model = jadam.MLP((32, 1))
                      Dense(1, 'sigmoid')])
  model.compile(optimizer='adam',                   trainer = jadam.Trainer(model, 'adam',
      loss='binary_crossentropy',                       loss='binary_crossentropy',
      metrics=['accuracy'])                             metrics=['accuracy'])
  model.fit(X, y, batch_size=32, epochs=50,         trainer.fit(X, y, batch_size=32, epochs=50,
      validation_data=(Xv, yv))                         validation_data=(Xv, yv))

The last layer returns logits; the loss applies the sigmoid (numerically stable) and
`predict` returns probabilities, as Keras' sigmoid output would.
"""

import os
import tempfile

import numpy as np

import jadam

# Data: scikit-learn's bundled breast cancer set, split 65/15/20 and standardized on
# the training split only (nothing is downloaded).
ds = jadam.datasets.load("breast_cancer")

model = jadam.MLP(features=(32, 1))  # Dense(32, relu) -> Dense(1) logits
trainer = jadam.Trainer(model, "adam", loss="binary_crossentropy", metrics=["accuracy"])
trainer.build(ds.x_train)
trainer.summary()

history = trainer.fit(
    ds.x_train, ds.y_train, batch_size=32, epochs=50,
    validation_data=(ds.x_val, ds.y_val), verbose=2,
)  # fmt: skip
results = trainer.evaluate(ds.x_test, ds.y_test)
print(f"test loss {results['loss']:.4f}, test accuracy {results['accuracy']:.4f}")

with tempfile.TemporaryDirectory() as tmp:
    # Save, load back, and classify new inputs.
    trainer.save(os.path.join(tmp, "model"))
    restored = jadam.Trainer.load(os.path.join(tmp, "model"))
    probs = restored.predict(ds.x_test[:5])[:, 0]
    for p, truth in zip(probs, ds.y_test[:5], strict=True):
        guess = ds.classes[int(p > 0.5)]
        print(f"P({ds.classes[1]}) = {p:.3f}  ->  {guess:9s} (true: {ds.classes[truth]})")
    history.plot(os.path.join(tmp, "curves.png"))

assert results["accuracy"] >= 0.95
assert np.array_equal(restored.predict(ds.x_test), trainer.predict(ds.x_test))
