"""Writing never loses a user's file: ``save_adapter`` writes into a folder as ``save_pretrained`` does,
refuses a file path, and every folder adapterkit writes goes through one primitive
(:func:`adapterkit.files.write_folder`) that never shows a missing or half-written destination."""

import os
import threading
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.files import atomic_file, write_atomically, write_folder

from conftest import make_model, randomize_adapters, source_lines

SRC = Path(__file__).parents[1] / "src" / "adapterkit"


def model_with(seed: int, preset: str = "lora"):
    model = make_model("bert")
    ak.add_adapter(model, "task", preset)
    randomize_adapters(model, seed=seed)
    ak.set_active(model, "task")
    return model


def logits(model):
    return model(torch.arange(1, 8).view(1, 7)).logits


@pytest.mark.parametrize("format", ["adapterkit", "peft", "adapterhub"])
def test_save_adapter_keeps_the_users_files(tmp_path, format):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\section{Years of work}")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("x")
    model = model_with(1)
    ak.save_adapter(model, "task", folder, format=format)
    ak.save_adapter(model_with(2), "task", folder, format=format)  # replaces the first adapter's files only
    assert (folder / "thesis.tex").read_text() == "\\section{Years of work}"
    assert (folder / "data.csv").read_text() == "a,b\n1,2\n"
    assert (folder / "notes" / "todo.txt").read_text() == "x"
    fresh = make_model("bert")
    ak.load_adapter(fresh, folder, "task", activate=True)
    torch.testing.assert_close(logits(fresh), logits(model_with(2)), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temporary folder left beside it


def test_save_adapter_refuses_a_file_path(tmp_path):
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF precious")
    with pytest.raises(ak.AdapterError, match="is a file, not a folder: pass a folder path"):
        ak.save_adapter(model_with(1), "task", target)
    assert target.read_bytes() == b"%PDF precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.pdf"]  # nothing renamed, nothing added


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path):
    folder = ak.save_adapter(model_with(1), "task", tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fill(tmp: Path) -> None:
        (tmp / "adapter.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_folder(folder, fill)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(KeyboardInterrupt), atomic_file(folder / "adapter_config.json") as f:
        f.write(b"{")
        raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_readers_never_see_a_missing_or_mixed_adapter(tmp_path):
    """While another thread saves two different adapters over one folder again and again, the folder
    is always there, and a reader that opens it and reads both files through that handle gets one
    whole adapter each time (a handle on a version that was replaced meanwhile may find its files
    gone: that reader simply opens the folder again)."""
    folder = tmp_path / "live"
    versions = {}
    for seed in (1, 2):
        saved = ak.save_adapter(model_with(seed), "task", tmp_path / f"v{seed}")
        versions[(saved / "adapter_config.json").read_bytes(), (saved / "adapter.safetensors").read_bytes()] = seed
    ak.save_adapter(model_with(1), "task", folder)
    models = [model_with(1), model_with(2)]
    seen, errors, done = set(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                fd = os.open(folder, os.O_RDONLY)
            except OSError as e:
                errors.append(f"the folder was missing: {e!r}")
                continue
            try:
                pair = tuple(_read_at(fd, n) for n in ("adapter_config.json", "adapter.safetensors"))
                seen.add(versions[pair])
            except FileNotFoundError:
                pass  # this version was replaced and is being removed
            except KeyError:
                errors.append("a mix of two adapters' files")
            finally:
                os.close(fd)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(60):
        ak.save_adapter(models[i % 2], "task", folder)
    done.set()
    reader.join()
    assert errors == [] and seen == {1, 2}


def _read_at(folder_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def test_single_files_are_replaced_whole(tmp_path):
    path = tmp_path / "report.json"
    write_atomically(path, b'{"a": 1}')
    write_atomically(path, b'{"a": 2}')
    assert path.read_bytes() == b'{"a": 2}' and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # like open(): not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_one_write_primitive():
    """Renames, temporary folders and folder deletion of written output live in files.py alone."""
    assert source_lines(r"os\.replace\(|\.rename\(|mkdtemp\(|mkstemp\(", lambda p: p.name == "files.py") == []


def test_a_file_written_during_the_swap_is_kept(tmp_path, monkeypatch):
    """Found by a hostile tester: a user's file written into the folder between the check and the swap
    went with the replaced files."""
    from adapterkit import files

    folder = ak.save_adapter(model_with(1), "task", tmp_path / "a")
    real = files._exchange

    def racing(a, b):
        (b / "notes.txt").write_text("written just now")
        return real(a, b)

    monkeypatch.setattr(files, "_exchange", racing)
    ak.save_adapter(model_with(2), "task", folder)
    assert (folder / "notes.txt").read_text() == "written just now"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_no_write_through_a_linked_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "f.json").write_text("USER DATA")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("user file")
    (dest / "sub").symlink_to(victim)

    def fill(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.json").write_text('{"new": 1}')

    with pytest.raises(ak.AdapterError, match="is a link"):
        write_folder(dest, fill)
    assert (victim / "f.json").read_text() == "USER DATA" and (dest / "mine.txt").read_text() == "user file"
