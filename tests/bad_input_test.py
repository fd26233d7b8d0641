"""Bad data and bad run folders end in one ``FATAL <Class>: ...`` line, before training.

Every case goes through ``main.run_or_exit``, the command line's own handling
(tests/final/train_test.py and the CLI cases at the end run the real command): a user
error exits with a one-line message (status 1, no traceback); anything else
would escape as an exception and fail the test. After each case the run folder
holds no checkpoint, summary or arch: no training step ran.
"""

import errno
import hashlib
import os
import subprocess

import numpy as np
import pytest
from etils import epath

from autospace_jax import main as main_lib
from autospace_jax.data import input_pipeline
from autospace_jax.runtime import errors, files
from configs import digits
from tests import runner

RNG = np.random.default_rng(0)


def _images(n, size=8, channels=None, dtype=np.uint8):
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return RNG.integers(0, 256, shape).astype(dtype)


def _labels(n, classes=4):
    return np.arange(n) % classes


def _valid():
    return {"x_train": _images(40), "y_train": _labels(40), "x_test": _images(12),
            "y_test": _labels(12)}  # fmt: skip


def _config(path, **data):
    c = digits.get_config()
    c.data.source, c.data.path, c.data.image_size = "npz", path, 0
    c.model.stem, c.model.widths, c.model.blocks = 8, (8, 16), (1, 1)
    c.model.strides, c.model.head = (1, 2), 16
    c.train.epochs, c.train.batch_size = 1, 8
    for k, v in data.items():
        c.data[k] = v
    return c


def _fatal(config, workdir, mode="train") -> str:
    with pytest.raises(SystemExit) as exit_:
        main_lib.run_or_exit(config, mode, workdir)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("FATAL "), message  # Status 1.
    assert "\n" not in message and "Traceback" not in message
    return message


def _nothing_trained(workdir):
    for _, dirs, names in os.walk(workdir):
        assert "checkpoints" not in dirs and not {"summary.json", "arch.json"} & set(names)


# name -> (arrays of the npz: the valid ones with these replaced, None = dropped;
#          data.* overrides; expected class and words of the message)
NPZ_CASES = {
    "fewer labels than images": ({"y_train": _labels(36)}, {},
                                 "DataError", "y_train has 36 labels for 40 images in x_train"),
    "fewer test labels than images": ({"y_test": _labels(5)}, {},
                                      "DataError", "y_test has 5 labels for 12 images in x_test"),
    "every label -3": ({"y_train": np.full(40, -3), "y_test": np.full(12, -3)}, {},
                       "DataError", "y_train has label -3"),
    "one negative test label": ({"y_test": np.r_[_labels(11), -1]}, {},
                                "DataError", "y_test has label -1 (index 11)"),
    "a single class": ({"y_train": np.zeros(40, int), "y_test": np.zeros(12, int)}, {},
                       "DataError", "y_train holds 1 class(es) [0]; a classifier needs at least 2"),
    "wrong array names": ({"x_train": None, "images": _images(40)}, {},
                          "DataError", "the plain format misses ['x_train']"),
    "float images": ({"x_train": _images(40, dtype=np.float32)}, {},
                     "DataError", "x_train has dtype float32"),
    "float labels": ({"y_train": _labels(40) + 0.5}, {},
                     "DataError", "y_train has dtype float64"),
    "one-hot labels": ({"y_train": np.eye(4)[_labels(40)].astype(int)}, {},
                       "DataError", "y_train has dtype int64 and shape (40, 4)"),
    "5-d images": ({"x_train": _images(40)[:, None, ..., None, None]}, {},
                   "DataError", "x_train has dtype uint8 and shape (40, 1, 8, 8, 1, 1)"),
    "test images of another size": ({"x_test": _images(12, size=12)}, {},
                                    "DataError", "x_train images are (8, 8, 1)"),
    "test images with other channels": ({"x_test": _images(12, channels=3)}, {},
                                        "DataError", "but x_test images are (8, 8, 3)"),
    "no training images": ({"x_train": _images(0), "y_train": _labels(0)}, {},
                           "DataError", "x_train and y_train are empty"),
    "no test images": ({"x_test": _images(0), "y_test": _labels(0)}, {},
                       "DataError", "x_test and y_test are empty"),
    "a test class never trained": ({"y_test": _labels(12, classes=6)}, {},
                                   "DataError", "y_test has classes [4, 5] that y_train never"),
    "labels past class_names": ({"class_names": np.array(["a", "b", "c"])}, {},
                                "DataError", "y_train has label 3 (index 3); labels must be "
                                "integers in [0, 3)"),
    "labels that are not indices": ({"y_train": _labels(40) * 10**9}, {},
                                    "DataError", "labels must be class indices 0..K-1"),
    "a validation split rounding to 0": ({}, {"val_fraction": 0.01},
                                         "DataError", "data.val_fraction=0.01 of 40 training "
                                         "images leaves 40 to train on and 0 to validate on"),
    "images smaller than the strides": ({"x_train": _images(40, size=1),
                                         "x_test": _images(12, size=1)}, {},
                                        "DataError", "images are 1x1 but the skeleton "
                                        "downsamples them by 2"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NPZ_CASES))
def test_bad_npz_is_one_line_naming_the_array(name, tmp_path):
    replace, data, cls, words = NPZ_CASES[name]
    arrays = {k: v for k, v in {**_valid(), **replace}.items() if v is not None}
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    workdir = str(tmp_path / "run")
    message = _fatal(_config(path, **data), workdir)
    assert message.startswith(f"FATAL {cls}: "), message
    assert words in message and (f"data.path={path!r}" in message or "data" in message), message
    _nothing_trained(workdir)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled objects", "a .npy"])
def test_unreadable_npz_file_is_one_line(damage, tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **_valid())
    raw = open(path, "rb").read()
    if damage == "garbage":
        open(path, "wb").write(b"\x00not a zip at all" * 10)
    elif damage == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif damage == "pickled objects":
        np.savez(path, **{**_valid(), "y_train": np.array([{"a": 1}] * 40, dtype=object)})
    else:
        np.save(open(path, "wb"), _images(3))
    message = _fatal(_config(path), str(tmp_path / "run"))
    assert message.startswith(f"FATAL DataError: data.path={path!r} is not a readable .npz")
    _nothing_trained(str(tmp_path / "run"))


def test_a_test_class_missing_is_a_warning_not_an_error(tmp_path, caplog):
    arrays = {**_valid(), "y_test": np.arange(12) % 3}  # Class 3 never tested.
    path = str(tmp_path / "ok.npz")
    np.savez(path, **arrays)
    input_pipeline.load(_config(path).data, seed=0)
    assert "classes [3] are in y_train but not in y_test" in caplog.text


def _valid_npz(tmp_path) -> str:
    path = str(tmp_path / "ok.npz")
    np.savez(path, **_valid())
    return path


def test_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "taken"
    workdir.write_text("not a folder")
    message = _fatal(_config(_valid_npz(tmp_path)), str(workdir))
    assert message == f"FATAL RunFolderError: --workdir={str(workdir)!r} is a file, not a " \
        "folder; give a folder (created if missing)"  # fmt: skip
    assert workdir.read_text() == "not a folder"


def test_workdir_under_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    workdir = str(tmp_path / "taken" / "run")
    message = _fatal(_config(_valid_npz(tmp_path)), workdir)
    assert message.startswith(f"FATAL RunFolderError: --workdir={workdir!r}: ")
    assert "is not a writable folder" in message


def test_damaged_summary_json_names_the_file(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "train").mkdir(parents=True)
    (workdir / "train" / "summary.json").write_text('{"steps": 4, "test_acc')
    message = _fatal(_config(_valid_npz(tmp_path)), str(workdir))
    assert message.startswith(f"FATAL RunFolderError: {workdir}/train/summary.json is not "
                              "valid JSON")  # fmt: skip


def test_checkpoints_of_another_architecture(tmp_path):
    """A train folder holding checkpoints of the reference IRB, asked for another arch."""
    from autospace_jax.space import arch as arch_lib
    from autospace_jax.space import genome as genome_lib

    config = _config(_valid_npz(tmp_path))
    skeleton = arch_lib.skeleton_from_config(config.model, 4)
    workdir = tmp_path / "run"
    (workdir / "train" / "checkpoints" / "5").mkdir(parents=True)
    (workdir / "train" / "checkpoints" / "5" / "state").write_bytes(b"weights")
    arch_lib.save_arch(str(workdir / "train" / "arch.json"),
                       arch_lib.uniform(skeleton, genome_lib.irb(3, 6)))  # fmt: skip
    other = str(tmp_path / "other.json")
    arch_lib.save_arch(other, arch_lib.uniform(skeleton, genome_lib.irb(5, 3)))
    config.train.arch = other
    before = _digest(workdir)
    message = _fatal(config, str(workdir))
    assert message.startswith("FATAL RunFolderError: ") and "another architecture" in message
    assert _digest(workdir) == before  # Nothing moved aside, nothing overwritten.


def test_full_disk_while_saving_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    real = epath.Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])  # Half written, then the disk is full.
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(epath.Path, "write_bytes", full)
    with pytest.raises(errors.RunFolderError, match="No space left on device"):
        files.write_json(str(tmp_path / "summary.json"), {"a": 1})
    assert os.listdir(tmp_path) == []
    message = _fatal(_config(_valid_npz(tmp_path)), str(tmp_path / "run"))
    assert message.startswith("FATAL RunFolderError: ") and "No space left on device" in message


def _digest(folder) -> dict:
    """Every file under ``folder`` but the caches (compiled programs, decoded images) -> its
    sha1."""
    out = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "compilation_cache"]
        for n in (n for n in names if not n.startswith("input_pipeline_cache_")):
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("mode", ["evolve", "search", "train", "pipeline"])
def test_a_stage_refusing_bad_data_leaves_the_run_folder_as_it_was(mode, tmp_path):
    """A finished-looking run folder, then the same stage on mislabelled data."""
    workdir = tmp_path / "run"
    for stage in ("evolve", "search", "train"):
        (workdir / stage / "checkpoints" / "7").mkdir(parents=True)
        (workdir / stage / "checkpoints" / "7" / "state").write_bytes(b"weights")
        (workdir / stage / "summary.json").write_text('{"steps": 7}')
    before = _digest(workdir)
    path = str(tmp_path / "bad.npz")
    np.savez(path, **{**_valid(), "y_train": np.full(40, -3)})
    message = _fatal(_config(path), str(workdir), mode)
    assert message.startswith("FATAL DataError: ")
    assert _digest(workdir) == before


def test_a_bug_keeps_its_traceback_and_says_so(monkeypatch, tmp_path, caplog):
    def broken(config, workdir):
        raise KeyError("internal")

    monkeypatch.setitem(main_lib.MODES, "train", broken)
    with pytest.raises(KeyError):
        main_lib.run_or_exit(_config(_valid_npz(tmp_path)), "train", str(tmp_path / "run"))
    assert "stopped on a bug, not on your input" in caplog.text


def test_cli_bad_data_and_workdir_are_one_line_with_status_1(tmp_path):
    """The real command line, in a process of its own (``python -m``, not forked like
    tests.runner.run's): the cases above run its handling in-process."""
    (tmp_path / "file").write_text("x")
    path = str(tmp_path / "labels.npz")
    np.savez(path, **{**_valid(), "y_train": np.full(40, -3), "y_test": np.full(12, -3)})
    cases = [(path, str(tmp_path / "run"), f"FATAL DataError: data.path={path!r}", "label -3")]
    cases.append((_valid_npz(tmp_path), str(tmp_path / "file"), "FATAL RunFolderError: ",
                  "is a file, not a folder"))  # fmt: skip
    for path, workdir, start, words in cases:
        cmd = runner.command(workdir, "--mode=train", "--config.data.source=npz",
                             f"--config.data.path={path}", "--config.data.image_size=0",
                             *runner.TINY_MODEL)  # fmt: skip
        got = subprocess.run(cmd, cwd=runner.ROOT, env=runner.env(), capture_output=True,
                             text=True)  # fmt: skip
        last = got.stderr.strip().splitlines()[-1]
        assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr[-2000:]
        assert last.startswith(start) and words in last, last
    _nothing_trained(str(tmp_path / "run"))


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_user_error_class_is_one_fatal_line(monkeypatch, tmp_path):
    """Walks every user-facing class (a new one must be added here, with a real case)."""
    # Imported for their classes: each module defines one.
    from autospace_jax import compile_check  # noqa: F401
    from autospace_jax.search import context  # noqa: F401

    # Real cases of LatencyTableError: tests/latency/latency_test.py.
    classes = {c.__name__: c for c in _subclasses(errors.UserError)}
    # Real cases of WontFit: tests/compile_check_test.py.
    assert sorted(classes) == ["CheckpointError", "ConfigError", "DataError", "GenomeError",
                               "LatencyTableError", "MissingFileError", "NonFiniteError",
                               "RunFolderError", "UnreachableTarget", "WontFit"]  # fmt: skip
    path = _valid_npz(tmp_path)
    for name, cls in classes.items():

        def stage(config, workdir, cls=cls):
            raise cls("first line\n  second line")

        monkeypatch.setitem(main_lib.MODES, "train", stage)
        message = _fatal(_config(path), str(tmp_path / "run"))
        assert message == f"FATAL {name}: first line second line"
    # An OSError of the run folder is one too; any other OSError is not.
    for err, clear in ((OSError(errno.ENOSPC, "No space left on device", "x"), True),
                       (OSError(errno.EIO, "I/O error", "x"), False)):  # fmt: skip
        assert isinstance(main_lib.user_error(err), errors.RunFolderError) is clear
