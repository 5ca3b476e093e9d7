"""Output folders: a user's files are never replaced or deleted, results arrive whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_vgg import fileio
from lightning_vgg.cli import main
from lightning_vgg.errors import UserError
from lightning_vgg.fileio import MANIFEST, check_output_dir, output_dir, read_manifest
from lightning_vgg.models.module import VGGClassifier


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A width-1/16, 32 px network saved the way ``explain`` reads it."""
    torch.manual_seed(seed)
    model = VGGClassifier(width=1 / 16, input_size=32, hidden=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (``None`` for folders)."""
    return {
        p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def write(stage: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        fileio.write_text(stage / rel, text)


def run(out: Path, files: dict[str, str], overwrite: bool = False, command: str = "t") -> None:
    """What a command does: check the folder, then build and move in its files."""
    check_output_dir(out, (), overwrite, command)
    with output_dir(out, command) as stage:
        write(stage, files)


@pytest.fixture
def umask_027(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    old = os.umask(0o027)
    monkeypatch.setattr(fileio, "_UMASK", 0o027)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- fileio


@pytest.mark.usefixtures("umask_027")
def test_new_and_existing_folders_follow_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "new"
    run(out, {"top.json": "1", "sub/deep/a.txt": "a"})
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o750)
    run(existing, {"top.json": "1", "sub/deep/a.txt": "a"})
    for folder in (out, existing):
        for p in [folder, folder / "sub", folder / "sub" / "deep"]:
            assert stat.S_IMODE(p.stat().st_mode) == 0o750, p
        for p in [folder / "top.json", folder / "sub/deep/a.txt", folder / MANIFEST]:
            assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert not list(tmp_path.glob(".*partial")), "no staging folder left"


def test_manifest_lists_what_was_written(tmp_path: Path) -> None:
    out = tmp_path / "o"
    run(out, {"top.json": "1", "sub/a.txt": "a"}, command="explain")
    m = read_manifest(out)
    assert m is not None
    assert m["tool"] == "lightning-vgg" and m["command"] == "explain" and m["complete"] is True
    assert m["files"] == ["sub/a.txt", "top.json"]


def test_rerun_replaces_only_manifest_files_and_keeps_foreign_ones(tmp_path: Path) -> None:
    out = tmp_path / "o"
    run(out, {"top.json": "old", "a.txt": "old", "sub/b.txt": "old", "gone/c.txt": "old"})
    run(out, {"top.json": "new", "sub/b.txt": "new"})  # its own folder: no flag needed
    assert (out / "top.json").read_text() == "new" and (out / "sub/b.txt").read_text() == "new"
    assert not (out / "a.txt").exists() and not (out / "gone").exists()

    (out / "notes.txt").write_text("mine")
    (out / "sub" / "mine.txt").write_text("mine too")
    with pytest.raises(UserError, match="--overwrite") as exc:
        check_output_dir(out, (), overwrite=False, command="t")
    assert str(out) in str(exc.value) and "notes.txt" in str(exc.value)
    run(out, {"top.json": "newer", "sub/c.txt": "c"}, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "sub" / "mine.txt").read_text() == "mine too"
    assert (out / "top.json").read_text() == "newer" and not (out / "sub/b.txt").exists()
    assert read_manifest(out)["files"] == ["sub/c.txt", "top.json"]


def test_foreign_folder_is_refused_and_overwrite_never_replaces_its_files(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    (out / "2019").mkdir(parents=True)
    (out / "2019" / "cat.jpg").write_bytes(b"jpeg")
    (out / "top.json").write_text("a user's file")
    before = snapshot(out)
    with pytest.raises(UserError) as exc:
        run(out, {"x.txt": "x"})
    msg = str(exc.value)
    assert str(out) in msg and "--overwrite" in msg and MANIFEST in msg
    assert snapshot(out) == before

    # With the flag: refused up front when a known file of the command is there ...
    with pytest.raises(UserError, match=r"top\.json"):
        check_output_dir(out, (), overwrite=True, writes=["top.json"])
    # ... and at the move for any other clash, before anything moved.
    with pytest.raises(UserError, match=r"top\.json"):
        run(out, {"new.txt": "n", "top.json": "ours"}, overwrite=True)
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".*partial"))

    # Without a clash the results are added beside the user's files.
    run(out, {"2019/ours.txt": "o", "result.json": "r"}, overwrite=True)
    assert (out / "2019" / "cat.jpg").read_bytes() == b"jpeg"
    assert (out / "top.json").read_text() == "a user's file"
    assert read_manifest(out)["files"] == ["2019/ours.txt", "result.json"]


def test_another_commands_results_need_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o"
    run(out, {"explain.json": "{}"}, command="explain")
    with pytest.raises(UserError, match=r"lightning-vgg explain.*--overwrite"):
        check_output_dir(out, (), command="compare")
    run(out, {"report.html": "r"}, overwrite=True, command="compare")
    assert not (out / "explain.json").exists() and (out / "report.html").is_file()


def test_refused_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    ckpt = tiny_checkpoint(work / "runs" / "x" / "version_0" / "checkpoints" / "best.ckpt")
    run_dir = ckpt.parent.parent
    monkeypatch.chdir(work)
    protected = [ckpt, run_dir]
    for out, words in [
        (".", "current directory"),
        ("", "current directory"),
        (str(work), "current directory"),
        ("..", "current directory"),
        ("/", "filesystem root"),
        (str(home), "home directory"),
        (str(run_dir), f"it is {run_dir}"),
        ("runs", "it holds"),
        ("runs/x/version_0/checkpoints", "it holds"),
        (str(ckpt), "it is"),
    ]:
        with pytest.raises(UserError, match="refusing to write into") as exc:
            check_output_dir(out, protected, overwrite=True)
        assert words in str(exc.value), (out, str(exc.value))
    (work / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_output_dir("file.txt", protected)
    check_output_dir("runs/x/version_0/explain", protected)  # inside is fine
    check_output_dir(str(home / "results"), protected)


def test_a_file_added_during_the_run_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "o"
    run(out, {"top.json": "1"})
    check_output_dir(out, (), command="t")
    with output_dir(out, "t") as stage:
        write(stage, {"top.json": "2"})
        (out / ".DS_Store").write_text("a file manager's")
    assert (out / "top.json").read_text() == "2"
    assert (out / ".DS_Store").read_text() == "a file manager's"


def test_interrupted_move_is_marked_incomplete_and_a_rerun_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    run(out, {"top.json": "old", "a/1.txt": "old", "a/2.txt": "old"})
    (out / "mine.txt").write_text("mine")

    # fails inside the block: nothing changes
    with pytest.raises(UserError, match="boom"), output_dir(out, "t") as stage:
        write(stage, {"top.json": "new"})
        raise UserError("boom")
    assert (out / "top.json").read_text() == "old" and read_manifest(out)["complete"]

    calls = {"n": 0}
    real = os.replace

    def flaky(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).parent == out / "b":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky)
    with pytest.raises(UserError, match="incomplete"):
        run(out, {"top.json": "new", "b/1.txt": "n", "b/2.txt": "n"}, overwrite=True)
    m = read_manifest(out)
    assert m["complete"] is False
    assert set(m["files"]) == {"top.json", "a/1.txt", "a/2.txt", "b/1.txt", "b/2.txt"}
    assert not (out / "top.json").exists(), "no top-level file while the folder is incomplete"
    assert not list(tmp_path.glob(".*partial"))

    monkeypatch.setattr(fileio.os, "replace", real)
    run(out, {"top.json": "new", "b/1.txt": "n"}, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        MANIFEST,
        "b/1.txt",
        "mine.txt",
        "top.json",
    ]
    assert read_manifest(out)["complete"] is True


def test_a_tampered_manifest_cannot_delete_outside_or_through_links(tmp_path: Path) -> None:
    out = tmp_path / "o"
    run(out, {"top.json": "1"})
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.txt").write_text("keep")
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] += ["../victim.txt", str(victim), "link/x.txt", "./top.json"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(out)["files"] == ["link/x.txt", "top.json"]
    run(out, {"top.json": "2"}, overwrite=True)
    assert victim.read_text() == "keep" and (elsewhere / "x.txt").read_text() == "keep"
    # a new file through a link it does not own is refused
    with pytest.raises(UserError, match="link"):
        run(out, {"link/y.txt": "y"}, overwrite=True)
    assert not (elsewhere / "y.txt").exists()


# --------------------------------------------------------------------------- commands


def explain(ckpt: Path, image: Path, out: Path | str, *extra: str) -> None:
    main(
        [
            "explain",
            f"--ckpt_path={ckpt}",
            "--images",
            str(image),
            f"--out={out}",
            "--device=cpu",
            "--workers=0",
            "--save_maps=false",
            *extra,
        ]
    )


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: refusals must come before any work."""
    from lightning_vgg.models import loading

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(loading, "read_checkpoint", boom)


@pytest.mark.usefixtures("no_model")
def test_explain_refuses_a_foreign_folder_before_work(
    tmp_path: Path, cat_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m" / "m.ckpt")
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("\\section{Cats}")
    before = snapshot(out)
    with pytest.raises(SystemExit) as exc:
        explain(ckpt, cat_photo, out)
    assert exc.value.code == 2
    line = error_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert snapshot(out) == before


@pytest.mark.usefixtures("no_model")
def test_explain_refuses_the_checkpoints_run_folder_and_the_cwd(
    tmp_path: Path,
    cat_photo: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = tmp_path / "runs" / "quick" / "version_0"
    ckpt = tiny_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    (run_dir / "metrics.csv").write_text("epoch\n0\n")
    before = snapshot(run_dir)
    for out in (run_dir, tmp_path / "runs", cat_photo.parent):
        with pytest.raises(SystemExit) as exc:
            explain(ckpt, cat_photo, out, "--overwrite=true")
        assert exc.value.code == 2
        assert f"refusing to write into {out}" in error_line(capsys)
    assert snapshot(run_dir) == before
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        explain(ckpt, cat_photo, ".")
    assert "current directory" in error_line(capsys)


def test_explain_reruns_into_its_own_folder_and_keeps_foreign_files(
    tmp_path: Path, cat_photo: Path, dog_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.ckpt")
    dog = tmp_path / "photos" / "dog.7.jpg"  # another name than the cat's: another folder
    dog.parent.mkdir()
    shutil.copy(dog_photo, dog)
    out = tmp_path / "e"
    explain(ckpt, cat_photo, out)
    first = json.loads((out / "explain.json").read_text())["images"][0]["folder"]
    m = read_manifest(out)
    assert m["command"] == "explain" and "explain.json" in m["files"]
    assert all((out / f).is_file() for f in m["files"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~fileio._umask()

    (out / "my notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        explain(ckpt, dog, out)
    line = error_line(capsys)
    assert str(out) in line and "--overwrite" in line and "my notes.txt" in line

    explain(ckpt, dog, out, "--overwrite", "true")
    assert (out / "my notes.txt").read_text() == "keep me"
    recs = json.loads((out / "explain.json").read_text())["images"]
    assert [Path(r["image"]).name for r in recs] == [dog.name]
    assert not (out / first).exists(), "the previous run's files are gone"
    m = read_manifest(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == {*m["files"], MANIFEST, "my notes.txt"}
    assert not list(tmp_path.glob(".e.*"))


def test_compare_and_experiment_refuse_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_vgg.report import experiment
    from lightning_vgg.report.compare import run_compare
    from lightning_vgg.report.experiment import run_experiment

    good = tiny_checkpoint(tmp_path / "runs" / "good" / "version_0" / "checkpoints" / "best.ckpt")
    bad = tiny_checkpoint(tmp_path / "runs" / "bad" / "version_0" / "checkpoints" / "best.ckpt")
    with pytest.raises(UserError, match="refusing to write into"):
        run_compare(str(good), str(bad), str(good.parent.parent), device="cpu")
    data = tmp_path / "data"
    (data / "PetImages" / "Cat").mkdir(parents=True)
    split = tmp_path / "split.csv"
    split.write_text(f"path,label,split\n{data / 'PetImages' / 'Cat' / 'cat.1.jpg'},0,test\n")
    with pytest.raises(UserError, match=re.escape(f"it holds {data / 'PetImages' / 'Cat'}")):
        run_compare(str(good), str(bad), str(data), split_file=str(split), device="cpu")

    def no_training(*args: object) -> None:
        raise AssertionError("trained before the output folder was checked")

    monkeypatch.setattr(experiment, "_fit_and_test", no_training)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="current directory"):
        run_experiment(out=".")
    (tmp_path / "exp" / "report").mkdir(parents=True)
    (tmp_path / "exp" / "report" / "draft.md").write_text("mine")
    with pytest.raises(UserError, match=r"exp/report.*--overwrite"):
        run_experiment(out="exp")
    with pytest.raises(UserError, match=re.escape(f"it is {data}")):
        run_experiment(out=str(data), overrides=["--data.source", str(data)])
