"""Per-class val top-1 from a confusion matrix: which classes are bad, by name."""

from __future__ import annotations

import csv
import io
from typing import Any

PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.csv"


def per_class_rows(confusion: list[list[int]], classes: tuple[str, ...], names: dict[str, str]) -> list[dict[str, Any]]:
    """One row per class: its folder, readable name, val images and top-1 (%), in class order. confusion[i][j]
    counts images of class i predicted as j."""
    rows = []
    for i, row in enumerate(confusion):
        images = sum(row)
        rows.append(
            {"class": classes[i], "name": names.get(classes[i], classes[i]), "images": images,
             "top1": 100.0 * row[i] / images if images else float("nan")}
        )  # fmt: skip
    return rows


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "name", "images", "top1"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rows_from_csv(text: str) -> list[dict[str, Any]]:
    return [{**r, "images": int(r["images"]), "top1": float(r["top1"])} for r in csv.DictReader(io.StringIO(text))]


def matrix_to_csv(confusion: list[list[int]]) -> str:
    return "".join(",".join(map(str, row)) + "\n" for row in confusion)


def matrix_from_csv(text: str) -> list[list[int]]:
    return [[int(v) for v in line.split(",")] for line in text.splitlines() if line]


def worst(rows: list[dict[str, Any]], n: int = 5) -> str:
    """'shirt 31.0%, pullover 45.0%, ...': the n classes with the lowest val top-1."""
    ranked = sorted((r for r in rows if r["images"]), key=lambda r: r["top1"])[:n]
    return ", ".join(f"{r['name']} {r['top1']:.1f}%" for r in ranked)
