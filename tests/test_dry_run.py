"""`--dry-run`, and every `launch.py train` and `launch.py tune` command the project documents: each one, as
written in README.md, the Makefile, cluster/*.yaml and cluster/kuberay/*.yaml, with only its data and storage
paths swapped for a sample, must plan its run without an error. Nothing starts: no Ray, no model, no loader."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, _need_fashion_mnist

from rn50_ray.cli import main

# A documented command: launch.py (or `launch.py --` after `ray submit`) then train or tune, not inside backticks.
COMMAND = re.compile(r"(?<!`)launch\.py (?:-- )?((?:train|tune)\b.*)")
PLAN_ROW = re.compile(r"^\s+(\d+) \|\s+([\d-]+) \|\s+(\d+) \|\s+(\d+) \|\s+(\d+)$", re.M)


@pytest.fixture(scope="module")
def big_sample(tmp_path_factory) -> Path:
    """4,100 train images (410 a class, 32 px): one global batch of every shipped recipe, up to FFCV's 4096."""
    from rn50_ray.data.sample import prepare_sample

    _need_fashion_mnist()
    return prepare_sample(tmp_path_factory.mktemp("data") / "big", train_per_class=410, val_per_class=2, size=32)


def _joined(lines: list[str]) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out


def _readme_lines() -> list[str]:
    """The lines of README.md's shell code blocks (fenced ```bash, ```sh or plain ```)."""
    lines, language = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            language = None if language is not None else line[3:].strip()
        elif language in ("bash", "sh", ""):
            lines.append(line)
    return _joined(lines)


def _yaml_lines(path: Path) -> list[str]:
    text = path.read_text()
    comments = _joined([line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip().startswith("#")])
    values: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            values.extend(node.splitlines())

    for doc in yaml.safe_load_all(text):
        walk(doc)
    return comments + values


def documented_commands() -> list[tuple[str, str]]:
    """(where, the command line after `launch.py`) for every documented train and tune command."""
    sources = {"README.md": _readme_lines(), "Makefile": (ROOT / "Makefile").read_text().splitlines()}
    for path in sorted((ROOT / "cluster").rglob("*.yaml")):
        sources[str(path.relative_to(ROOT))] = _yaml_lines(path)
    found = []
    for where, lines in sources.items():
        for line in lines:
            match = COMMAND.search(line)
            if match:
                found.append((where, match[1]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_the_commands_users_run():
    where = {w for w, _ in COMMANDS}
    assert {"README.md", "Makefile", "cluster/dgx.yaml", "cluster/aws-p4d.yaml", "cluster/kuberay/rayjob.yaml"} <= where
    assert any("--workers 8:32" in c for _, c in COMMANDS) and any("--workers 8:64" in c for _, c in COMMANDS)
    assert any(c.startswith("tune ") for _, c in COMMANDS)


def _as_dry_run(command: str, data: Path, storage: Path) -> list[str]:
    args = shlex.split(command, comments=True)
    for i, arg in enumerate(args[:-1]):
        if arg == "--data":
            args[i + 1] = str(data)
        elif arg == "--storage":
            args[i + 1] = str(storage)
    for flag, value in (("--data", data), ("--storage", storage)):  # a recipe's default paths: the sample's
        if flag not in args:
            args += [flag, str(value)]
    return [*args, "--dry-run"]


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_every_documented_command_plans_its_run(where, command, big_sample, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # as written: relative paths (tune_spaces/, data/sample) are the checkout's
    args = _as_dry_run(command, big_sample, tmp_path)
    if "--resume" in args:  # the search it resumes: what `tune` writes before its first trial
        name = args[args.index("--resume") + 1]
        search = tmp_path / name
        search.mkdir()
        (search / "space.yaml").write_text((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    status = main(args)
    out, err = capsys.readouterr()
    assert status == 0, f"{where}: launch.py {command}\n{err}"
    rows = PLAN_ROW.findall(out)
    assert rows, out
    workers = re.search(r"--workers (\S+)", command)
    if workers:
        lo, _, hi = workers[1].partition(":")
        assert [int(r[0]) for r in rows] == list(range(int(lo), int(hi or lo) + 1)), out


def test_the_headline_elastic_command_plans_all_25_world_sizes(big_sample, tmp_path, capsys):
    args = ["train", "--recipe", "rn50_90e", "--data", str(big_sample), "--workers", "8:32", "--storage", str(tmp_path)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {int(w): (images, int(micro), int(accum), int(steps)) for w, images, micro, accum, steps in PLAN_ROW.findall(out)}
    assert list(rows) == list(range(8, 33))
    assert rows[8] == ("256", 256, 1, 2) and rows[9] == ("227-228", 228, 1, 2) and rows[32] == ("64", 64, 1, 2)
    assert "peak LR 2.048" in out and "8 warmup epochs" in out and f"{big_sample}: 4100 train" in out
    assert not (tmp_path / "rn50-auto").exists() and not list(tmp_path.iterdir())  # nothing written


def test_a_dry_run_still_refuses_what_a_run_would(big_sample, tmp_path, capsys):
    base = ["train", "--recipe", "rn50_90e", "--storage", str(tmp_path), "--dry-run"]
    assert main([*base, "--data", str(big_sample), "--workers", "8:4000"]) == 2
    assert "scale.workers: expected at most batch.global_size (2048) workers, got 8:4000" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: data folder not found" in capsys.readouterr().err
