"""``genlab-data``: fetch, validate, export and version data sets.

```
genlab-data list                                   known data sets
genlab-data fetch modelnet40 [--archive F | --url U] [--sha256 H] [--force]
genlab-data clear-cache [NAME]                     delete downloaded archives
genlab-data validate data=mesh_folder data.dataset.root=... [more Hydra overrides]
genlab-data export-synthetic --out data/raw/synthetic_shapes [--num-per-class N ...] [--styles]
genlab-data params [overrides]                     compose conf/pipeline.yaml into params.yaml
genlab-data pull                                   the pipeline's raw data: dvc pull, else fetch/generate
```
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def _config_dir() -> Path:
    return Path(os.environ.get("GENLAB_CONFIG_DIR", Path.cwd() / "conf")).resolve()


def compose_train_config(overrides: Sequence[str], output_dir: Path | None = None):
    """The training config (``conf/train.yaml`` + overrides) with Hydra's runtime fields set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    output_dir = output_dir or Path(tempfile.mkdtemp(prefix="genlab-validate-"))
    with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(Path.cwd())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def validate(overrides: Sequence[str], report_path: Path | None = None) -> int:
    """Build ``cfg.data`` and print its validation report; exit status 1 when files are bad."""
    from hydra.utils import instantiate

    cfg = compose_train_config(overrides)
    datamodule = instantiate(cfg.data)
    check = getattr(datamodule, "validate", None)
    if check is None:
        print(f"{type(datamodule).__name__} has no validate()", file=sys.stderr)
        return 2
    report = check()
    print(report.summary(limit=10_000))
    if report_path is not None:
        report.write_json(report_path)
        print(f"report written to {report_path}")
    return 0 if report.ok else 1


def _fetch(args: argparse.Namespace) -> int:
    from genlab.data.fetch import (
        FetchError,
        clear_cache,
        default_cache_dir,
        default_data_dir,
        fetch,
    )

    cache_dir = args.cache_dir or default_cache_dir()
    if args.command == "clear-cache":
        freed = clear_cache(cache_dir, args.name)
        print(f"freed {freed / 2**20:.1f} MiB from {cache_dir / 'downloads'}")
        return 0
    try:
        path = fetch(
            args.name,
            args.data_dir or default_data_dir(),
            archive=args.archive,
            url=args.url,
            sha256=args.sha256,
            force=args.force,
            cache_dir=cache_dir,
        )
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from genlab.data.synthetic_export import export_objaverse_layout

    path = export_objaverse_layout(
        args.out,
        classes=args.classes,
        num_per_class=args.num_per_class,
        voxel_size=args.voxel_size,
        seed=args.seed,
        num_views=args.num_views,
        image_size=args.image_size,
        num_points=args.num_points,
        overwrite=args.overwrite,
        styles=args.styles,
    )
    print(path)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from genlab.data.data_manager import DataManagerError
    from genlab.pipeline import ensure_raw_data, load_params

    try:
        print(ensure_raw_data(load_params(args.params)))
    except DataManagerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genlab-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="the known data sets")

    fetch = sub.add_parser("fetch", help="download (or unpack a local archive of) a data set")
    fetch.add_argument("name", help="data set name (see `list`), or any name with --archive/--url")
    fetch.add_argument("--archive", help="a local archive (path or file:// URL) to use instead")
    fetch.add_argument("--url", help="download from this URL instead of the known one")
    fetch.add_argument("--sha256", help="expected sha256 of the archive")
    fetch.add_argument("--force", action="store_true", help="extract again even if present")
    fetch.add_argument("--data-dir", type=Path, default=None, help="default: ./data")
    fetch.add_argument("--cache-dir", type=Path, default=None, help="default: $GENLAB_CACHE_DIR")

    clear = sub.add_parser("clear-cache", help="delete downloaded archives (all, or one data set)")
    clear.add_argument("name", nargs="?")
    clear.add_argument("--cache-dir", type=Path, default=None)

    check = sub.add_parser("validate", help="check every file of a data config")
    check.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=mesh_folder")
    check.add_argument("--report", type=Path, default=None, help="also write the report as JSON")

    export = sub.add_parser(
        "export-synthetic", help="write the synthetic shapes (Objaverse layout)"
    )
    export.add_argument("--out", type=Path, required=True)
    export.add_argument(
        "--classes", nargs="+", default=["sphere", "box", "cylinder", "cone", "torus"]
    )
    export.add_argument("--num-per-class", type=int, default=12)
    export.add_argument("--voxel-size", type=int, default=32)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--num-views", type=int, default=8)
    export.add_argument("--image-size", type=int, default=128)
    export.add_argument("--num-points", type=int, default=4096)
    export.add_argument("--overwrite", action="store_true")
    export.add_argument(
        "--styles", action="store_true", help="add a style column to captions.csv (Turkish)"
    )

    params = sub.add_parser("params", help="compose conf/pipeline.yaml into params.yaml")
    params.add_argument("overrides", nargs="*")
    params.add_argument("--out", type=Path, default=Path("params.yaml"))

    pull = sub.add_parser("pull", help="get the pipeline's raw data (dvc pull, else fetch)")
    pull.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    if args.command == "list":
        from genlab.data.fetch import KNOWN_DATASETS

        for source in KNOWN_DATASETS.values():
            print(f"{source.name:16s} {source.description} ({source.homepage})")
        print(f"{'synthetic_shapes':16s} generated here: `genlab-data export-synthetic`")
        return 0
    if args.command in ("fetch", "clear-cache"):
        return _fetch(args)
    if args.command == "validate":
        return validate(args.overrides, args.report)
    if args.command == "export-synthetic":
        return _export(args)
    if args.command == "params":
        from genlab.pipeline import compose_params

        print(compose_params(args.out, args.overrides, _config_dir()))
        return 0
    return _pull(args)


if __name__ == "__main__":
    sys.exit(main())
