"""Where the model looks: Grad-CAM heatmaps for a trial's classifier, as overlays and as a report panel.

``gradcam(model, images)`` works on any classifier ``trainables.model.build_model``
makes or ``trainables.checkpoint.load_classifier`` loads, for every registered
backbone (the small CNNs included), whether the backbone is nested in the
classifier as a sub-model (``model.keras``) or split into a frozen part and a
top (a trial trained on cached features).

The method is Grad-CAM (Selvaraju et al., 2017): the gradient of the class's
*logit* (the input of the final softmax, so a confident prediction does not
saturate to zero gradient) with respect to the last convolutional feature map
``A``, averaged over its positions, weighs ``A``'s channels; their weighted
sum, clipped at zero, is the map, resized to the image (bilinear) and scaled to
[0, 1] per image.

**Which feature map.** Chosen generically, with no per-backbone table: walking
the classifier's layers in call order, nested sub-models included, the last
layer with a 4-D output before the first global pooling or ``Flatten`` (the
head's start), passing over trailing max/average pooling and dropout layers,
which only downsample or mask the last convolution's map. So ``cnn_s3`` uses its
second ``Conv2D``, ``cnn_s2`` its last ``BatchNormalization``, ``vgg16``
``block5_conv3`` (as in the Grad-CAM paper, at twice ``block5_pool``'s
resolution), ``resnet50`` ``conv5_block3_out``, ``densenet121`` its final
``relu``, MobileNetV2 ``out_relu`` and the EfficientNets their top activation
(``target_layer`` names it). A map is only as fine as that layer: 1/32 of the
image for the ImageNet backbones, 1/2 for ``cnn_s3``.

**How the gradient reaches it.** The sub-model that holds the layer (e.g. the
backbone) is rebuilt as a functional model over its own inputs with two outputs,
(feature map, its usual output); the levels above it (the classifier; a cached
trial's top) are chains of layers (``trainables.model``,
``trainables.checkpoint``) and are run layer by layer, the head's final softmax
``Dense`` as logits, all under one ``tf.GradientTape``. The softmax of the
logits is checked against the model's own output, so a structure this cannot
trace is an ``ExplainError``, never a wrong map.

``search.predict --explain DIR`` writes one overlay per image (``write_overlays``);
the report's test evaluation shows ``explain_section``'s panel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.document import Section
from analysis.errors import AnalysisError
from analysis.figures import Plot, figure, save
from analysis.files import PLOTS_DIR, evaluation_file, predictions_file
from analysis.reader import choose_trial, load_trial_model
from analysis.records import best_evaluated, final_evaluated
from analysis.splits import decode_split, image_names, image_paths

__all__ = ["ExplainError", "Target", "target_layer", "gradcam", "overlay", "overlay_names", "write_overlays",
           "explain_predictions", "explain_section", "PANEL_NAME"]

PANEL_NAME = "gradcam_test"  # report_files/<name>.png
PANEL_PER_GROUP = 3  # images per (class, correct | wrong) row of the panel
ALPHA = 0.4  # weight of the colour map in an overlay
COLORMAP = "jet"
OVERLAY_MIN_PX = 224  # search.predict --explain enlarges smaller overlays to this
_BATCH = 32
_CHECK_ATOL = 1e-3  # softmax(traced logits) vs the model's own probabilities


class ExplainError(ValueError):
    """The model cannot be explained (no convolutional feature map, or a structure that cannot be traced)."""


@dataclass(frozen=True)
class Target:
    """The feature map Grad-CAM weighs: ``path`` is the chain of layers from the classifier down to it."""

    path: tuple  # (nested model, ..., layer)
    built: dict = field(default_factory=dict, compare=False, repr=False)  # the (map, output) model, made once

    @property
    def layer(self):
        return self.path[-1]

    @property
    def name(self) -> str:
        """e.g. ``cnn_s3/conv2d_1``: the nested models' names and the layer's."""
        return "/".join(layer.name for layer in self.path)


# --------------------------------------------------------------------------
# the feature map
# --------------------------------------------------------------------------


def _walk(model, prefix: tuple = ()):
    """``(path, layer)`` for every layer of ``model`` in call order, nested models' layers in their place."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from _walk(layer, prefix + (layer,))
        else:
            yield prefix + (layer,), layer


def _rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # a layer called more than once, or never
        return None


def target_layer(model) -> Target:
    """The last 4-D feature map before the head's global pooling or ``Flatten`` (see the module docstring).

    In call order, the last layer with a 4-D output, passing over pooling and
    dropout layers; everything after it (the head) is 2-D, so it is the map the
    head pools. Squeeze-and-excitation blocks pool too, but feed a 4-D map again.
    """
    import keras

    passed_over = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
                   keras.layers.GlobalMaxPooling2D, keras.layers.Dropout, keras.layers.SpatialDropout2D)
    found = None
    for path, layer in _walk(model):
        if _rank(layer) == 4 and not isinstance(layer, passed_over):
            found = path
    if found is None:
        raise ExplainError(f"model {model.name!r} has no convolutional feature map (no layer with a 4-D output "
                           "before its pooling or Flatten); Grad-CAM needs one")
    return Target(found)


def _is_softmax_dense(layer) -> bool:
    import keras

    activation = getattr(layer, "activation", None)
    return isinstance(layer, keras.layers.Dense) and getattr(activation, "__name__", "") == "softmax"


def _logits(dense, h):
    """What the final softmax ``Dense`` computes before its softmax."""
    from keras import ops

    z = ops.matmul(ops.cast(h, dense.kernel.dtype), dense.kernel)
    return z + dense.bias if dense.use_bias else z


def _trace(model, x, path: tuple, *, last: bool, built: dict):
    """Run ``model`` on ``x``: ``(feature map or None, output)``; the target lies at ``path`` below ``model``.

    The model holding the target layer itself is rebuilt with the map as a
    second output (any graph works there); the levels above it, and the head
    below the map, are run layer by layer (chains in this project). With
    ``last``, the final softmax ``Dense`` gives logits.
    """
    import keras

    if len(path) == 1 and not last:
        key = (id(model), id(path[0]))
        if key not in built:
            built[key] = keras.Model(model.inputs, [path[0].output, *model.outputs])
        feature_map, out = built[key](x, training=False)
        return feature_map, out
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    h, feature_map = x, None
    for i, layer in enumerate(layers):
        final = last and i == len(layers) - 1
        if path and layer is path[0]:
            if len(path) == 1:
                h = feature_map = layer(h, training=False)
            else:
                feature_map, h = _trace(layer, h, path[1:], last=final, built=built)
        elif final and isinstance(layer, keras.Model):
            _, h = _trace(layer, h, (), last=True, built=built)
        elif final and _is_softmax_dense(layer):
            h = _logits(layer, h)
        else:
            h = layer(h, training=False)
    if path and feature_map is None:
        raise ExplainError(f"layer {path[0].name!r} is not called in the chain of {model.name!r}")
    return feature_map, h


def gradcam(model, images, class_index=None, *, batch_size: int = _BATCH, target: Target | None = None) -> np.ndarray:
    """Grad-CAM heatmaps, an (N, H, W) float32 array in [0, 1], one per image of ``images``.

    ``model``: a classifier of raw [0, 255] RGB to softmax probabilities (any
    registered backbone, nested or not). ``images``: (N, H, W, 3) in [0, 255].
    ``class_index``: the class each map is for; None = the predicted class
    (the argmax), an int = that class for every image, or one index per image.
    A map whose weighted sum is nowhere positive is all zeros.
    """
    import tensorflow as tf
    from keras import ops

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ExplainError(f"images must be (N, H, W, 3) RGB, got shape {images.shape}")
    n, height, width = images.shape[:3]
    classes = model.output_shape[-1]
    if class_index is None:
        wanted = None
    else:
        wanted = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,))
        if wanted.size and (wanted.min() < 0 or wanted.max() >= classes):
            raise ExplainError(f"class_index must be in [0, {classes}), got {sorted(set(wanted.tolist()))}")
    target = target or target_layer(model)
    out = np.zeros((n, height, width), dtype=np.float32)
    for start in range(0, n, batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size])
        with tf.GradientTape() as tape:
            feature_map, logits = _trace(model, x, target.path, last=True, built=target.built)
            logits = tf.cast(logits, tf.float32)
            chosen = tf.argmax(logits, axis=-1) if wanted is None else tf.constant(wanted[start:start + len(x)])
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        grads = tape.gradient(score, feature_map)
        if grads is None:
            raise ExplainError(f"no gradient reaches {target.name!r} from the output of {model.name!r}")
        if start == 0:  # the traced run must be the model's own computation
            probs = ops.convert_to_numpy(model(x, training=False)).astype(np.float32)
            traced = ops.convert_to_numpy(tf.nn.softmax(logits))
            if not np.allclose(traced, probs, atol=_CHECK_ATOL):
                raise ExplainError(f"cannot trace {model.name!r} through {target.name!r}: the traced output differs "
                                   f"from the model's by {np.abs(traced - probs).max():.3g}")
        feature_map = tf.cast(feature_map, tf.float32)
        weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2), keepdims=True)  # (b, 1, 1, C)
        cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1, keepdims=True))  # (b, h, w, 1)
        cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0].numpy()
        low = cam.min(axis=(1, 2), keepdims=True)
        span = cam.max(axis=(1, 2), keepdims=True) - low
        out[start:start + len(x)] = np.where(span > 1e-12, (cam - low) / np.maximum(span, 1e-12), 0.0)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------


def overlay(image, heatmap, *, alpha: float = ALPHA, cmap: str = COLORMAP) -> np.ndarray:
    """``image`` ((H, W, 3) RGB in [0, 255]) with ``heatmap`` ([0, 1], resized to it if needed) in colour
    (matplotlib's ``cmap``) blended over it with weight ``alpha``: an (H, W, 3) uint8 RGB array."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    heatmap = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heatmap.shape != image.shape[:2]:
        from PIL import Image

        resized = Image.fromarray(heatmap, mode="F").resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
        heatmap = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    colour = colormaps[cmap](heatmap)[..., :3] * 255.0
    return np.clip((1.0 - alpha) * image[..., :3] + alpha * colour, 0, 255).round().astype(np.uint8)


def overlay_names(relative: list[str]) -> list[str]:
    """One PNG file name per relative image path: ``sub/a b.jpg`` -> ``sub__a_b.jpg.png``; unique (``-2`` ...)."""
    names, used = [], set()
    for rel in relative:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(Path(rel).parts)).lstrip(".") or "image"
        name, k = f"{stem}.png", 1
        while name.lower() in used:  # case-insensitive file systems
            k += 1
            name = f"{stem}-{k}.png"
        used.add(name.lower())
        names.append(name)
    return names


def write_overlays(model, files: list[Path], images_dir: Path, size: int, class_index, out_dir: Path, *,
                   batch_size: int = _BATCH) -> list[Path]:
    """Decode ``files`` like training, Grad-CAM each for its ``class_index`` (one per file), and write one
    overlay PNG per file into ``out_dir``, named after its path relative to ``images_dir`` (``overlay_names``).

    An overlay shows what the model saw, the image at its input size, enlarged
    (bilinear) to at least ``OVERLAY_MIN_PX`` pixels so a small model's map is
    still visible.
    """
    import io

    from PIL import Image

    from search.storage import write_atomic
    from trainables.data import decode_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = overlay_names([Path(f).relative_to(images_dir).as_posix() for f in files])
    classes = np.asarray(class_index, dtype=np.int64)
    target = target_layer(model)
    written = []
    for start in range(0, len(files), 256):  # bounded memory on large folders
        chunk = files[start:start + 256]
        images = np.stack([decode_image(str(f), size) for f in chunk])
        maps = gradcam(model, images, classes[start:start + len(chunk)], batch_size=batch_size, target=target)
        for name, image, heatmap in zip(names[start:start + len(chunk)], images, maps):
            buffer = io.BytesIO()
            picture = Image.fromarray(overlay(image, heatmap))
            if size < OVERLAY_MIN_PX:
                picture = picture.resize((OVERLAY_MIN_PX, OVERLAY_MIN_PX), Image.Resampling.BILINEAR)
            picture.save(buffer, format="PNG")
            write_atomic(out_dir / name, buffer.getvalue())
            written.append(out_dir / name)
    return written


def explain_predictions(model, table, files: list[Path], images_dir: Path, size: int, class_names: list[str],
                        out_dir: Path, *, batch_size: int = _BATCH) -> list[Path]:
    """``search.predict --explain``: one overlay per readable image of ``table`` (the prediction CSV's rows, in
    ``files``' order), for the class in its ``predicted`` column (after calibration and threshold)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExplainError(f"--explain {str(out_dir)!r} is a file; give a folder for the overlays (created if missing)")
    predicted = table["predicted"].tolist()
    keep = [i for i, name in enumerate(predicted) if isinstance(name, str) and name in class_names]
    return write_overlays(model, [files[i] for i in keep], images_dir, size,
                          [class_names.index(predicted[i]) for i in keep], out_dir, batch_size=batch_size)


# --------------------------------------------------------------------------
# the report's panel
# --------------------------------------------------------------------------


def explain_section(run, evaluation: dict | None):
    """Section "Where the model looks": Grad-CAM overlays of the final model (its first member) on test images.

    ``run`` is ``analysis.tables.load_run(RUN_DIR)``; ``evaluation`` the newest
    record of ``test_evaluation.json`` (``analysis.plots.latest_evaluation``).
    One row per true class: up to ``PANEL_PER_GROUP`` correctly classified
    images, then up to as many wrongly classified ones, a fixed sample drawn
    with the study's ``seed``, each with the map for the class the model
    predicted. The panel is ``report_files/gradcam_test.png``.

    This is part of the final evaluation's reporting, and it reads test images
    only after that evaluation: without ``test_evaluation.json`` and its
    ``test_predictions.parquet`` (written by ``python -m analysis.evaluate``) it
    draws nothing and says so. It never starts an evaluation or logs a new use of
    the test split; it decodes only images that evaluation already scored (the
    final model's rows of ``test_predictions.parquet`` whose paths
    ``splits.parquet`` lists in the evaluated split), to show where the model
    looked on them. A lost checkpoint or image gives a note, not an error.
    """
    s = Section("Where the model looks")
    split = (evaluation or {}).get("split", "test")
    record = run.path / evaluation_file(split)
    predictions = run.path / predictions_file(split)
    entry = final_evaluated(evaluation) or best_evaluated(evaluation)
    if entry is None or not record.is_file() or not predictions.is_file():
        s.text(f"Not drawn: Grad-CAM overlays of {split} images come with the held-out evaluation "
               f"(`python -m analysis.evaluate RUN_DIR`), which writes {record.name} and "
               f"{predictions.name}; this panel never reads the {split} split by itself.")
        return s
    name = str(entry.get("label") or entry["trial_name"])
    try:
        _panel(s, run, name, list(entry.get("trials") or [name]), split, predictions)
    except AnalysisError:  # the PNG could not be written (a full disk): as for every plot of the report
        raise
    except Exception as exc:  # a lost checkpoint or image must not stop the report
        s.text(f"Not drawn: {type(exc).__name__}: {exc}")
    return s


def _panel(s, run, name: str, members: list[str], split: str, predictions: Path) -> None:
    import pandas as pd

    table = pd.read_parquet(predictions)
    table = table[table["trial"] == name]
    if run.splits is not None and "split" in run.splits.columns:  # images splits.parquet lists in that split
        listed = run.splits.loc[run.splits["split"] == split, "path"].astype(str).tolist()
        where = dict(zip(image_names(run.path, listed), image_paths(run.path, listed, run.data_dir)))  # as recorded -> on disk
        table = table[table["path"].astype(str).isin(where)].assign(path=lambda t: t["path"].astype(str).map(where))
    if table.empty:
        s.text(f"Not drawn: {predictions.name} holds no predictions of {name} on images of the {split} split.")
        return
    member = members[0]
    model, class_names, size = load_trial_model(choose_trial(run.path, run.study, member), run.path, run.study)
    seed = int(run.study.get("seed", 0) or 0)
    rng = np.random.default_rng(seed)
    labels = table["label"].astype(str)
    correct = table["predicted"].astype(str) == labels
    groups = {}  # (true class, correct) -> rows, in class order, correct first
    for cls in class_names:
        for right in (True, False):
            rows = table[(labels == cls) & (correct == right)]
            if len(rows) > PANEL_PER_GROUP:
                rows = rows.iloc[np.sort(rng.choice(len(rows), PANEL_PER_GROUP, replace=False))]
            groups[(cls, right)] = rows.reset_index(drop=True)
    shown = pd.concat(list(groups.values()), ignore_index=True)
    missing = [p for p in shown["path"].astype(str) if not Path(p).is_file()]
    if missing:
        s.text(f"Not drawn: {len(missing)} sampled {split} image(s) are no longer at their recorded paths "
               f"(e.g. {Path(missing[0]).name}).")
        return
    images = decode_split(shown, size)
    target = target_layer(model)
    maps = gradcam(model, images, [class_names.index(p) for p in shown["predicted"].astype(str)], target=target)

    k, cols = PANEL_PER_GROUP, 2 * PANEL_PER_GROUP
    fig = figure(figsize=(1.75 * cols + 0.6, 1.9 * len(class_names) + 0.5))
    i = 0
    for row, cls in enumerate(class_names):
        for right in (True, False):
            rows = groups[(cls, right)]
            for j in range(k):
                ax = fig.add_subplot(len(class_names), cols, row * cols + (0 if right else k) + j + 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0 and right:
                    ax.set_ylabel(f"true {cls}", fontsize=9)
                if j >= len(rows):
                    ax.set_axis_off()
                    if j == 0:
                        ax.text(0.5, 0.5, f"no {'correct' if right else 'wrong'}\nprediction", ha="center",
                                va="center", fontsize=8, color="grey", transform=ax.transAxes)
                    continue
                r = rows.iloc[j]
                ax.imshow(overlay(images[i], maps[i]))
                p = r.get(f"prob_{r['predicted']}")
                ax.set_title(f"{'' if right else 'wrong: '}{r['predicted']}"
                             + ("" if p is None or pd.isna(p) else f" {float(p):.2f}"),
                             fontsize=7, color="black" if right else "firebrick")
                i += 1
    of = f"{member}, the first member of {name}" if member != name else name
    fig.suptitle(f"Grad-CAM of {of} on {split} images; left: correctly classified, right: wrongly "
                 "(title: the final model's decision and its calibrated probability)", fontsize=9)
    path = save(fig, run.path / PLOTS_DIR, PANEL_NAME)
    counts = ", ".join(f"{cls}: {int((correct & (labels == cls)).sum())} correct, "
                       f"{int((~correct & (labels == cls)).sum())} wrong" for cls in class_names)
    s.text(f"Grad-CAM of {of}, at the decisions the final model ships with: the gradient of the predicted class's logit weighs the "
           f"channels of the feature map `{target.name}`. Images of the held-out {split} split that "
           f"`analysis.evaluate` already scored ({counts}); per true class up to {k} correctly and {k} wrongly "
           f"classified ones, drawn with the study's seed ({seed}), so the panel is the same in every report. Red "
           "marks what raised the score of the class the model predicted; a map on the background, a ruler or the "
           "frame rather than the lesion is a shortcut worth checking. This panel reads no new test data: it "
           "re-decodes images of the evaluation above.")
    s.plot(Plot(PANEL_NAME, f"Where the model looks ({split} images)", path,
                f"Grad-CAM at {target.name}; red = regions that raised the predicted class's score"))
