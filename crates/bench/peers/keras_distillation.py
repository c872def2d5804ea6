"""The distillation stage's recipe in Keras (tf_keras), the peer a TF-MOT user would run:
the keras.io `Distiller` on the same teacher weights, student architecture, subset size,
schedule and seeds as the experiment's distillation stage.

    TF_USE_LEGACY_KERAS=1 ~/.cache/tch-mot/peers-*/venv/bin/python \\
        crates/bench/peers/keras_distillation.py \\
        --teacher <run>/teacher_checkpoint.safetensors --data-dir datasets/mnist

(the peers' Python is the one `cargo xtask bench runtime` installs). For each seed: a
stratified 600 images per class, the student_cnn built with Keras's initialisers, trained
from scratch and distilled from the same initial weights in the same batch order (Adam
with cosine decay from 3e-3, batch 64, 5 epochs, T = 10, alpha = 0.1). `--keras-teacher`
also trains a teacher_cnn in Keras (full training set, 5 epochs, batch 128) and distils
from it. Prints one JSON line: per seed and teacher, the test accuracy.
"""

import argparse
import gzip
import json
import os
import struct
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

MEAN, STD = 0.1307, 0.3081
BN_EPSILON = 1e-5  # the spec's batch norm (PyTorch's); momentum stays Keras's 0.99
EPOCHS, BATCH, LEARNING_RATE, TEMPERATURE, ALPHA = 5, 64, 3e-3, 10.0, 0.1
PER_CLASS = 600


def idx(path):
    data = gzip.open(path).read()
    if struct.unpack(">I", data[:4])[0] == 2049:
        return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)


def mnist(folder):
    def images(name):
        x = idx(os.path.join(folder, name)).astype(np.float32) / 255.0
        return ((x - MEAN) / STD)[..., None]  # NHWC

    return (images("train-images-idx3-ubyte.gz"), idx(os.path.join(folder, "train-labels-idx1-ubyte.gz")),
            images("t10k-images-idx3-ubyte.gz"), idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")))


def safetensors(path):
    """Every tensor of a safetensors file as a numpy array (F32 only: a checkpoint)."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {info['dtype']}, a checkpoint holds F32")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + start:8 + n + end], "<f4").reshape(info["shape"])
    return out


def teacher_cnn():
    """NetworkSpec::teacher_cnn, layer for layer."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, name="c0"), layers.BatchNormalization(epsilon=BN_EPSILON, name="bn1"),
        layers.ReLU(), layers.MaxPooling2D(2, 2),
        layers.Conv2D(64, 3, name="c4"), layers.BatchNormalization(epsilon=BN_EPSILON, name="bn5"),
        layers.ReLU(), layers.MaxPooling2D(2, 2),
        layers.Flatten(), layers.Dropout(0.1),
        layers.Dense(128, name="d10"), layers.ReLU(), layers.Dropout(0.25),
        layers.Dense(10, name="d13"),
    ])


def student_cnn():
    """NetworkSpec::student_cnn (14,458 parameters)."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(8, 3), layers.BatchNormalization(epsilon=BN_EPSILON), layers.ReLU(),
        layers.MaxPooling2D(2, 2),
        layers.Conv2D(16, 3), layers.BatchNormalization(epsilon=BN_EPSILON), layers.ReLU(),
        layers.MaxPooling2D(2, 2),
        layers.Flatten(), layers.Dense(32), layers.ReLU(), layers.Dense(10),
    ])


def converted_teacher(path):
    """The experiment's teacher checkpoint (PyTorch layouts, NCHW flatten) as a Keras model."""
    w = safetensors(path)
    model = teacher_cnn()
    conv = lambda name: np.transpose(w[name], (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    model.get_layer("c0").set_weights([conv("0.weight"), w["0.bias"]])
    model.get_layer("c4").set_weights([conv("4.weight"), w["4.bias"]])
    for i in ("1", "5"):
        model.get_layer("bn" + i).set_weights(
            [w[i + ".weight"], w[i + ".bias"], w[i + ".running_mean"], w[i + ".running_var"]])
    # PyTorch flattens (c, h, w), Keras (h, w, c).
    dense = w["10.weight"].reshape(128, 64, 5, 5).transpose(2, 3, 1, 0).reshape(1600, 128)
    model.get_layer("d10").set_weights([dense, w["10.bias"]])
    model.get_layer("d13").set_weights([w["13.weight"].T, w["13.bias"]])
    return model


def keras_teacher(x, y, seed):
    keras.utils.set_random_seed(seed)
    model = teacher_cnn()
    steps = int(np.ceil(len(x) / 128)) * EPOCHS
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=128, epochs=EPOCHS, shuffle=True, verbose=0)
    return model


def accuracy(model, x, y):
    logits = np.concatenate([model(x[i:i + 1000], training=False).numpy() for i in range(0, len(x), 1000)])
    return float((logits.argmax(1) == y).mean())


class Distiller(keras.Model):
    """The keras.io example's `Distiller.train_step`; without a teacher, plain cross-entropy."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.kl = keras.losses.KLDivergence()

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            student = self.student(x, training=True)
            loss = self.cross_entropy(y, student)
            if self.teacher is not None:
                teacher = self.teacher(x, training=False)
                soft = self.kl(tf.nn.softmax(teacher / TEMPERATURE, axis=1),
                               tf.nn.softmax(student / TEMPERATURE, axis=1)) * TEMPERATURE ** 2
                loss = ALPHA * loss + (1 - ALPHA) * soft
        grads = tape.gradient(loss, self.student.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.student.trainable_variables))
        return loss


def train(initial, batches, teacher, x_test, y_test):
    student = student_cnn()
    student.set_weights(initial)
    model = Distiller(student, teacher)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(LEARNING_RATE, len(batches))))
    step = tf.function(model.train_step, reduce_retracing=True)
    for xb, yb in batches:
        step((tf.constant(xb), tf.constant(yb)))
    return accuracy(student, x_test, y_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the experiment's teacher_checkpoint.safetensors")
    parser.add_argument("--data-dir", required=True, help="the four MNIST IDX gzip files")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: its choice)")
    parser.add_argument("--keras-teacher", action="store_true", help="also distil from a teacher trained in Keras")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.experimental.enable_op_determinism()
    started = time.time()
    x_train, y_train, x_test, y_test = mnist(args.data_dir)
    teachers = {"ours": converted_teacher(args.teacher)}
    if args.keras_teacher:
        teachers["keras"] = keras_teacher(x_train, y_train, 42)
    result = {"tensorflow": tf.__version__,
              "teachers": {name: accuracy(t, x_test, y_test) for name, t in teachers.items()}, "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        subset = np.sort(np.concatenate(
            [rng.choice(np.flatnonzero(y_train == c), PER_CLASS, replace=False) for c in range(10)]))
        x, y = x_train[subset], y_train[subset].astype(np.int32)
        batches, rng = [], np.random.default_rng(seed)
        for _ in range(EPOCHS):
            order = rng.permutation(len(x))
            batches += [(x[order[i:i + BATCH]], y[order[i:i + BATCH]]) for i in range(0, len(x), BATCH)]
        keras.utils.set_random_seed(seed)
        initial = student_cnn().get_weights()
        runs = {"scratch": train(initial, batches, None, x_test, y_test)}
        for name, teacher in teachers.items():
            runs["distilled_" + name] = train(initial, batches, teacher, x_test, y_test)
        result["seeds"][seed] = runs
    result["seconds"] = time.time() - started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
