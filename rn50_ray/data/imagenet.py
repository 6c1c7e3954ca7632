"""`prepare-imagenet`: ImageNet (ILSVRC2012) from its official archives, or from Kaggle's layout, into the folders
`train` reads: OUT/train/<wnid>/, OUT/val/<wnid>/ and OUT/classes.json (wnid -> "tench, Tinca tinca").

Official archives: ILSVRC2012_img_train.tar (a tar of 1,000 per-class tars), ILSVRC2012_img_val.tar (50,000 flat
JPEGs) and ILSVRC2012_devkit_t12.tar.gz (meta.mat and the val ground truth), checked against their official
MD5s. Kaggle: ILSVRC/Data/CLS-LOC/{train/<wnid>,val}, LOC_val_solution.csv and LOC_synset_mapping.txt.

torchvision's datasets.imagenet parses the devkit (`parse_devkit_archive`, used here) and holds the MD5s. Its
train and val parsers are not: they extract the 1,000 class tars one at a time (hours for 140 GB) and cannot
resume. Here every class is extracted by a pool of processes into `train/.<wnid>.partial` and renamed to
`train/<wnid>` when whole, so a rerun after a kill skips the classes that are done and redoes the partial one;
val is written to `val.partial` and renamed when whole. The end checks the counts and the class sets, and
names the files that are not what their names say (ImageNet's train set has a PNG and CMYK JPEGs named .JPEG;
both decode to RGB in every backend).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from rn50_ray.data.folder import CLASS_NAMES_FILE
from rn50_ray.errors import DataError

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE = "ILSVRC/Data/CLS-LOC"
FULL = {"classes": 1000, "train": 1_281_167, "val": 50_000}


@dataclass(frozen=True)
class Source:
    kind: str  # official | kaggle
    root: Path


def find_source(root: str | os.PathLike) -> Source:
    root = Path(root)
    if (root / TRAIN_TAR).is_file() and (root / VAL_TAR).is_file() and (root / DEVKIT).is_file():
        return Source("official", root)
    if (root / KAGGLE / "train").is_dir() and (root / "LOC_val_solution.csv").is_file():
        return Source("kaggle", root)
    raise DataError(
        f"{root}: expected ImageNet's official archives ({TRAIN_TAR}, {VAL_TAR}, {DEVKIT}) or Kaggle's layout "
        f"({KAGGLE}/train, LOC_val_solution.csv)"
    )


class _Slice:
    """A read-only window [offset, offset + size) of an open file: one class tar inside the train tar."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.left = f, size
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    with tar.extractfile(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)


def _finish(partial: Path, final: Path) -> None:
    os.replace(partial, final)  # whole, or not there at all


def _class_from_archive(train_tar: str, wnid: str, offset: int, size: int, out: str) -> str:
    final, partial = Path(out) / wnid, Path(out) / f".{wnid}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with open(train_tar, "rb") as f, tarfile.open(fileobj=_Slice(f, offset, size), mode="r|") as inner:
        for member in inner:
            if member.isfile():
                _write_member(inner, member, partial / Path(member.name).name)
    _finish(partial, final)
    return wnid


def _class_from_folder(folder: str, wnid: str, out: str) -> str:
    """Kaggle's class folder: hard links where the filesystem allows (no second copy of 140 GB), else copies."""
    final, partial = Path(out) / wnid, Path(out) / f".{wnid}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        try:
            os.link(entry.path, partial / entry.name)
        except OSError:
            shutil.copy2(entry.path, partial / entry.name)
    _finish(partial, final)
    return wnid


def _train_jobs(source: Source) -> list[tuple[Callable, tuple]]:
    """(function, arguments) per class; the wnid is each job's second argument."""
    if source.kind == "kaggle":
        base = source.root / KAGGLE / "train"
        return [(_class_from_folder, (str(base / w), w)) for w in sorted(os.listdir(base)) if (base / w).is_dir()]
    jobs = []
    with tarfile.open(source.root / TRAIN_TAR) as outer:  # headers only: the class tars' data is skipped
        for m in outer:
            if m.isfile() and m.name.endswith(".tar"):
                jobs.append((_class_from_archive, (str(source.root / TRAIN_TAR), Path(m.name).stem, m.offset_data, m.size)))
    return sorted(jobs, key=lambda job: job[1][1])  # by wnid


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="class" if what == "train" else "img", file=sys.stderr, mininterval=1)


def extract_train(source: Source, out: Path, workers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs = _train_jobs(source)
    todo = [(fn, args) for fn, args in jobs if not (out / args[1]).is_dir()]
    done = len(jobs) - len(todo)
    print(f"train: {len(jobs)} classes, {done} already complete, {len(todo)} to extract with {workers} process(es)", flush=True)
    with _progress(len(jobs), "train") as bar:
        bar.update(done)
        if workers <= 1:
            for fn, args in todo:
                print(f"train: {fn(*args, str(out))}", flush=True)
                bar.update()
            return
        with ProcessPoolExecutor(workers) as pool:
            for future in as_completed([pool.submit(fn, *args, str(out)) for fn, args in todo]):
                print(f"train: {future.result()}", flush=True)
                bar.update()


def _val_labels(source: Source, work: Path, verify: bool) -> tuple[dict[str, str], dict[str, str]]:
    """({val file name: wnid}, {wnid: readable name})."""
    if source.kind == "kaggle":
        with open(source.root / "LOC_val_solution.csv") as f:
            labels = {f"{row['ImageId']}.JPEG": row["PredictionString"].split()[0] for row in csv.DictReader(f)}
        names = {}
        mapping = source.root / "LOC_synset_mapping.txt"
        if mapping.is_file():
            for line in mapping.read_text().splitlines():
                wnid, _, name = line.partition(" ")
                names[wnid] = name
        return labels, names
    import torchvision.datasets.imagenet as tv

    (work / DEVKIT).symlink_to((source.root / DEVKIT).resolve())
    if verify:
        tv.parse_devkit_archive(str(work))
    else:  # torchvision has no switch for its MD5 check, whose sums are the full release's (--no-md5)
        check, tv._verify_archive = tv._verify_archive, lambda *_: None
        try:
            tv.parse_devkit_archive(str(work))
        finally:
            tv._verify_archive = check
    wnid_to_classes, val_wnids = tv.load_meta_file(str(work))
    with tarfile.open(source.root / VAL_TAR) as tar:
        files = sorted(Path(m.name).name for m in tar if m.isfile())
    if len(files) != len(val_wnids):
        raise DataError(f"{source.root / VAL_TAR}: {len(files)} images, but the devkit labels {len(val_wnids)}")
    return dict(zip(files, val_wnids, strict=True)), {w: ", ".join(c) for w, c in wnid_to_classes.items()}


def extract_val(source: Source, out: Path, labels: dict[str, str]) -> None:
    if out.is_dir():
        print("val: already complete", flush=True)
        return
    partial = out.with_name(f"{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for wnid in set(labels.values()):
        (partial / wnid).mkdir(parents=True)
    with _progress(len(labels), "val") as bar:
        for name, read in _val_images(source):
            if name in labels:
                (partial / labels[name] / name).write_bytes(read())
                bar.update()
    _finish(partial, out)


def _val_images(source: Source) -> Iterator[tuple[str, Callable[[], bytes]]]:
    if source.kind == "kaggle":
        for entry in sorted(os.scandir(source.root / KAGGLE / "val"), key=lambda e: e.name):
            yield entry.name, Path(entry.path).read_bytes
        return
    with tarfile.open(source.root / VAL_TAR, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member).read()
                yield Path(member.name).name, lambda data=data: data


def check_md5(source: Source) -> None:
    from torchvision.datasets.imagenet import ARCHIVE_META
    from torchvision.datasets.utils import check_integrity

    names = {VAL_TAR: "val", TRAIN_TAR: "train"}  # the devkit's is checked by torchvision's own parser
    print(f"checking the MD5 of {', '.join(names)} (minutes for 140 GB; --no-md5 skips it)", flush=True)
    with ThreadPoolExecutor(len(names)) as pool:
        checks = {f: pool.submit(check_integrity, str(source.root / f), ARCHIVE_META[k][1]) for f, k in names.items()}
    bad = [f for f, ok in checks.items() if not ok.result()]
    if bad:
        raise DataError(f"{source.root / bad[0]}: MD5 differs from the official archive's: a corrupt or partial download")


def _odd_kind(path: str, fmt: str, channels: int) -> str | None:
    """What a `.JPEG` really is, when it is not a plain RGB or greyscale JPEG."""
    if not path.lower().endswith((".jpeg", ".jpg")):
        return None
    if fmt != "JPEG":
        return f"a {fmt}" if fmt else "unreadable"
    return "a CMYK JPEG" if channels == 4 else None


def verify(out: Path, expect_full: bool) -> str:
    """Check the counts, and write the folder's manifest (its one scan and screen) for every later run."""
    from rn50_ray.data.manifest import build, locations, write_manifest

    table = build(str(out), log=lambda line: print(line, file=sys.stderr, flush=True))
    meta = table.schema.metadata
    split = table.column("split").to_pylist()
    counts = {
        "classes": len(json.loads(meta[b"rn50.manifest"])["classes"]),
        "train": split.count("train"),
        "val": split.count("val"),
    }
    if expect_full and counts != FULL:
        raise DataError(
            f"{out}: expected ImageNet's {FULL['classes']} classes, {FULL['train']} train and {FULL['val']} val images, "
            f"got {counts['classes']}, {counts['train']} and {counts['val']} (pass --subset for a part of it)"
        )
    rows = zip(
        table.column("path").to_pylist(), table.column("format").to_pylist(), table.column("channels").to_pylist(), strict=True
    )
    odd = {p: why for p, fmt, ch in rows if (why := _odd_kind(p, fmt, ch))}
    where = write_manifest(table, locations(str(out), "")[:1])
    lines = [f"{out}: {counts['classes']} classes, {counts['train']} train / {counts['val']} val images (manifest: {where})"]
    kinds = Counter(odd.values())
    for kind, n in sorted(kinds.items()):
        examples = ", ".join(Path(p).name for p, why in odd.items() if why == kind)[:200]
        lines.append(f"  {n} file(s) named .JPEG that are {kind}: {examples} (decoded to RGB by every backend)")
    return "\n".join(lines)


def prepare_imagenet(
    source_dir: str, out_dir: str, *, workers: int = 1, verify_md5: bool = True, expect_full: bool = True
) -> str:
    source, out = find_source(source_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if verify_md5 and source.kind == "official":
        check_md5(source)
    with tempfile.TemporaryDirectory(prefix="rn50-imagenet-") as work:
        labels, names = _val_labels(source, Path(work), verify_md5)
    extract_train(source, out / "train", workers)
    extract_val(source, out / "val", labels)
    (out / CLASS_NAMES_FILE).write_text(json.dumps(names, indent=1, sort_keys=True))
    report = verify(out, expect_full)
    return f"prepare-imagenet: {report}\nclass names: {out / CLASS_NAMES_FILE}"
